"""VM-centric architecture: one context per VM under management, with its jobs.

A context is one VM identity (vCenter, managed object id), whatever its name: two VMs of the
same name have two contexts. ``GET /vm-contexts/{vm_name}`` takes a context id or a name; a name
that several managed VMs share answers 409 with their context ids.

``GET /vm-contexts/ungrouped`` (alias of ``/discovery/ungrouped-vms``) is a static route and so
wins over ``/vm-contexts/{vm_name}``: a VM literally named ``ungrouped`` is reached through the
list endpoint's ``search``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from quart import Blueprint
from quart_schema import validate_querystring

from oma.api.access import requires
from oma.api.replications import JOB_COLUMNS
from oma.api.requests import MAX_NAME, PageQuery
from oma.state import state
from oma.store.pages import page_body
from oma.store.rows import row_dict
from pyapp.api import ApiError
from pyapp.db import Database

bp = Blueprint("vm_contexts", __name__)

CONTEXT_COLUMNS = (
    "context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, datacenter, credential_id, machine_group_id,"
    " current_status, current_job_id, auto_added, cpu_count, memory_mb, os_type, power_state, total_jobs,"
    " successful_jobs, failed_jobs, last_job_at, created_at, updated_at"
)


class ContextListQuery(PageQuery):
    search: str | None = Field(None, max_length=MAX_NAME)
    status: str | None = Field(None, max_length=64)


class RecentJobsQuery(PageQuery):
    limit: int = Field(10, ge=1, le=1000)


async def list_ungrouped(db: Database, page: PageQuery) -> dict[str, Any]:
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


@bp.get("/vm-contexts")
@requires("viewer")
@validate_querystring(ContextListQuery)
async def list_vm_contexts(query_args: ContextListQuery) -> dict[str, Any]:
    db = state().db
    pattern = None if query_args.search is None else f"%{query_args.search}%"
    where = "($1::text IS NULL OR vm_name ILIKE $1) AND ($2::text IS NULL OR current_status = $2)"
    rows = await db.fetch(
        f"SELECT {CONTEXT_COLUMNS}, (SELECT count(*) FROM vm_contexts WHERE {where}) AS total_count"
        f" FROM vm_contexts WHERE {where} ORDER BY vm_name LIMIT $3 OFFSET $4",
        pattern,
        query_args.status,
        query_args.limit,
        query_args.offset,
    )
    total = (
        rows[0]["total_count"]
        if rows
        else await db.fetchval(f"SELECT count(*) FROM vm_contexts WHERE {where}", pattern, query_args.status)
    )
    return page_body("vm_contexts", [row_dict(r, exclude=("total_count",)) for r in rows], total, query_args)


@bp.get("/vm-contexts/ungrouped")
@requires("viewer")
@validate_querystring(PageQuery)
async def ungrouped_alias(query_args: PageQuery) -> dict[str, Any]:
    return await list_ungrouped(state().db, query_args)


@bp.get("/vm-contexts/<vm_name>")
@requires("viewer")
async def get_vm_context(vm_name: str) -> dict[str, Any]:
    db = state().db
    rows = await db.fetch(
        f"SELECT {CONTEXT_COLUMNS} FROM vm_contexts WHERE context_id = $1"
        " UNION ALL"
        f" SELECT {CONTEXT_COLUMNS} FROM vm_contexts WHERE vm_name = $1"
        " AND NOT EXISTS (SELECT 1 FROM vm_contexts WHERE context_id = $1) ORDER BY context_id LIMIT 10",
        vm_name,
    )
    if not rows:
        raise ApiError.not_found(f"no VM context for {vm_name!r}")
    if len(rows) > 1:
        ids = ", ".join(f"{r['context_id']} ({r['vm_path']})" for r in rows)
        raise ApiError.conflict(f"several managed VMs are named {vm_name!r}: ask by context id: {ids}")
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


@bp.get("/vm-contexts/<context_id>/recent-jobs")
@requires("viewer")
@validate_querystring(RecentJobsQuery)
async def recent_jobs(context_id: str, query_args: RecentJobsQuery) -> dict[str, Any]:
    db = state().db
    if not await db.fetchval("SELECT EXISTS (SELECT 1 FROM vm_contexts WHERE context_id = $1)", context_id):
        raise ApiError.not_found(f"no VM context {context_id!r}")
    rows = await db.fetch(
        f"SELECT {JOB_COLUMNS} FROM replication_jobs WHERE vm_context_id = $1"
        " ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3",
        context_id,
        query_args.limit,
        query_args.offset,
    )
    total = await db.fetchval("SELECT count(*) FROM replication_jobs WHERE vm_context_id = $1", context_id)
    body = page_body("jobs", [row_dict(r) for r in rows], total, query_args)
    body["context_id"] = context_id
    return body
