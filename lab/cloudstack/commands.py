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
from typing import Any, Literal, TypeVar

from . import render
from .cloud import Cloud
from .errors import InvalidParameterValue, param_error
from .jobs import AsyncStart
from .state import Snapshot, VirtualMachine, Volume

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


def _listed(
    object_name: str,
    args: Args,
    items: Iterable[dict[str, Any]],
    *,
    like: tuple[str, ...] = ("name",),
    **equal: str,
) -> dict[str, Any]:
    """A list answer: ``items`` filtered as the list commands filter, then paged. ``equal`` maps
    an argument to the field it must equal; ``ids`` keeps the listed ids; ``keyword`` matches the
    ``like`` fields by substring, ignoring case (SQL LIKE)."""

    def matches(obj: Mapping[str, Any]) -> bool:
        if any(arg in args and obj.get(field) != args[arg] for arg, field in equal.items()):
            return False
        if "ids" in args and obj.get("id") not in args["ids"]:
            return False
        keyword = args.get("keyword")
        return not keyword or any(keyword.lower() in str(obj.get(f, "")).lower() for f in like)

    shown, count = _page(args, [obj for obj in items if matches(obj)])
    return render.list_response(object_name, shown, count)


_Row = TypeVar("_Row", VirtualMachine, Volume, Snapshot)


def _live(objects: Iterable[_Row]) -> list[_Row]:
    """Objects not removed, oldest first (CloudStack lists by id)."""
    return sorted((o for o in objects if o.removed is None), key=lambda o: o.internalid)


# -- synchronous commands -----------------------------------------------------------------------


async def list_zones(cloud: Cloud, args: Args) -> dict[str, Any]:
    return _listed("zone", args, (render.zone(cloud, z) for z in cloud.zones.values()), id="id", name="name")


async def list_domains(cloud: Cloud, args: Args) -> dict[str, Any]:
    return _listed("domain", args, [render.domain(cloud)], id="id", name="name")


async def list_accounts(cloud: Cloud, args: Args) -> dict[str, Any]:
    return _listed("account", args, [render.account(cloud)], id="id", name="name")


async def list_capabilities(cloud: Cloud, args: Args) -> dict[str, Any]:
    return {"capability": render.capabilities(cloud)}


async def list_networks(cloud: Cloud, args: Args) -> dict[str, Any]:
    items = (render.network(cloud, n) for n in cloud.networks.values())
    return _listed(
        "network", args, items, like=("name", "displaytext"), id="id", zoneid="zoneid", type="type"
    )


async def list_service_offerings(cloud: Cloud, args: Args) -> dict[str, Any]:
    items = (render.service_offering(cloud, o) for o in cloud.service_offerings.values())
    return _listed("serviceoffering", args, items, id="id", name="name")


async def list_disk_offerings(cloud: Cloud, args: Args) -> dict[str, Any]:
    items = (render.disk_offering(cloud, o) for o in cloud.disk_offerings.values())
    return _listed("diskoffering", args, items, id="id", name="name")


TEMPLATE_FILTERS = (
    "featured",
    "self",
    "selfexecutable",
    "sharedexecutable",
    "executable",
    "community",
    "all",
)


async def list_templates(cloud: Cloud, args: Args) -> dict[str, Any]:
    if args["templatefilter"] not in TEMPLATE_FILTERS:
        raise InvalidParameterValue(
            f"Please specify a valid template filter, one of {', '.join(TEMPLATE_FILTERS)}"
        )
    zone = args.get("zoneid")
    items = (e for t in cloud.templates.values() for e in render.template_entries(cloud, t, zone))
    return _listed("template", args, items, id="id", name="name")


async def list_virtual_machines(cloud: Cloud, args: Args) -> dict[str, Any]:
    def wanted(vm: dict[str, Any]) -> bool:
        if "name" in args and args["name"].lower() not in vm["name"].lower():  # name LIKE %name%
            return False
        return "networkid" not in args or any(n["networkid"] == args["networkid"] for n in vm["nic"])

    items = (render.virtual_machine(cloud, vm) for vm in _live(cloud.state.vms.values()))
    return _listed(
        "virtualmachine", args, filter(wanted, items), like=("name", "displayname", "state"), id="id",
        zoneid="zoneid", state="state",
    )  # fmt: skip


async def list_nics(cloud: Cloud, args: Args) -> dict[str, Any]:
    vm = cloud.vm(args["virtualmachineid"])
    if vm is None:
        raise InvalidParameterValue(f"Unable to find a virtual machine with id {args['virtualmachineid']}")
    items = (render.nic(cloud, n) for n in vm.nics)
    return _listed("nic", args, items, nicid="id", networkid="networkid")


async def list_volumes(cloud: Cloud, args: Args) -> dict[str, Any]:
    items = (render.volume(cloud, v) for v in _live(cloud.state.volumes.values()))
    return _listed(
        "volume", args, items, id="id", zoneid="zoneid", virtualmachineid="virtualmachineid", type="type",
        name="name", diskofferingid="diskofferingid",
    )  # fmt: skip


async def list_snapshots(cloud: Cloud, args: Args) -> dict[str, Any]:
    items = (render.snapshot(cloud, s) for s in _live(cloud.state.snapshots.values()))
    return _listed(
        "snapshot", args, items, id="id", volumeid="volumeid", zoneid="zoneid", name="name",
        snapshottype="snapshottype",
    )  # fmt: skip


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
        vm = await cloud.stop_vm(args["id"], args.get("forced", False))
        return {"virtualmachine": render.virtual_machine(cloud, vm)}

    return AsyncStart(body, "VirtualMachine", args["id"])


async def destroy_virtual_machine(cloud: Cloud, args: Args) -> AsyncStart:
    async def body() -> dict[str, Any]:
        vm = await cloud.destroy_vm(args["id"], args.get("expunge", False), args.get("volumeids", []))
        return {"virtualmachine": render.virtual_machine(cloud, vm)}

    return AsyncStart(body, "VirtualMachine", args["id"])


# -- the table ----------------------------------------------------------------------------------

_USER = "org.apache.cloudstack.api.command.user"
_ADMIN = "org.apache.cloudstack.api.command.admin"


def _job(name: str, params: tuple[Param, ...], start: AsyncHandler, java_class: str) -> Command:
    return Command(name, params, start=start, java_class=java_class, mutates=True)


_ID_VOLUME = P("id", "uuid", "volume", required=True)
_ID_SNAPSHOT = P("id", "uuid", "snapshot", required=True)
_ID_VM = P("id", "uuid", "vm", required=True)

# One entry a command, its parameters in the order CloudStack's command class declares them.
# fmt: off
COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("listZones", (
        P("id", "uuid", "zone"), P("name"), P("available", "boolean"), *PAGING,
    ), list_zones),
    Command("listDomains", (P("id", "uuid", "domain"), P("name"), *PAGING), list_domains),
    Command("listAccounts", (P("id", "uuid", "account"), P("name"), *PAGING), list_accounts),
    Command("listCapabilities", (), list_capabilities),
    Command("listNetworks", (
        P("id", "uuid", "network"), P("zoneid", "uuid", "zone"), P("type"), P("canusefordeploy", "boolean"),
        P("isrecursive", "boolean"), *PAGING,
    ), list_networks),
    Command("listServiceOfferings", (
        P("id", "uuid", "serviceoffering"), P("name"), P("zoneid", "uuid", "zone"), *PAGING,
    ), list_service_offerings),
    Command("listDiskOfferings", (
        P("id", "uuid", "diskoffering"), P("name"), P("zoneid", "uuid", "zone"), *PAGING,
    ), list_disk_offerings),
    Command("listTemplates", (
        P("templatefilter", required=True), P("id", "uuid", "template"), P("name"),
        P("zoneid", "uuid", "zone"), P("hypervisor"), *PAGING,
    ), list_templates),
    Command("listVirtualMachines", (
        P("id", "uuid", "vm"), P("ids", "uuids", "vm"), P("zoneid", "uuid", "zone"), P("name"), P("state"),
        P("networkid", "uuid", "network"), P("details", "strings"), P("isrecursive", "boolean"), *PAGING,
    ), list_virtual_machines),
    Command("listNics", (
        P("virtualmachineid", "uuid", "vm", required=True), P("nicid", "uuid", "nic"),
        P("networkid", "uuid", "network"), *PAGING,
    ), list_nics),
    Command("listVolumes", (
        P("id", "uuid", "volume"), P("ids", "uuids", "volume"), P("zoneid", "uuid", "zone"),
        P("virtualmachineid", "uuid", "vm"), P("type"), P("name"),
        P("diskofferingid", "uuid", "diskoffering"), P("isrecursive", "boolean"), *PAGING,
    ), list_volumes),
    Command("listSnapshots", (
        P("id", "uuid", "snapshot"), P("volumeid", "uuid", "volume"), P("zoneid", "uuid", "zone"), P("name"),
        P("snapshottype"), P("isrecursive", "boolean"), *PAGING,
    ), list_snapshots),
    Command("queryAsyncJobResult", (P("jobid", "uuid", "job", required=True),), query_async_job_result),
    Command("deleteVolume", (_ID_VOLUME,), delete_volume, mutates=True),
    Command("updateVirtualMachine", (
        _ID_VM, P("displayname"), P("name"), P("haenable", "boolean"),
    ), update_virtual_machine, mutates=True),
    _job("createVolume", (
        P("name"), P("zoneid", "uuid", "zone"), P("diskofferingid", "uuid", "diskoffering"),
        P("size", "long"), P("virtualmachineid", "uuid", "vm"), P("displayvolume", "boolean"),
    ), create_volume, f"{_ADMIN}.volume.CreateVolumeCmdByAdmin"),
    _job("attachVolume", (
        _ID_VOLUME, P("virtualmachineid", "uuid", "vm", required=True), P("deviceid", "long"),
    ), attach_volume, f"{_ADMIN}.volume.AttachVolumeCmdByAdmin"),
    _job("detachVolume", (
        P("id", "uuid", "volume"), P("virtualmachineid", "uuid", "vm"), P("deviceid", "long"),
    ), detach_volume, f"{_ADMIN}.volume.DetachVolumeCmdByAdmin"),
    _job("createSnapshot", (
        P("volumeid", "uuid", "volume", required=True), P("name"), P("asyncbackup", "boolean"),
        P("quiescevm", "boolean"),
    ), create_snapshot, f"{_USER}.snapshot.CreateSnapshotCmd"),
    _job("revertSnapshot", (_ID_SNAPSHOT,), revert_snapshot, f"{_USER}.snapshot.RevertSnapshotCmd"),
    _job("deleteSnapshot", (_ID_SNAPSHOT,), delete_snapshot, f"{_USER}.snapshot.DeleteSnapshotCmd"),
    _job("deployVirtualMachine", (
        P("zoneid", "uuid", "zone", required=True),
        P("serviceofferingid", "uuid", "serviceoffering", required=True),
        P("templateid", "uuid", "template", required=True), P("name"), P("displayname"),
        P("networkids", "uuids", "network"), P("ipaddress"), P("macaddress"), P("iptonetworklist", "map"),
        P("startvm", "boolean"), P("rootdisksize", "long"), P("diskofferingid", "uuid", "diskoffering"),
        P("size", "long"), P("hypervisor"),
    ), deploy_virtual_machine, f"{_ADMIN}.vm.DeployVMCmdByAdmin"),
    _job("startVirtualMachine", (_ID_VM,), start_virtual_machine, f"{_ADMIN}.vm.StartVMCmdByAdmin"),
    _job("stopVirtualMachine", (
        _ID_VM, P("forced", "boolean"),
    ), stop_virtual_machine, f"{_ADMIN}.vm.StopVMCmdByAdmin"),
    _job("destroyVirtualMachine", (
        _ID_VM, P("expunge", "boolean"), P("volumeids", "uuids", "volume"),
    ), destroy_virtual_machine, f"{_ADMIN}.vm.DestroyVMCmdByAdmin"),
)}
# fmt: on
