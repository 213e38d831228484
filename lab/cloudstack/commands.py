"""The API commands the double implements: their parameters, their kind, what they do.

Parameters are declared as CloudStack's command classes declare them (``@Parameter``: name, type,
required, entity) and processed as ``ParamProcessWorker`` does, before the command runs:

* a required parameter that is absent: 431 ``Unable to execute API command <cmd> due to missing
  parameter <name>``;
* a UUID that names nothing (removed objects still count, CloudStack looks them up "including
  removed"): 431 ``... due to invalid value. Invalid parameter <name> value=<v> due to incorrect
  long value format, or entity does not exist ...``;
* a number that is not one: 431 ``... due to invalid value <v> for parameter <name>``;
* a string longer than its limit (255 by default): 431;
* a boolean is ``true`` in any case, anything else is false (``Boolean.valueOf``);
* a list is split on commas; a map comes as ``name[i].key=value`` (``ParamUnpackWorker``).

Unknown parameters are ignored, as CloudStack ignores them. Then the command runs: a synchronous
one answers its object; an asynchronous one answers ``jobid`` (and ``id`` for a create command)
and the rest happens in the job (:mod:`.jobs`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from . import render
from .cloud import Cloud
from .errors import InvalidParameterValue, param_error
from .jobs import AsyncStart

Args = dict[str, Any]
ParamType = Literal["uuid", "string", "long", "integer", "boolean", "uuids", "strings", "map"]

_INTEGER = re.compile(r"^[+-]?\d+$")
_MAP_KEY = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<index>\d+)\]\.(?P<key>.+)$")
DEFAULT_PAGE_SIZE = 500


@dataclass(frozen=True)
class Param:
    name: str
    type: ParamType = "string"
    entity: str | None = None  # what a uuid (or list of uuids) names
    required: bool = False
    length: int = 255


def P(name: str, type: ParamType = "string", entity: str | None = None, *, required: bool = False) -> Param:
    return Param(name, type, entity, required=required)


SyncHandler = Callable[[Cloud, Args], Awaitable[dict[str, Any]]]
AsyncHandler = Callable[[Cloud, Args], Awaitable[AsyncStart]]


@dataclass(frozen=True)
class Command:
    name: str
    params: tuple[Param, ...]
    sync: SyncHandler | None = None
    start: AsyncHandler | None = None
    #: the Java class queryAsyncJobResult names in ``cmd`` (async commands)
    java_class: str = ""
    #: whether the command changes the cloud (it then runs under the cloud's lock)
    mutates: bool = False

    @property
    def response_name(self) -> str:
        return f"{self.name.lower()}response"

    @property
    def lower_name(self) -> str:
        return self.name.lower()


# -- parameter processing -----------------------------------------------------------------------


def _number(command: Command, param: Param, value: str) -> int | None:
    bits = 31 if param.type == "integer" else 63
    if param.type == "integer" and not value.strip():
        return None  # blank INTEGER parameters are ignored
    if not _INTEGER.match(value) or not -(1 << bits) <= int(value) < (1 << bits):
        raise param_error(command.lower_name, f"due to invalid value {value} for parameter {param.name}")
    return int(value)


def _uuid(cloud: Cloud, command: Command, param: Param, value: str) -> str:
    assert param.entity is not None
    if not cloud.exists(param.entity, value):
        raise param_error(
            command.lower_name,
            f"due to invalid value. Invalid parameter {param.name} value={value} due to incorrect long value"
            " format, or entity does not exist or due to incorrect parameter annotation for the field in api"
            " cmd class.",
        )
    return value


def _map(raw: Mapping[str, str], name: str) -> list[dict[str, str]] | None:
    entries: dict[int, dict[str, str]] = {}
    for key, value in raw.items():
        m = _MAP_KEY.match(key)
        if m and m["name"] == name:
            entries.setdefault(int(m["index"]), {})[m["key"]] = value
    return [entries[i] for i in sorted(entries)] if entries else None


def parse_args(cloud: Cloud, command: Command, raw: Mapping[str, str]) -> Args:
    args: Args = {}
    for param in command.params:
        if param.type == "map":
            mapped = _map(raw, param.name)
            if mapped is None and param.required:
                raise param_error(command.lower_name, f"due to missing parameter {param.name}")
            if mapped is not None:
                args[param.name] = mapped
            continue
        value = raw.get(param.name)
        if value is None:
            if param.required:
                raise param_error(command.lower_name, f"due to missing parameter {param.name}")
            continue
        converted: Any
        if param.type == "uuid":
            converted = _uuid(cloud, command, param, value)
        elif param.type == "uuids":
            converted = [_uuid(cloud, command, param, v) for v in value.split(",") if v]
        elif param.type == "strings":
            converted = [v for v in value.split(",") if v]
        elif param.type in ("long", "integer"):
            converted = _number(command, param, value)
            if converted is None:
                continue
        elif param.type == "boolean":
            converted = value.lower() == "true"
        else:
            if len(value) > param.length:
                raise param_error(
                    command.lower_name,
                    f"due to invalid value. Value greater than max allowed length {param.length} for param:"
                    f" {param.name}",
                )
            converted = value
        args[param.name] = converted
    return args


# -- list helpers -------------------------------------------------------------------------------

PAGING = (P("page", "integer"), P("pagesize", "integer"), P("keyword"), P("listall", "boolean"))


def _page(args: Args, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    size = args.get("pagesize", DEFAULT_PAGE_SIZE)
    if size == -1:
        return items, len(items)
    if size < 1:
        raise InvalidParameterValue("Page size can't be 0 or less; specify -1 for all or a positive value")
    if size > DEFAULT_PAGE_SIZE:
        raise InvalidParameterValue(
            f"Page size can't exceed max allowed page size value: {DEFAULT_PAGE_SIZE}"
        )
    page = args.get("page", 1)
    if page < 1:
        raise InvalidParameterValue("Page must be 1 or more")
    start = (page - 1) * size
    return items[start : start + size], len(items)


def _listed(object_name: str, args: Args, items: list[dict[str, Any]]) -> dict[str, Any]:
    shown, count = _page(args, items)
    return render.list_response(object_name, shown, count)


def _matches(args: Args, obj: Mapping[str, Any], *, like: Iterable[str] = ("name",), **equal: str) -> bool:
    """Filters as the list commands apply them: ``equal`` maps an argument to the field it must
    equal; ``keyword`` matches the ``like`` fields by substring, ignoring case (SQL LIKE)."""
    for arg, field in equal.items():
        if arg in args and obj.get(field) != args[arg]:
            return False
    keyword = args.get("keyword")
    if keyword:
        return any(keyword.lower() in str(obj.get(f, "")).lower() for f in like)
    return True


# -- synchronous commands -----------------------------------------------------------------------


async def list_zones(cloud: Cloud, args: Args) -> dict[str, Any]:
    items = [render.zone(cloud, z) for z in cloud.zones.values()]
    return _listed("zone", args, [z for z in items if _matches(args, z, id="id", name="name")])


async def list_domains(cloud: Cloud, args: Args) -> dict[str, Any]:
    items = [render.domain(cloud)]
    return _listed("domain", args, [d for d in items if _matches(args, d, id="id", name="name")])


async def list_accounts(cloud: Cloud, args: Args) -> dict[str, Any]:
    items = [render.account(cloud)]
    return _listed("account", args, [a for a in items if _matches(args, a, id="id", name="name")])


async def list_capabilities(cloud: Cloud, args: Args) -> dict[str, Any]:
    return {"capability": render.capabilities(cloud)}


async def list_networks(cloud: Cloud, args: Args) -> dict[str, Any]:
    items = [render.network(cloud, n) for n in cloud.networks.values()]
    return _listed(
        "network",
        args,
        [
            n
            for n in items
            if _matches(args, n, like=("name", "displaytext"), id="id", zoneid="zoneid", type="type")
        ],
    )


async def list_service_offerings(cloud: Cloud, args: Args) -> dict[str, Any]:
    items = [render.service_offering(cloud, o) for o in cloud.service_offerings.values()]
    return _listed("serviceoffering", args, [o for o in items if _matches(args, o, id="id", name="name")])


async def list_disk_offerings(cloud: Cloud, args: Args) -> dict[str, Any]:
    items = [render.disk_offering(cloud, o) for o in cloud.disk_offerings.values()]
    return _listed("diskoffering", args, [o for o in items if _matches(args, o, id="id", name="name")])


TEMPLATE_FILTERS = {
    "featured",
    "self",
    "selfexecutable",
    "sharedexecutable",
    "executable",
    "community",
    "all",
}


async def list_templates(cloud: Cloud, args: Args) -> dict[str, Any]:
    if args["templatefilter"] not in TEMPLATE_FILTERS:
        raise InvalidParameterValue(
            f"Please specify a valid template filter, one of {', '.join(sorted(TEMPLATE_FILTERS))}"
        )
    items = [
        e for t in cloud.templates.values() for e in render.template_entries(cloud, t, args.get("zoneid"))
    ]
    return _listed("template", args, [t for t in items if _matches(args, t, id="id", name="name")])


def _vm_matches(cloud: Cloud, args: Args, vm: dict[str, Any]) -> bool:
    if "name" in args and args["name"].lower() not in vm["name"].lower():  # name LIKE %name%
        return False
    if "ids" in args and vm["id"] not in args["ids"]:
        return False
    if "networkid" in args and all(n["networkid"] != args["networkid"] for n in vm["nic"]):
        return False
    return _matches(args, vm, like=("name", "displayname", "state"), id="id", zoneid="zoneid", state="state")


async def list_virtual_machines(cloud: Cloud, args: Args) -> dict[str, Any]:
    vms = sorted((vm for vm in cloud.state.vms.values() if vm.removed is None), key=lambda v: v.internalid)
    items = [render.virtual_machine(cloud, vm) for vm in vms]
    return _listed("virtualmachine", args, [vm for vm in items if _vm_matches(cloud, args, vm)])


async def list_nics(cloud: Cloud, args: Args) -> dict[str, Any]:
    vm = cloud.vm(args["virtualmachineid"])
    if vm is None:
        raise InvalidParameterValue(f"Unable to find a virtual machine with id {args['virtualmachineid']}")
    items = [render.nic(cloud, n) for n in vm.nics]
    return _listed("nic", args, [n for n in items if _matches(args, n, nicid="id", networkid="networkid")])


async def list_volumes(cloud: Cloud, args: Args) -> dict[str, Any]:
    vols = sorted((v for v in cloud.state.volumes.values() if v.removed is None), key=lambda v: v.internalid)
    items = [render.volume(cloud, v) for v in vols]
    return _listed(
        "volume",
        args,
        [
            v
            for v in items
            if ("ids" not in args or v["id"] in args["ids"])
            and _matches(
                args,
                v,
                id="id",
                zoneid="zoneid",
                virtualmachineid="virtualmachineid",
                type="type",
                name="name",
                diskofferingid="diskofferingid",
            )
        ],
    )


async def list_snapshots(cloud: Cloud, args: Args) -> dict[str, Any]:
    snaps = sorted(
        (s for s in cloud.state.snapshots.values() if s.removed is None), key=lambda s: s.internalid
    )
    items = [render.snapshot(cloud, s) for s in snaps]
    return _listed(
        "snapshot",
        args,
        [
            s
            for s in items
            if _matches(
                args,
                s,
                id="id",
                volumeid="volumeid",
                zoneid="zoneid",
                name="name",
                snapshottype="snapshottype",
            )
        ],
    )


async def query_async_job_result(cloud: Cloud, args: Args) -> dict[str, Any]:
    return render.job(cloud, cloud.state.jobs[args["jobid"]])


async def delete_volume(cloud: Cloud, args: Args) -> dict[str, Any]:
    cloud.delete_volume(args["id"])
    await cloud.save()
    return {"success": True}


async def update_virtual_machine(cloud: Cloud, args: Args) -> dict[str, Any]:
    vm = cloud.update_vm(args["id"], args.get("displayname"), args.get("name"), args.get("haenable"))
    await cloud.save()
    return {"virtualmachine": render.virtual_machine(cloud, vm)}


# -- asynchronous commands ----------------------------------------------------------------------


async def create_volume(cloud: Cloud, args: Args) -> AsyncStart:
    vol = cloud.alloc_volume(
        name=args.get("name"),
        zone_id=args.get("zoneid"),
        disk_offering_id=args.get("diskofferingid"),
        size_gb=args.get("size"),
        vm_id=args.get("virtualmachineid"),
    )
    await cloud.save()

    async def body() -> dict[str, Any]:
        if "virtualmachineid" in args:
            await cloud.attach_volume(vol.id, args["virtualmachineid"], None)
        return {"volume": render.volume(cloud, vol)}

    return AsyncStart(body, "Volume", vol.id, created_id=vol.id)


async def attach_volume(cloud: Cloud, args: Args) -> AsyncStart:
    async def body() -> dict[str, Any]:
        vol = await cloud.attach_volume(args["id"], args["virtualmachineid"], args.get("deviceid"))
        return {"volume": render.volume(cloud, vol)}

    return AsyncStart(body, "Volume", args["id"])


async def detach_volume(cloud: Cloud, args: Args) -> AsyncStart:
    async def body() -> dict[str, Any]:
        vol = await cloud.detach_volume(args.get("id"), args.get("virtualmachineid"), args.get("deviceid"))
        return {"volume": render.volume(cloud, vol)}

    return AsyncStart(body, "Volume", args.get("id"))


async def create_snapshot(cloud: Cloud, args: Args) -> AsyncStart:
    snap = cloud.alloc_snapshot(args["volumeid"], args.get("name"))
    await cloud.save()

    async def body() -> dict[str, Any]:
        await cloud.take_snapshot(snap.id)
        return {"snapshot": render.snapshot(cloud, snap)}

    def failed() -> None:
        snap.state = "Error"

    return AsyncStart(body, "Snapshot", snap.id, created_id=snap.id, on_failure=failed)


async def revert_snapshot(cloud: Cloud, args: Args) -> AsyncStart:
    async def body() -> dict[str, Any]:
        snap = await cloud.revert_snapshot(args["id"])
        return {"snapshot": render.snapshot(cloud, snap)}

    return AsyncStart(body, "Snapshot", args["id"])


async def delete_snapshot(cloud: Cloud, args: Args) -> AsyncStart:
    async def body() -> dict[str, Any]:
        await cloud.delete_snapshot(args["id"])
        return {"success": True}

    return AsyncStart(body, "Snapshot", args["id"])


async def deploy_virtual_machine(cloud: Cloud, args: Args) -> AsyncStart:
    vm = cloud.alloc_vm(
        zone_id=args["zoneid"],
        service_offering_id=args["serviceofferingid"],
        template_id=args["templateid"],
        name=args.get("name"),
        display_name=args.get("displayname"),
        network_ids=args.get("networkids", []),
        ip_address=args.get("ipaddress"),
        mac_address=args.get("macaddress"),
        ip_to_network=args.get("iptonetworklist", []),
        root_disk_gb=args.get("rootdisksize"),
        disk_offering_id=args.get("diskofferingid"),
        size_gb=args.get("size"),
    )
    await cloud.save()

    async def body() -> dict[str, Any]:
        await cloud.deploy_vm(vm.id, args.get("startvm", True))
        return {"virtualmachine": render.virtual_machine(cloud, vm)}

    def failed() -> None:
        vm.state = "Error"

    return AsyncStart(body, "VirtualMachine", vm.id, created_id=vm.id, on_failure=failed)


async def start_virtual_machine(cloud: Cloud, args: Args) -> AsyncStart:
    async def body() -> dict[str, Any]:
        return {"virtualmachine": render.virtual_machine(cloud, await cloud.start_vm(args["id"]))}

    return AsyncStart(body, "VirtualMachine", args["id"])


async def stop_virtual_machine(cloud: Cloud, args: Args) -> AsyncStart:
    async def body() -> dict[str, Any]:
        return {"virtualmachine": render.virtual_machine(cloud, await cloud.stop_vm(args["id"]))}

    return AsyncStart(body, "VirtualMachine", args["id"])


async def destroy_virtual_machine(cloud: Cloud, args: Args) -> AsyncStart:
    async def body() -> dict[str, Any]:
        vm = await cloud.destroy_vm(args["id"], args.get("expunge", False), args.get("volumeids", []))
        return {"virtualmachine": render.virtual_machine(cloud, vm)}

    return AsyncStart(body, "VirtualMachine", args["id"])


# -- the table ----------------------------------------------------------------------------------

_USER = "org.apache.cloudstack.api.command.user"
_ADMIN = "org.apache.cloudstack.api.command.admin"

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "listZones", (P("id", "uuid", "zone"), P("name"), P("available", "boolean"), *PAGING), list_zones
        ),
        Command("listDomains", (P("id", "uuid", "domain"), P("name"), *PAGING), list_domains),
        Command("listAccounts", (P("id", "uuid", "account"), P("name"), *PAGING), list_accounts),
        Command("listCapabilities", (), list_capabilities),
        Command(
            "listNetworks",
            (
                P("id", "uuid", "network"),
                P("zoneid", "uuid", "zone"),
                P("type"),
                P("canusefordeploy", "boolean"),
                P("isrecursive", "boolean"),
                *PAGING,
            ),
            list_networks,
        ),
        Command(
            "listServiceOfferings",
            (P("id", "uuid", "serviceoffering"), P("name"), P("zoneid", "uuid", "zone"), *PAGING),
            list_service_offerings,
        ),
        Command(
            "listDiskOfferings",
            (P("id", "uuid", "diskoffering"), P("name"), P("zoneid", "uuid", "zone"), *PAGING),
            list_disk_offerings,
        ),
        Command(
            "listTemplates",
            (
                P("templatefilter", required=True),
                P("id", "uuid", "template"),
                P("name"),
                P("zoneid", "uuid", "zone"),
                P("hypervisor"),
                *PAGING,
            ),
            list_templates,
        ),
        Command(
            "listVirtualMachines",
            (
                P("id", "uuid", "vm"),
                P("ids", "uuids", "vm"),
                P("zoneid", "uuid", "zone"),
                P("name"),
                P("state"),
                P("networkid", "uuid", "network"),
                P("details", "strings"),
                P("isrecursive", "boolean"),
                *PAGING,
            ),
            list_virtual_machines,
        ),
        Command(
            "listNics",
            (
                P("virtualmachineid", "uuid", "vm", required=True),
                P("nicid", "uuid", "nic"),
                P("networkid", "uuid", "network"),
                *PAGING,
            ),
            list_nics,
        ),
        Command(
            "listVolumes",
            (
                P("id", "uuid", "volume"),
                P("ids", "uuids", "volume"),
                P("zoneid", "uuid", "zone"),
                P("virtualmachineid", "uuid", "vm"),
                P("type"),
                P("name"),
                P("diskofferingid", "uuid", "diskoffering"),
                P("isrecursive", "boolean"),
                *PAGING,
            ),
            list_volumes,
        ),
        Command(
            "listSnapshots",
            (
                P("id", "uuid", "snapshot"),
                P("volumeid", "uuid", "volume"),
                P("zoneid", "uuid", "zone"),
                P("name"),
                P("snapshottype"),
                P("isrecursive", "boolean"),
                *PAGING,
            ),
            list_snapshots,
        ),
        Command("queryAsyncJobResult", (P("jobid", "uuid", "job", required=True),), query_async_job_result),
        Command("deleteVolume", (P("id", "uuid", "volume", required=True),), delete_volume, mutates=True),
        Command(
            "updateVirtualMachine",
            (P("id", "uuid", "vm", required=True), P("displayname"), P("name"), P("haenable", "boolean")),
            update_virtual_machine,
            mutates=True,
        ),
        Command(
            "createVolume",
            (
                P("name"),
                P("zoneid", "uuid", "zone"),
                P("diskofferingid", "uuid", "diskoffering"),
                P("size", "long"),
                P("virtualmachineid", "uuid", "vm"),
                P("displayvolume", "boolean"),
            ),
            start=create_volume,
            java_class=f"{_ADMIN}.volume.CreateVolumeCmdByAdmin",
            mutates=True,
        ),
        Command(
            "attachVolume",
            (
                P("id", "uuid", "volume", required=True),
                P("virtualmachineid", "uuid", "vm", required=True),
                P("deviceid", "long"),
            ),
            start=attach_volume,
            java_class=f"{_ADMIN}.volume.AttachVolumeCmdByAdmin",
            mutates=True,
        ),
        Command(
            "detachVolume",
            (P("id", "uuid", "volume"), P("virtualmachineid", "uuid", "vm"), P("deviceid", "long")),
            start=detach_volume,
            java_class=f"{_ADMIN}.volume.DetachVolumeCmdByAdmin",
            mutates=True,
        ),
        Command(
            "createSnapshot",
            (
                P("volumeid", "uuid", "volume", required=True),
                P("name"),
                P("asyncbackup", "boolean"),
                P("quiescevm", "boolean"),
            ),
            start=create_snapshot,
            java_class=f"{_USER}.snapshot.CreateSnapshotCmd",
            mutates=True,
        ),
        Command(
            "revertSnapshot",
            (P("id", "uuid", "snapshot", required=True),),
            start=revert_snapshot,
            java_class=f"{_USER}.snapshot.RevertSnapshotCmd",
            mutates=True,
        ),
        Command(
            "deleteSnapshot",
            (P("id", "uuid", "snapshot", required=True),),
            start=delete_snapshot,
            java_class=f"{_USER}.snapshot.DeleteSnapshotCmd",
            mutates=True,
        ),
        Command(
            "deployVirtualMachine",
            (
                P("zoneid", "uuid", "zone", required=True),
                P("serviceofferingid", "uuid", "serviceoffering", required=True),
                P("templateid", "uuid", "template", required=True),
                P("name"),
                P("displayname"),
                P("networkids", "uuids", "network"),
                P("ipaddress"),
                P("macaddress"),
                P("iptonetworklist", "map"),
                P("startvm", "boolean"),
                P("rootdisksize", "long"),
                P("diskofferingid", "uuid", "diskoffering"),
                P("size", "long"),
                P("hypervisor"),
            ),
            start=deploy_virtual_machine,
            java_class=f"{_ADMIN}.vm.DeployVMCmdByAdmin",
            mutates=True,
        ),
        Command(
            "startVirtualMachine",
            (P("id", "uuid", "vm", required=True),),
            start=start_virtual_machine,
            java_class=f"{_ADMIN}.vm.StartVMCmdByAdmin",
            mutates=True,
        ),
        Command(
            "stopVirtualMachine",
            (P("id", "uuid", "vm", required=True), P("forced", "boolean")),
            start=stop_virtual_machine,
            java_class=f"{_ADMIN}.vm.StopVMCmdByAdmin",
            mutates=True,
        ),
        Command(
            "destroyVirtualMachine",
            (
                P("id", "uuid", "vm", required=True),
                P("expunge", "boolean"),
                P("volumeids", "uuids", "volume"),
            ),
            start=destroy_virtual_machine,
            java_class=f"{_ADMIN}.vm.DestroyVMCmdByAdmin",
            mutates=True,
        ),
    )
}
