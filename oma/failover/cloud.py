"""What a failover does in CloudStack: the target VM, snapshots, the volumes on it.

Plain calls over :class:`oma.cloudstack.client.CloudStackClient`; each either does its change or
raises :class:`~oma.cloudstack.client.CloudStackError` (an ``ApiError``). The undo calls are
idempotent (a VM or snapshot that is gone, a volume already detached: nothing to do), so an undo
interrupted half-way can run again.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from oma.cloudstack.client import PARAM_ERROR, CloudStackClient, CloudStackError
from oma.cloudstack.resources import service_offering_view

log = logging.getLogger(__name__)

VM_POLL_S = 0.2


async def find_vm(client: CloudStackClient, *, vm_id: str | None, name: str) -> dict[str, Any] | None:
    """The VM of id ``vm_id`` (else the one named exactly ``name``); None when there is none."""
    params: dict[str, Any] = {"id": vm_id} if vm_id else {"name": name}
    try:
        items = await client.list("listVirtualMachines", listall=True, **params)
    except CloudStackError as exc:
        if exc.errorcode != PARAM_ERROR:
            raise
        return None
    for item in items:
        named = item.get("id") == vm_id if vm_id else item.get("name") == name
        if named and item.get("state") not in ("Expunging", "Destroyed"):
            return item
    return None


async def vm_state(client: CloudStackClient, vm_id: str) -> str | None:
    vm = await find_vm(client, vm_id=vm_id, name="")
    return None if vm is None else str(vm.get("state"))


async def deploy_stopped(
    client: CloudStackClient,
    *,
    name: str,
    display_name: str,
    zone_id: str,
    offering_id: str,
    template_id: str,
    network_ids: list[str],
) -> dict[str, Any]:
    """``deployVirtualMachine`` with ``startvm=false`` on ``network_ids`` (NIC order; CloudStack
    gives new MACs): the VM."""
    result = await client.job(
        "deployVirtualMachine",
        name=name,
        displayname=display_name,
        zoneid=zone_id,
        serviceofferingid=offering_id,
        templateid=template_id,
        networkids=",".join(network_ids),
        startvm="false",
    )
    vm: dict[str, Any] = result.get("virtualmachine") or {}
    log.info(
        "failover VM deployed stopped", extra={"action": "failover_deploy", "target_vm_id": vm.get("id")}
    )
    return vm


async def volumes_of(client: CloudStackClient, vm_id: str) -> list[dict[str, Any]]:
    items = await client.list("listVolumes", virtualmachineid=vm_id, listall=True)
    return sorted(items, key=lambda v: int(v.get("deviceid") or 0))


async def volume(client: CloudStackClient, volume_id: str) -> dict[str, Any] | None:
    try:
        items = await client.list("listVolumes", id=volume_id, listall=True)
    except CloudStackError as exc:
        if exc.errorcode != PARAM_ERROR:
            raise
        return None
    return next((v for v in items if v.get("id") == volume_id), None)


async def attach(client: CloudStackClient, volume_id: str, vm_id: str, device_id: int | None = None) -> None:
    params: dict[str, Any] = {"id": volume_id, "virtualmachineid": vm_id}
    if device_id is not None:
        params["deviceid"] = str(device_id)
    await client.job("attachVolume", **params)


async def detach_from(client: CloudStackClient, volume_id: str, vm_id: str) -> None:
    """Detach the volume when it is attached to ``vm_id`` (else nothing)."""
    found = await volume(client, volume_id)
    if found is not None and found.get("virtualmachineid") == vm_id:
        await client.job("detachVolume", id=volume_id)


async def delete_volume(client: CloudStackClient, volume_id: str) -> None:
    """Delete a detached volume (nothing when it is gone)."""
    if await volume(client, volume_id) is not None:
        await client.request("deleteVolume", id=volume_id)


async def start(client: CloudStackClient, vm_id: str) -> None:
    await client.job("startVirtualMachine", id=vm_id)


async def stop(client: CloudStackClient, vm_id: str) -> None:
    """Stop the VM at once (forced: a test VM's guest is discarded anyway)."""
    await client.job("stopVirtualMachine", id=vm_id, forced="true")


async def expunge(client: CloudStackClient, vm_id: str) -> None:
    await client.job("destroyVirtualMachine", id=vm_id, expunge="true")


async def wait_running(client: CloudStackClient, vm_id: str, deadline_s: float) -> None:
    """Until CloudStack says ``Running`` (a 504-free ``TooSlowError`` at the deadline)."""
    with trio.fail_after(deadline_s):
        while (state := await vm_state(client, vm_id)) != "Running":
            if state in (None, "Error", "Stopped"):
                raise RuntimeError(f"the VM is {state or 'gone'}, not Running")
            await trio.sleep(VM_POLL_S)


async def snapshot(client: CloudStackClient, volume_id: str, name: str) -> str:
    """A snapshot of the (detached) volume named ``name``: its id."""
    result = await client.job("createSnapshot", volumeid=volume_id, name=name)
    snapshot_id = str((result.get("snapshot") or {}).get("id", ""))
    if not snapshot_id:
        raise RuntimeError(f"createSnapshot of volume {volume_id} answered no snapshot id")
    return snapshot_id


async def find_snapshot(client: CloudStackClient, volume_id: str, name: str) -> str | None:
    """The id of the volume's snapshot named ``name`` (a snapshot whose id never came back)."""
    try:
        items = await client.list("listSnapshots", volumeid=volume_id, name=name, listall=True)
    except CloudStackError as exc:
        if exc.errorcode != PARAM_ERROR:
            raise
        return None
    return next((str(s["id"]) for s in items if s.get("name") == name), None)


async def revert(client: CloudStackClient, snapshot_id: str) -> None:
    await client.job("revertSnapshot", id=snapshot_id)


async def delete_snapshot(client: CloudStackClient, snapshot_id: str) -> None:
    items: list[dict[str, Any]] = []
    try:
        items = await client.list("listSnapshots", id=snapshot_id, listall=True)
    except CloudStackError as exc:
        if exc.errorcode != PARAM_ERROR:
            raise
    if any(s.get("id") == snapshot_id for s in items):
        await client.job("deleteSnapshot", id=snapshot_id)


async def offering_for(
    client: CloudStackClient, *, cpus: int, memory_mb: int, preferred: str
) -> dict[str, Any] | None:
    """The service offering for a VM of ``cpus`` and ``memory_mb``: ``preferred`` (the
    settings') when it fits, else the smallest fixed one that fits; None when none does."""
    offerings = [service_offering_view(o) for o in await client.list("listServiceOfferings")]
    fits = [
        o
        for o in offerings
        if not o["is_customized"] and (o["cpu"] or 0) >= cpus and (o["memory_mb"] or 0) >= memory_mb
    ]
    chosen = next((o for o in fits if o["id"] == preferred), None)
    if chosen is None and fits:
        chosen = min(fits, key=lambda o: (o["memory_mb"], o["cpu"]))
    return chosen
