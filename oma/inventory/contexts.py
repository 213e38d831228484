"""VM contexts (``vm_contexts``): one per VM under management, with its jobs.

A context is one VM identity (vCenter, managed object id), whatever its name: two VMs of the
same name have two contexts. A context is read by its id or by its name; a name that several
managed VMs share is refused (409) with their context ids.
"""

from __future__ import annotations

from typing import Any

from oma.replication.jobs import JOB_COLUMNS
from oma.store.pages import Page, page_body
from oma.store.rows import row_dict
from pyapp.api import ApiError
from pyapp.db import Database

CONTEXT_COLUMNS = (
    "context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, datacenter, credential_id, machine_group_id,"
    " current_status, current_job_id, auto_added, cpu_count, memory_mb, os_type, power_state, total_jobs,"
    " successful_jobs, failed_jobs, last_job_at, created_at, updated_at"
)


async def list_ungrouped(db: Database, page: Page) -> dict[str, Any]:
    """The contexts that belong to no machine group, by name."""
    rows = await db.fetch(
        f"SELECT {CONTEXT_COLUMNS}, (SELECT count(*) FROM vm_contexts WHERE machine_group_id IS NULL)"
        " AS total_count FROM vm_contexts WHERE machine_group_id IS NULL ORDER BY vm_name LIMIT $1 OFFSET $2",
        page.limit,
        page.offset,
    )
    total = (
        rows[0]["total_count"]
        if rows
        else await db.fetchval("SELECT count(*) FROM vm_contexts WHERE machine_group_id IS NULL")
    )
    return page_body("vms", [row_dict(r, exclude=("total_count",)) for r in rows], total, page)


async def context_page(db: Database, search: str | None, status: str | None, page: Page) -> dict[str, Any]:
    """A page of the contexts by name (``search``: a substring, case-insensitive; ``status``: the
    current status)."""
    pattern = None if search is None else f"%{search}%"
    where = "($1::text IS NULL OR vm_name ILIKE $1) AND ($2::text IS NULL OR current_status = $2)"
    rows = await db.fetch(
        f"SELECT {CONTEXT_COLUMNS}, (SELECT count(*) FROM vm_contexts WHERE {where}) AS total_count"
        f" FROM vm_contexts WHERE {where} ORDER BY vm_name LIMIT $3 OFFSET $4",
        pattern,
        status,
        page.limit,
        page.offset,
    )
    total = (
        rows[0]["total_count"]
        if rows
        else await db.fetchval(f"SELECT count(*) FROM vm_contexts WHERE {where}", pattern, status)
    )
    return page_body("vm_contexts", [row_dict(r, exclude=("total_count",)) for r in rows], total, page)


async def get_context(db: Database, id_or_name: str) -> dict[str, Any]:
    """The context (by id, else by name), its current job, its last ten jobs and the disks and
    networks the inventory lists for its VM."""
    rows = await db.fetch(
        f"SELECT {CONTEXT_COLUMNS} FROM vm_contexts WHERE context_id = $1"
        " UNION ALL"
        f" SELECT {CONTEXT_COLUMNS} FROM vm_contexts WHERE vm_name = $1"
        " AND NOT EXISTS (SELECT 1 FROM vm_contexts WHERE context_id = $1) ORDER BY context_id LIMIT 10",
        id_or_name,
    )
    if not rows:
        raise ApiError.not_found(f"no VM context for {id_or_name!r}")
    if len(rows) > 1:
        ids = ", ".join(f"{r['context_id']} ({r['vm_path']})" for r in rows)
        raise ApiError.conflict(f"several managed VMs are named {id_or_name!r}: ask by context id: {ids}")
    context = row_dict(rows[0])
    current = None
    if context["current_job_id"]:
        job = await db.fetchrow(
            f"SELECT {JOB_COLUMNS} FROM replication_jobs WHERE id = $1", context["current_job_id"]
        )
        current = row_dict(job) if job else None
    jobs = await db.fetch(
        f"SELECT {JOB_COLUMNS} FROM replication_jobs WHERE vm_context_id = $1"
        " ORDER BY created_at DESC, id DESC LIMIT 10",
        context["context_id"],
    )
    inventory = await db.fetchrow(
        "SELECT disks, networks FROM vms WHERE id = $1 AND ($2 = '' OR vcenter_host = $2)",
        context["vmware_vm_id"],
        context["vcenter_host"],
    )
    inv = row_dict(inventory) if inventory else {"disks": [], "networks": []}
    return {
        "context": context,
        "current_job": current,
        "job_history": [row_dict(j) for j in jobs],
        "disks": inv["disks"],
        "networks": inv["networks"],
    }


async def recent_jobs(db: Database, context_id: str, page: Page) -> dict[str, Any]:
    """A page of the context's replication jobs, newest first."""
    if not await db.fetchval("SELECT EXISTS (SELECT 1 FROM vm_contexts WHERE context_id = $1)", context_id):
        raise ApiError.not_found(f"no VM context {context_id!r}")
    rows = await db.fetch(
        f"SELECT {JOB_COLUMNS} FROM replication_jobs WHERE vm_context_id = $1"
        " ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3",
        context_id,
        page.limit,
        page.offset,
    )
    total = await db.fetchval("SELECT count(*) FROM replication_jobs WHERE vm_context_id = $1", context_id)
    body = page_body("jobs", [row_dict(r) for r in rows], total, page)
    body["context_id"] = context_id
    return body
