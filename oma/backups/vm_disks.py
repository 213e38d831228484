"""Which managed VM and which of its disks a backup request names.

A VM is named by its context (``vm_context_id``) and/or its display name (``vm_name``); a name
two managed VMs share is refused rather than guessed. Backups are keyed by the VM's identity
(:func:`oma.backups.layout.vm_key`), never by a name. Disks are named as the inventory names them
(``disk-2000``); like replication, a request may also give the disk's key (``2000``) or its index
among the VM's disks (``0``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from oma.backups.layout import vm_key
from pyapp.api import ApiError
from pyapp.db import Database, Record

AMBIGUOUS_VM = "AMBIGUOUS_VM"
VM_IDENTITY_UNKNOWN = "VM_IDENTITY_UNKNOWN"


def resolve_disk_id(requested: str, known: Sequence[str]) -> str | None:
    """The disk ``requested`` names among ``known`` (in the VM's order): its id (``disk-2000``),
    its key (``2000``) or its index (``0``). None when it names none of them."""
    if requested in known:
        return requested
    if requested.isdigit():
        if f"disk-{requested}" in known:
            return f"disk-{requested}"
        index = int(requested)
        if index < len(known):
            return known[index]
    return None


async def inventory_disks(db: Database, vmware_vm_id: str | None, vm_path: str) -> list[str]:
    """The VM's disk ids in inventory order (empty when the inventory does not know the VM)."""
    row = await db.fetchrow(
        "SELECT disks FROM vms WHERE ($1::text IS NOT NULL AND id = $1) OR path = $2 LIMIT 1",
        vmware_vm_id,
        vm_path,
    )
    disks = (
        json.loads(row["disks"]) if row and isinstance(row["disks"], str) else (row["disks"] if row else [])
    )
    return [str(d["id"]) for d in disks if isinstance(d, dict) and d.get("id")]


async def find_context(
    db: Database, vm_name: str | None, vm_context_id: str | None, *, required: bool = True
) -> Record | None:
    """The VM context a request names by ``vm_context_id`` and/or ``vm_name``. Names are for
    display only: a name that two managed VMs share (one name in two folders) is refused with
    409 ``AMBIGUOUS_VM`` rather than guessed. None (``required`` off) when nothing matches."""
    if vm_name is None and vm_context_id is None:
        raise ApiError.unprocessable("vm_name or vm_context_id is required")
    rows = await db.fetch(
        "SELECT context_id, vm_name, vm_path, vmware_vm_id, vcenter_host FROM vm_contexts"
        " WHERE ($1::text IS NULL OR vm_name = $1) AND ($2::text IS NULL OR context_id = $2)"
        " ORDER BY context_id LIMIT 10",
        vm_name,
        vm_context_id,
    )
    if len(rows) > 1:
        raise ApiError(
            409,
            AMBIGUOUS_VM,
            f"{len(rows)} managed VMs are named {vm_name!r}"
            f" ({', '.join(str(r['context_id']) + ' at ' + str(r['vm_path']) for r in rows)}):"
            " give vm_context_id",
        )
    if not rows:
        if not required:
            return None
        if vm_context_id is not None:
            raise ApiError.not_found(f"no VM context {vm_context_id!r} (with vm_name {vm_name!r})")
        raise ApiError.not_found(
            f"VM {vm_name!r} is not managed (no VM context): add it through discovery first"
        )
    row: Record = rows[0]
    return row


def context_key(ctx: Record) -> str:
    """The stable identity a context's backups are keyed by (oma/backups/layout.py)."""
    if not ctx["vmware_vm_id"]:
        raise ApiError(
            409,
            VM_IDENTITY_UNKNOWN,
            f"the managed object id of VM {ctx['vm_name']!r} is unknown, and backups are keyed by it,"
            " never by a name: run a discovery of the VM first",
        )
    return vm_key(ctx["vcenter_host"] or "", ctx["vmware_vm_id"])
