"""Which VM, and which of its disks, a new replication job is for.

A VM is known by its identity: its vCenter and managed object id (the request's ``source_vm.id``,
else the inventory's id for ``source_vm.path``, else ``path:<path>``); names and paths are for
display only. A request that lists no disk copies every disk the inventory knows for the VM.
"""

from __future__ import annotations

from dataclasses import dataclass

from oma.store.rows import row_dict
from pyapp.api import ApiError
from pyapp.db import Connection, Database


@dataclass(frozen=True)
class DiskSpec:
    """A disk a job copies: its VMware key (``disk-2000``) and its capacity (None: unknown)."""

    id: str
    capacity_bytes: int | None = None


@dataclass(frozen=True)
class SourceVm:
    """The VM a new job is for, as the request names it; ``disks`` empty: every disk the inventory
    knows for it."""

    name: str
    path: str
    id: str | None = None
    datacenter: str = ""
    disks: tuple[DiskSpec, ...] = ()


@dataclass(frozen=True)
class VmIdentity:
    """A VM as the replicas know it: its vCenter and its managed object id there (``path:<path>``
    when nobody knows the id)."""

    vcenter: str
    vm_id: str


async def resolve_identity(conn: Database | Connection, vm: SourceVm, vcenter_host: str) -> VmIdentity:
    """The identity of ``vm``: ``source_vm.id`` within ``vcenter_host`` (else the inventory's
    vCenter for that id); without an id, the inventory's VM at ``source_vm.path``; else the path."""
    if vm.id:
        vcenter = vcenter_host or await conn.fetchval("SELECT vcenter_host FROM vms WHERE id = $1", vm.id)
        return VmIdentity(vcenter or "", vm.id)
    rows = await conn.fetch(
        "SELECT id, vcenter_host FROM vms WHERE path = $1 AND ($2 = '' OR vcenter_host = $2) LIMIT 2",
        vm.path,
        vcenter_host,
    )
    if len(rows) > 1:
        raise ApiError.conflict(
            f"the inventory has VMs at {vm.path!r} in several vCenters: give vcenter_host or source_vm.id"
        )
    if rows:
        return VmIdentity(vcenter_host or rows[0]["vcenter_host"], rows[0]["id"])
    return VmIdentity(vcenter_host, f"path:{vm.path}")


async def disks_for(conn: Database | Connection, vm: SourceVm) -> list[DiskSpec]:
    """The disks a job for ``vm`` copies: the ones it lists, else the inventory's (422: none)."""
    if vm.disks:
        return list(vm.disks)
    # By id when the request names the VM (another VM may sit at the same path), else by path.
    row = await conn.fetchrow(
        "SELECT disks FROM vms WHERE CASE WHEN $1::text IS NOT NULL THEN id = $1 ELSE path = $2 END"
        " ORDER BY updated_at DESC LIMIT 1",
        vm.id,
        vm.path,
    )
    disks = row_dict(row)["disks"] if row else []
    found = [
        DiskSpec(id=str(d["id"]), capacity_bytes=d.get("capacity_bytes"))
        for d in disks
        if isinstance(d, dict) and d.get("id")
    ]
    if not found:
        raise ApiError.unprocessable(
            "source_vm.disks is empty and the inventory knows no disk for this VM; list the disks"
        )
    return found
