"""Network mappings: for each managed VM, which CloudStack network each of its source (vSphere)
networks becomes at failover — one mapping for a live failover and, apart, one for a test
failover (``is_test_network``).

A mapping belongs to a VM context (``network_mappings.vm_context_id``, deleted with it), so it
follows the VM's identity, not its name. A VM is named in paths and bodies by its context id, its
VMware id (``vm-123``) or its name; a name or id several managed VMs share is refused (409) with
their context ids. A mapping's destination must be a network of the active CloudStack settings
(checked when the mapping is made; its name is taken from CloudStack), and its source one of the
VM's networks when the inventory knows them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from oma.cloudstack.client import CloudStackClient, CloudStackError
from oma.cloudstack.resources import networks as list_networks
from oma.store.pages import Page, json_page
from pyapp.api import ApiError
from pyapp.db import Database, Record

log = logging.getLogger(__name__)

VM_COLUMNS = "context_id, vm_name, vmware_vm_id, vcenter_host, vm_path"
MAPPING_COLUMNS = (
    "id, vm_context_id, vm_id, vm_name, vcenter_host, source_network_name, destination_network_id,"
    " destination_network_name, is_test_network, created_by, created_at, updated_at"
)
_MAPPINGS = (
    "SELECT m.id, m.vm_context_id, c.vmware_vm_id AS vm_id, c.vm_name, c.vcenter_host, m.source_network_name,"
    " m.destination_network_id, m.destination_network_name, m.is_test_network, m.created_by, m.created_at,"
    " m.updated_at FROM network_mappings m JOIN vm_contexts c ON c.context_id = m.vm_context_id"
)


async def resolve_vm(db: Database, vm: str) -> Record:
    """The managed VM ``vm`` names: a context id, else a VMware id, else a name (404 when none,
    409 when several VMs answer to it)."""
    rows = await db.fetch(f"SELECT {VM_COLUMNS} FROM vm_contexts WHERE context_id = $1", vm)
    if not rows:
        rows = await db.fetch(
            f"SELECT {VM_COLUMNS} FROM vm_contexts WHERE vmware_vm_id = $1 ORDER BY context_id LIMIT 10", vm
        )
    if not rows:
        rows = await db.fetch(
            f"SELECT {VM_COLUMNS} FROM vm_contexts WHERE vm_name = $1 ORDER BY context_id LIMIT 10", vm
        )
    if not rows:
        raise ApiError.not_found(f"no managed VM {vm!r} (a context id, VMware VM id or name)")
    if len(rows) > 1:
        ids = ", ".join(f"{r['context_id']} ({r['vcenter_host']} {r['vm_path']})" for r in rows)
        raise ApiError.conflict(f"several managed VMs answer to {vm!r}: name one by its context id: {ids}")
    return rows[0]


def vm_view(row: Record) -> dict[str, Any]:
    return {
        "vm_context_id": row["context_id"],
        "vm_id": row["vmware_vm_id"],
        "vm_name": row["vm_name"],
        "vcenter_host": row["vcenter_host"],
    }


async def source_networks(db: Database, vm: Record) -> list[str] | None:
    """The VM's networks as the inventory knows them (None: the inventory has no networks)."""
    value = await db.fetchval(
        "SELECT networks FROM vms WHERE id = $1 AND ($2 = '' OR vcenter_host = $2)",
        vm["vmware_vm_id"],
        vm["vcenter_host"],
    )
    nics = json.loads(value) if isinstance(value, str) else value
    if not nics:
        return None
    names = [str(n["network"]) for n in nics if isinstance(n, dict) and n.get("network")]
    return sorted(set(names)) or None


async def destination(client: CloudStackClient, network_id: str) -> dict[str, Any]:
    """The CloudStack network ``network_id`` (422 when the key sees none of that id)."""
    found = [n for n in await list_networks(client) if n["id"].lower() == network_id.lower()]
    if not found:
        raise ApiError.unprocessable(f"CloudStack has no network {network_id} that the OMA's API key may use")
    return found[0]


async def create_mapping(
    db: Database,
    client: CloudStackClient,
    *,
    vm: str,
    source_network_name: str,
    destination_network_id: str,
    is_test_network: bool,
    created_by: str,
) -> tuple[dict[str, Any], bool]:
    """Map (or map anew) a source network of ``vm``: the mapping and whether it is new."""
    context = await resolve_vm(db, vm)
    known = await source_networks(db, context)
    if known is not None and source_network_name not in known:
        raise ApiError.unprocessable(
            f"VM {context['vm_name']} has no network {source_network_name!r}"
            f" (its networks: {', '.join(known)})"
        )
    network = await destination(client, destination_network_id)
    row = await db.fetchrow(
        "INSERT INTO network_mappings (vm_context_id, source_network_name, destination_network_id,"
        " destination_network_name, is_test_network, created_by) VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (vm_context_id, source_network_name, is_test_network) DO UPDATE SET"
        " destination_network_id = EXCLUDED.destination_network_id,"
        " destination_network_name = EXCLUDED.destination_network_name, updated_at = now()"
        " RETURNING id, (xmax = 0) AS created",
        context["context_id"],
        source_network_name,
        network["id"],
        network["name"],
        is_test_network,
        created_by,
    )
    assert row is not None
    log.info(
        "network mapping saved",
        extra={
            "action": "network_mapping_save",
            "vm_context_id": context["context_id"],
            "source_network": source_network_name,
            "destination_network_id": network["id"],
            "is_test_network": is_test_network,
        },
    )
    return await _mapping(db, row["id"]), bool(row["created"])


async def _mapping(db: Database, mapping_id: int) -> dict[str, Any]:
    row = await db.fetchrow(f"{_MAPPINGS} WHERE m.id = $1", mapping_id)
    assert row is not None
    return dict(row.items())


async def list_mappings(db: Database, page: Page, is_test_network: bool | None) -> str:
    """A page of every mapping (JSON, rendered by PostgreSQL), by VM name then source network."""
    return await json_page(
        db,
        "mappings",
        columns=MAPPING_COLUMNS,
        from_where=f"FROM ({_MAPPINGS}) t WHERE ($1::boolean IS NULL OR t.is_test_network = $1)",
        order=[("vm_name", "ASC"), ("vm_context_id", "ASC"), ("source_network_name", "ASC"), ("id", "ASC")],
        args=(is_test_network,),
        page=page,
    )


async def _of(db: Database, context_id: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        f"{_MAPPINGS} WHERE m.vm_context_id = $1 ORDER BY m.source_network_name, m.is_test_network",
        context_id,
    )
    return [dict(r.items()) for r in rows]


async def vm_mappings(db: Database, vm: str) -> dict[str, Any]:
    context = await resolve_vm(db, vm)
    mappings = await _of(db, context["context_id"])
    return {"vm": vm_view(context), "mappings": mappings, "count": len(mappings)}


async def mapping_status(db: Database, vm: str, client: CloudStackClient | None) -> dict[str, Any]:
    """How far the VM's networks are mapped, and whether the destinations still exist in
    CloudStack (``client`` None: CloudStack is not configured; not checked)."""
    context = await resolve_vm(db, vm)
    mappings = await _of(db, context["context_id"])
    known = await source_networks(db, context)
    live = {m["source_network_name"] for m in mappings if not m["is_test_network"]}
    test = {m["source_network_name"] for m in mappings if m["is_test_network"]}
    if known is None:
        unmapped, unmapped_test = None, None
        complete, test_complete = bool(live), bool(test)
    else:
        unmapped = [n for n in known if n not in live]
        unmapped_test = [n for n in known if n not in test]
        complete, test_complete = not unmapped, not unmapped_test
    destinations = await _destinations(client, mappings)
    if destinations["status"] == "missing":
        readiness = "broken"
    elif complete and test_complete:
        readiness = "ready"
    elif complete:
        readiness = "live_only"
    else:
        readiness = "incomplete"
    return {
        "vm": vm_view(context),
        "source_networks": known,
        "total_mappings": len(mappings),
        "live_mappings": len(live),
        "test_mappings": len(test),
        "unmapped_networks": unmapped,
        "unmapped_test_networks": unmapped_test,
        "mapping_complete": complete,
        "test_mapping_complete": test_complete,
        "destinations": destinations,
        "readiness_level": readiness,
    }


async def _destinations(client: CloudStackClient | None, mappings: list[dict[str, Any]]) -> dict[str, Any]:
    if client is None:
        return {"status": "not_checked", "message": "CloudStack is not configured", "missing": []}
    if not mappings:
        return {"status": "ok", "message": "no mapping to check", "missing": []}
    try:
        existing = {n["id"].lower() for n in await list_networks(client)}
    except CloudStackError as exc:
        return {"status": "not_checked", "message": exc.message, "missing": []}
    missing = sorted({m["destination_network_id"] for m in mappings} - existing)
    if missing:
        return {
            "status": "missing",
            "message": f"{len(missing)} destination networks no longer exist in CloudStack",
            "missing": missing,
        }
    return {"status": "ok", "message": "every destination network exists in CloudStack", "missing": []}


async def delete_mapping(
    db: Database, vm: str, source_network_name: str, is_test_network: bool | None
) -> int:
    """Delete the VM's mappings of ``source_network_name`` (live and test, or the one asked for);
    404 when there is none."""
    context = await resolve_vm(db, vm)
    deleted = await db.fetch(
        "DELETE FROM network_mappings WHERE vm_context_id = $1 AND source_network_name = $2"
        " AND ($3::boolean IS NULL OR is_test_network = $3) RETURNING id",
        context["context_id"],
        source_network_name,
        is_test_network,
    )
    if not deleted:
        raise ApiError.not_found(f"VM {context['vm_name']} has no mapping of network {source_network_name!r}")
    log.info(
        "network mapping deleted",
        extra={
            "action": "network_mapping_delete",
            "vm_context_id": context["context_id"],
            "source_network": source_network_name,
        },
    )
    return len(deleted)


async def resolve_networks(client: CloudStackClient, wanted: list[str], zone_id: str) -> dict[str, Any]:
    """CloudStack networks by id or name: ``{networks: [{query, network}], not_found, ambiguous}``.
    An id matches first; a name matching networks in several zones counts only in ``zone_id`` (the
    configured zone) and is ambiguous when it still matches several."""
    available = await list_networks(client)
    resolved: list[dict[str, Any]] = []
    not_found: list[str] = []
    ambiguous: list[dict[str, Any]] = []
    for query in wanted:
        hits = [n for n in available if n["id"].lower() == query.lower()]
        if not hits:
            hits = [n for n in available if n["name"] == query]
        if len(hits) > 1 and zone_id:
            in_zone = [n for n in hits if n["zone_id"].lower() == zone_id.lower()]
            hits = in_zone or hits
        if not hits:
            not_found.append(query)
        elif len(hits) > 1:
            ambiguous.append({"query": query, "candidates": hits})
        else:
            resolved.append({"query": query, "network_id": hits[0]["id"], "network": hits[0]})
    return {"networks": resolved, "not_found": not_found, "ambiguous": ambiguous}
