"""VM-centric architecture: one context per VM under management, with its jobs
(:mod:`oma.inventory.contexts`).

``GET /vm-contexts/{vm_name}`` takes a context id or a name; a name that several managed VMs share
answers 409 with their context ids.

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
from oma.api.requests import MAX_NAME, PageQuery
from oma.inventory import contexts
from oma.state import state

bp = Blueprint("vm_contexts", __name__)


class ContextListQuery(PageQuery):
    search: str | None = Field(None, max_length=MAX_NAME)
    status: str | None = Field(None, max_length=64)


class RecentJobsQuery(PageQuery):
    limit: int = Field(10, ge=1, le=1000)


@bp.get("/vm-contexts")
@requires("viewer")
@validate_querystring(ContextListQuery)
async def list_vm_contexts(query_args: ContextListQuery) -> dict[str, Any]:
    return await contexts.context_page(state().db, query_args.search, query_args.status, query_args)


@bp.get("/vm-contexts/ungrouped")
@requires("viewer")
@validate_querystring(PageQuery)
async def ungrouped_alias(query_args: PageQuery) -> dict[str, Any]:
    return await contexts.list_ungrouped(state().db, query_args)


@bp.get("/vm-contexts/<vm_name>")
@requires("viewer")
async def get_vm_context(vm_name: str) -> dict[str, Any]:
    return await contexts.get_context(state().db, vm_name)


@bp.get("/vm-contexts/<context_id>/recent-jobs")
@requires("viewer")
@validate_querystring(RecentJobsQuery)
async def recent_jobs(context_id: str, query_args: RecentJobsQuery) -> dict[str, Any]:
    return await contexts.recent_jobs(state().db, context_id, query_args)
