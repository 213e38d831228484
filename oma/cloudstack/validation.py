"""Whether CloudStack is ready for the OMA: one check per prerequisite, each ``pass``,
``warning``, ``fail`` or ``skipped`` with a message an operator can act on.

- ``connection`` (``listZones``, ``listCapabilities``): fails when the URL or the keys do not
  work, and every other check is then skipped;
- ``permissions`` (``listAccounts``): fails when the key's account is not enabled;
- ``zone``: fails when it does not exist (disabled: warning);
- ``disk_offering`` (``listDiskOfferings``): fails when it does not exist (a fixed size:
  warning, only disks up to that size fit);
- ``service_offering`` (``listServiceOfferings``): fails when it does not exist (fixed CPU and
  memory: warning);
- ``network`` (``listNetworks``): fails when it does not exist or is in another zone;
- ``template`` (``listTemplates``): fails when it does not exist (not ready: warning);
- ``oma_vm`` (``listVirtualMachines``): fails when it does not exist, is in another zone, is
  neither Running nor Stopped, or belongs to an account the key may not attach volumes for;
- ``volume_slots`` (``listVolumes``, ``listHypervisorCapabilities``): fails when no data-volume
  slot is free on the OMA VM (fewer than 4: warning).

A choice that is not made is ``fail`` when the OMA cannot replicate without it (zone, disk
offering, OMA VM) and ``warning`` when only failover needs it (compute offering, network), in
:func:`validate` with ``require_choices``; when settings are saved (``require_choices=False``)
only what is chosen is checked, so settings can be saved one step at a time.

The data-volume limit per VM is the hypervisor's (``listHypervisorCapabilities``, an
administrator's command); a key that may not call it gets CloudStack's KVM default,
:data:`DEFAULT_MAX_DATA_VOLUMES`, and the answer says so.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from oma.cloudstack.client import (
    METHOD_NOT_ALLOWED,
    PARAM_ERROR,
    UNAUTHORIZED,
    UNSUPPORTED_ACTION_ERROR,
    CloudStackClient,
    CloudStackError,
)
from oma.cloudstack.resources import (
    disk_offering_view,
    network_view,
    service_offering_view,
    template_view,
    vm_view,
    zone_view,
)
from oma.cloudstack.settings import Resources

Status = Literal["pass", "warning", "fail", "skipped"]
CHECKS = (
    "connection",
    "permissions",
    "zone",
    "disk_offering",
    "service_offering",
    "network",
    "template",
    "oma_vm",
    "volume_slots",
)
#: Data volumes a KVM VM may have when the hypervisor's own figure cannot be read.
DEFAULT_MAX_DATA_VOLUMES = 32
FEW_SLOTS = 4
ROOT_ADMIN, DOMAIN_ADMIN = 1, 2
_RANK = {"pass": 0, "skipped": 0, "warning": 1, "fail": 2}


@dataclass
class Check:
    status: Status
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


def _not_chosen(what: str, required: bool, why: str, when_required: Status = "fail") -> Check:
    """A choice not made: ``when_required`` with ``why`` when choices are required, else skipped."""
    if required:
        return Check(when_required, f"no {what} is chosen: {why}")
    return Check("skipped", f"no {what} is chosen")


async def _one(
    client: CloudStackClient, command: str, object_id: str, **params: Any
) -> dict[str, Any] | None:
    """The object ``object_id`` as ``command`` lists it; None when CloudStack has none (it answers a
    UUID naming nothing with 431)."""
    try:
        items = await client.list(command, id=object_id, **params)
    except CloudStackError as exc:
        if exc.errorcode == PARAM_ERROR:
            return None
        raise
    return next((i for i in items if str(i.get("id", "")).lower() == object_id.lower()), None)


async def _account(client: CloudStackClient) -> dict[str, Any] | None:
    """The API key's own account: the only one listed, or the one whose user has this key."""
    accounts = await client.list("listAccounts")
    if len(accounts) == 1:
        return accounts[0]
    for account in accounts:
        users = account.get("user")
        if isinstance(users, list) and any(
            isinstance(u, dict) and u.get("apikey") == client.login.api_key for u in users
        ):
            return account
    return None


def _permissions(account: dict[str, Any] | None) -> Check:
    if account is None:
        return Check("warning", "the API key's account could not be told apart from the others it sees")
    details = {
        "account": account.get("name"),
        "domain": account.get("domain"),
        "account_type": account.get("accounttype"),
        "role": account.get("rolename") or account.get("roletype"),
    }
    state = str(account.get("state", "")).lower()
    if state != "enabled":
        return Check(
            "fail", f"the API key's account {account.get('name')} is {state or 'not enabled'}", details
        )
    kinds = {ROOT_ADMIN: "root administrator", DOMAIN_ADMIN: "domain administrator"}
    kind = (
        kinds.get(account["accounttype"], "user") if isinstance(account.get("accounttype"), int) else "user"
    )
    return Check("pass", f"the API key belongs to account {account.get('name')} ({kind})", details)


def _zone(zones: list[dict[str, Any]], zone_id: str, required: bool) -> Check:
    if not zone_id:
        return _not_chosen("zone", required, "volumes are created in it")
    zone = next((z for z in zones if z["id"].lower() == zone_id), None)
    if zone is None:
        return Check("fail", f"CloudStack has no zone {zone_id} this key sees", {"zone_id": zone_id})
    if zone["allocation_state"] and zone["allocation_state"].lower() != "enabled":
        return Check("warning", f"zone {zone['name']} is {zone['allocation_state']}", {"zone": zone})
    return Check("pass", f"zone {zone['name']}", {"zone": zone})


@dataclass(frozen=True)
class _Offering:
    """A kind of offering as the checks see it."""

    key: str
    what: str
    command: str
    view: Callable[[dict[str, Any]], dict[str, Any]]
    #: The warning for an offering that is not customisable.
    fixed: Callable[[dict[str, Any]], str]
    custom: str


DISK_OFFERING = _Offering(
    "disk_offering",
    "disk offering",
    "listDiskOfferings",
    disk_offering_view,
    lambda o: (
        f"disk offering {o['name']} has a fixed size ({o['disk_size_gb']} GiB): only disks up to"
        " that size can be replicated; a custom-size offering fits every disk"
    ),
    "custom size",
)
SERVICE_OFFERING = _Offering(
    "service_offering",
    "compute offering",
    "listServiceOfferings",
    service_offering_view,
    lambda o: (
        f"compute offering {o['name']} has fixed CPU and memory ({o['cpu']} vCPU, {o['memory_mb']} MB):"
        " failed-over VMs get exactly that"
    ),
    "custom",
)


async def _offering(client: CloudStackClient, kind: _Offering, offering_id: str, unchosen: Check) -> Check:
    if not offering_id:
        return unchosen
    found = await _one(client, kind.command, offering_id)
    if found is None:
        return Check("fail", f"CloudStack has no {kind.what} {offering_id}")
    offering = kind.view(found)
    details = {kind.key: offering}
    if not offering["is_customized"]:
        return Check("warning", kind.fixed(offering), details)
    return Check("pass", f"{kind.what} {offering['name']} ({kind.custom})", details)


async def _network(client: CloudStackClient, network_id: str, zone_id: str, required: bool) -> Check:
    if not network_id:
        return _not_chosen("default network", required, "failover will need network mappings", "warning")
    found = await _one(client, "listNetworks", network_id)
    if found is None:
        return Check("fail", f"CloudStack has no network {network_id} this key may use")
    network = network_view(found)
    if zone_id and network["zone_id"].lower() != zone_id:
        return Check(
            "fail",
            f"network {network['name']} is in zone {network['zone_name'] or network['zone_id']},"
            " not the chosen one",
            {"network": network},
        )
    return Check(
        "pass", f"network {network['name']} ({network['type']}, {network['state']})", {"network": network}
    )


async def _template(client: CloudStackClient, template_id: str) -> Check:
    if not template_id:
        return _not_chosen("template", False, "")
    found = await _one(client, "listTemplates", template_id, templatefilter="executable")
    if found is None:
        return Check("fail", f"CloudStack has no template {template_id} this key may use")
    template = template_view(found)
    if not template["is_ready"]:
        return Check("warning", f"template {template['name']} is not ready yet", {"template": template})
    return Check("pass", f"template {template['name']}", {"template": template})


def _may_attach_for(account: dict[str, Any] | None, vm: dict[str, Any]) -> bool:
    if account is None:
        return True  # unknown: the permissions check already warns
    if account.get("accounttype") == ROOT_ADMIN:
        return True
    if account.get("accounttype") == DOMAIN_ADMIN:
        return bool(vm["domain_id"]) and vm["domain_id"] == account.get("domainid")
    return bool(vm["account"] == account.get("name") and vm["domain_id"] == account.get("domainid"))


async def _oma_vm(
    client: CloudStackClient, vm_id: str, zone_id: str, account: dict[str, Any] | None, required: bool
) -> tuple[Check, dict[str, Any] | None]:
    if not vm_id:
        why = "replica volumes are attached to it (POST /settings/cloudstack/detect-oma-vm finds it)"
        return _not_chosen("OMA VM", required, why), None
    found = await _one(client, "listVirtualMachines", vm_id, listall=True)
    if found is None:
        return Check("fail", f"CloudStack has no VM {vm_id} this key sees"), None
    vm = vm_view(found)
    details = {"vm": vm}
    if zone_id and vm["zone_id"].lower() != zone_id:
        return Check("fail", f"the OMA VM {vm['name']} is in another zone than the chosen one", details), vm
    if vm["state"] not in ("Running", "Stopped"):
        return Check(
            "fail", f"the OMA VM {vm['name']} is {vm['state']}: volumes cannot be attached", details
        ), vm
    if not _may_attach_for(account, vm):
        return (
            Check(
                "fail",
                f"the OMA VM {vm['name']} belongs to account {vm['account']}, which the API key's account"
                f" {(account or {}).get('name')} may not attach volumes for",
                details,
            ),
            vm,
        )
    if vm["hypervisor"] and vm["hypervisor"].upper() != "KVM":
        return (
            Check(
                "warning",
                f"the OMA VM runs on {vm['hypervisor']}: the OMA finds attached volumes by their virtio"
                " disk/by-id names, which KVM gives",
                details,
            ),
            vm,
        )
    return Check("pass", f"the OMA VM is {vm['name']} ({vm['state']})", details), vm


async def max_data_volumes(client: CloudStackClient, hypervisor: str) -> tuple[int, str]:
    """The data volumes a VM of ``hypervisor`` may have, and where the figure comes from."""
    try:
        caps = await client.list("listHypervisorCapabilities", hypervisor=hypervisor or "KVM")
    except CloudStackError as exc:
        if exc.errorcode in (UNAUTHORIZED, UNSUPPORTED_ACTION_ERROR, METHOD_NOT_ALLOWED, PARAM_ERROR):
            return DEFAULT_MAX_DATA_VOLUMES, "default"
        raise
    limits = [c.get("maxdatavolumeslimit") for c in caps]
    known = [v for v in limits if isinstance(v, int) and v > 0]
    return (min(known), "listHypervisorCapabilities") if known else (DEFAULT_MAX_DATA_VOLUMES, "default")


async def volume_slots(client: CloudStackClient, vm: dict[str, Any]) -> Check:
    attached = await client.list("listVolumes", virtualmachineid=vm["id"], type="DATADISK", listall=True)
    limit, source = await max_data_volumes(client, vm["hypervisor"])
    free = max(0, limit - len(attached))
    details = {"attached": len(attached), "limit": limit, "limit_source": source, "free": free}
    text = f"{free} of {limit} data-volume slots free on the OMA VM ({len(attached)} attached)"
    if free == 0:
        return Check("fail", f"{text}: no replica volume can be attached", details)
    if free < FEW_SLOTS:
        return Check("warning", text, details)
    return Check("pass", text, details)


def overall(checks: dict[str, Check]) -> Status:
    worst = max((_RANK[c.status] for c in checks.values()), default=0)
    return "fail" if worst == 2 else "warning" if worst == 1 else "pass"


async def validate(
    client: CloudStackClient, resources: Resources, *, require_choices: bool = True
) -> dict[str, Any]:
    """Every check (module doc): ``{success, overall_status, message, checks: {name: {status,
    message, details?}}}``. CloudStack failing a check's call fails that check; failing the
    connection skips the rest."""
    checks: dict[str, Check] = {}
    try:
        zones = [zone_view(z) for z in await client.list("listZones")]
        capabilities = (await client.request("listCapabilities")).get("capability") or {}
    except CloudStackError as exc:
        checks["connection"] = Check("fail", exc.message, {"code": exc.code, **(exc.details or {})})
        for name in CHECKS[1:]:
            checks[name] = Check("skipped", "CloudStack could not be reached with these settings")
        return _result(checks)
    version = capabilities.get("cloudstackversion", "?") if isinstance(capabilities, dict) else "?"
    checks["connection"] = Check(
        "pass", f"connected to CloudStack {version}; {len(zones)} zones", {"cloudstack_version": version}
    )
    zone_id = resources.zone_id.lower()
    account: dict[str, Any] | None = None
    try:
        account = await _account(client)
        checks["permissions"] = _permissions(account)
    except CloudStackError as exc:
        checks["permissions"] = _failed(exc)
    checks["zone"] = _zone(zones, zone_id, require_choices)
    unchosen_disk = _not_chosen("disk offering", require_choices, "replica volumes are created with it")
    unchosen_compute = _not_chosen("compute offering", require_choices, "failover will need one", "warning")
    steps: tuple[tuple[str, Callable[[], Awaitable[Check]]], ...] = (
        (
            "disk_offering",
            partial(_offering, client, DISK_OFFERING, resources.disk_offering_id, unchosen_disk),
        ),
        (
            "service_offering",
            partial(_offering, client, SERVICE_OFFERING, resources.service_offering_id, unchosen_compute),
        ),
        ("network", partial(_network, client, resources.network_id, zone_id, require_choices)),
        ("template", partial(_template, client, resources.template_id)),
    )
    for name, step in steps:
        try:
            checks[name] = await step()
        except CloudStackError as exc:
            checks[name] = _failed(exc)
    vm: dict[str, Any] | None = None
    try:
        checks["oma_vm"], vm = await _oma_vm(client, resources.oma_vm_id, zone_id, account, require_choices)
    except CloudStackError as exc:
        checks["oma_vm"] = _failed(exc)
    if vm is None:
        checks["volume_slots"] = Check("skipped", "no OMA VM to count the volumes of")
    else:
        try:
            checks["volume_slots"] = await volume_slots(client, vm)
        except CloudStackError as exc:
            checks["volume_slots"] = _failed(exc)
    return _result(checks)


def _failed(exc: CloudStackError) -> Check:
    return Check("fail", exc.message, {"code": exc.code, **(exc.details or {})})


def _result(checks: dict[str, Check]) -> dict[str, Any]:
    status = overall(checks)
    message = {
        "pass": "CloudStack is ready for the OMA",
        "warning": "CloudStack is usable; review the warnings",
        "fail": "CloudStack is not ready: fix the failed checks",
    }[status]
    return {
        "success": status != "fail",
        "overall_status": status,
        "message": message,
        "checks": {name: checks[name].view() for name in CHECKS},
    }
