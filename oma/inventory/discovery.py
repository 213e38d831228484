"""Discovery: VMs found through the VMA's ``POST /api/v1/discover``, added to management as VM
contexts without creating any job.

- :func:`discover_vms`: discover, refresh the inventory, optionally add every VM found;
- :func:`add_vms`: add the named VMs (every VM of a name, or one VM by inventory path; names not
  found in vCenter are reported, not invented);
- :func:`bulk_add`: add every VM matching the filter (optionally skipping powered-off ones);
- :func:`preview`: discover and tell which VMs are new, persisting nothing.

A VM is known by its identity (the vCenter and the VM's managed object id), never by its name:
two VMs of one name are two contexts, and a renamed VM keeps its context (its name follows).

The vCenter login comes from a stored credential (``credential_id``, else the default one:
:func:`oma.credentials.vmware.resolve_login`), and the VMA discovers with it
(:func:`oma.credentials.vmware.discover_with`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from oma.credentials.vmware import discover_with, resolve_login
from oma.crypto import SecretBox
from oma.inventory.vms import InventoryVCenter, InventoryVM, store_inventory
from oma.store.rows import new_id
from oma.vma_client import DiscoveredVM, DiscoverResult, VmaClient, VmaError, VmaUnreachable
from pyapp.api import OPERATION_FAILED, ApiError
from pyapp.db import Database
from pyapp.logs import log_context

log = logging.getLogger(__name__)


async def _discover(
    db: Database, box: SecretBox, vma: VmaClient, credential_id: int | None, filter: str
) -> tuple[DiscoverResult, int | None, float]:
    login = await resolve_login(db, box, credential_id)
    started = time.monotonic()
    try:
        result = await discover_with(vma, login, filter)
    except VmaUnreachable as exc:
        raise ApiError.upstream(exc.message) from exc
    except VmaError as exc:
        raise ApiError(502, OPERATION_FAILED, f"discovery failed: {exc.message}") from exc
    return result, login.credential_id, round((time.monotonic() - started) * 1000, 1)


async def _persist_inventory(db: Database, result: DiscoverResult) -> None:
    vcenter = InventoryVCenter(host=result.vcenter.host, datacenter=result.vcenter.datacenter)
    vms = [InventoryVM.model_validate(vm.model_dump()) for vm in result.vms]
    await store_inventory(db, vcenter, vms, "discovery")


async def _existing_contexts(db: Database, vcenter: str, vms: Iterable[DiscoveredVM]) -> dict[str, str]:
    """VM id -> context id of the discovered VMs already managed."""
    rows = await db.fetch(
        "SELECT vmware_vm_id, context_id FROM vm_contexts WHERE vcenter_host = $1"
        " AND vmware_vm_id = ANY($2::text[])",
        vcenter,
        [vm.id for vm in vms],
    )
    return {r["vmware_vm_id"]: r["context_id"] for r in rows}


async def _add_contexts(
    db: Database, result: DiscoverResult, vms: list[DiscoveredVM], credential_id: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Create a context per VM; returns (added, skipped-because-already-managed)."""
    added: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    async with db.transaction() as conn:
        for vm in vms:
            context_id = await conn.fetchval(
                "INSERT INTO vm_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, "
                "datacenter,"
                " credential_id, auto_added, cpu_count, memory_mb, os_type, power_state)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, true, $8, $9, $10, $11)"
                " ON CONFLICT (vcenter_host, vmware_vm_id) DO NOTHING RETURNING context_id",
                new_id("ctx"),
                vm.name,
                vm.id,
                vm.path,
                result.vcenter.host,
                result.vcenter.datacenter,
                credential_id,
                vm.num_cpu,
                vm.memory_mb,
                vm.guest_os,
                vm.power_state,
            )
            if context_id is None:
                # already managed: the name and path follow the VM (renamed or moved)
                await conn.execute(
                    "UPDATE vm_contexts SET vm_name = $3, vm_path = $4, updated_at = now()"
                    " WHERE vcenter_host = $1 AND vmware_vm_id = $2 AND (vm_name, vm_path) IS"
                    " DISTINCT FROM ($3, $4)",
                    result.vcenter.host,
                    vm.id,
                    vm.name,
                    vm.path,
                )
                skipped.append({"vm_name": vm.name, "vm_id": vm.id, "reason": "already managed"})
            else:
                added.append(
                    {"vm_name": vm.name, "context_id": context_id, "vm_id": vm.id, "vm_path": vm.path}
                )
    return added, skipped


def _vm_view(vm: DiscoveredVM, existing: dict[str, str]) -> dict[str, Any]:
    view = vm.model_dump()
    view["existing"] = vm.id in existing
    view["context_id"] = existing.get(vm.id)
    return view


async def discover_vms(
    db: Database,
    box: SecretBox,
    vma: VmaClient,
    *,
    credential_id: int | None,
    filter: str,
    create_context: bool,
) -> dict[str, Any]:
    """Discover, refresh the inventory, and with ``create_context`` add every VM found."""
    with log_context(action="discovery"):
        result, used_credential, duration = await _discover(db, box, vma, credential_id, filter)
        await _persist_inventory(db, result)
        added: list[dict[str, Any]] = []
        if create_context:
            added, _ = await _add_contexts(db, result, result.vms, used_credential)
        existing = await _existing_contexts(db, result.vcenter.host, result.vms)
        log.info("discovery done", extra={"vm_count": len(result.vms), "contexts_created": len(added)})
    return {
        "vcenter": result.vcenter.model_dump(),
        "discovered_vms": [_vm_view(vm, existing) for vm in result.vms],
        "count": len(result.vms),
        "contexts_created": len(added),
        "added": added,
        "duration_ms": duration,
    }


async def add_vms(
    db: Database, box: SecretBox, vma: VmaClient, *, credential_id: int | None, vm_names: list[str]
) -> dict[str, Any]:
    """Add the VMs ``vm_names`` names: a name adds every VM of that name (names are not unique),
    an inventory path adds one VM."""
    with log_context(action="discovery_add"):
        result, used_credential, _ = await _discover(db, box, vma, credential_id, "")
        await _persist_inventory(db, result)
        wanted = list(dict.fromkeys(vm_names))
        found = [vm for vm in result.vms if vm.name in wanted or vm.path in wanted]
        seen = {vm.name for vm in found} | {vm.path for vm in found}
        not_found = [n for n in wanted if n not in seen]
        added, skipped = await _add_contexts(db, result, found, used_credential)
        log.info("VMs added", extra={"added": len(added), "not_found": len(not_found)})
    return {"added": added, "skipped": skipped, "not_found": not_found, "added_count": len(added)}


async def bulk_add(
    db: Database,
    box: SecretBox,
    vma: VmaClient,
    *,
    credential_id: int | None,
    filter: str,
    exclude_powered_off: bool,
) -> dict[str, Any]:
    """Add every VM the filter discovers (with ``exclude_powered_off``, only powered-on ones)."""
    with log_context(action="discovery_bulk_add"):
        result, used_credential, _ = await _discover(db, box, vma, credential_id, filter)
        await _persist_inventory(db, result)
        chosen = [vm for vm in result.vms if not (exclude_powered_off and vm.power_state != "poweredOn")]
        added, skipped = await _add_contexts(db, result, chosen, used_credential)
        log.info("bulk add done", extra={"added": len(added), "skipped": len(skipped)})
    return {
        "added": added,
        "skipped": skipped,
        "excluded": len(result.vms) - len(chosen),
        "discovered": len(result.vms),
        "added_count": len(added),
    }


async def preview(
    db: Database, box: SecretBox, vma: VmaClient, *, credential_id: int | None, filter: str
) -> dict[str, Any]:
    """Discover and tell which VMs are new; nothing is stored."""
    result, _, duration = await _discover(db, box, vma, credential_id, filter)
    existing = await _existing_contexts(db, result.vcenter.host, result.vms)
    views = [_vm_view(vm, existing) for vm in result.vms]
    return {
        "vcenter": result.vcenter.model_dump(),
        "vms": views,
        "total": len(views),
        "new_count": sum(1 for v in views if not v["existing"]),
        "existing_count": sum(1 for v in views if v["existing"]),
        "duration_ms": duration,
    }
