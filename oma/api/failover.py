"""Failover (the seed's "Failover (Enhanced + Unified)"), the test failover so far: HTTP only —
parse, call the failover engine (:mod:`oma.failover.engine`), answer.

``{vm_id}`` is a managed VM's context id, VMware id or name. Starting and ending a failover needs
an operator; reading jobs and readiness, a viewer. ``POST /failover/test`` answers 201 with the
job as it starts: its steps run in the engine and ``GET /failover/{job_id}/status`` follows them.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import Field, model_validator
from quart import Blueprint
from quart_schema import validate_querystring, validate_request

from oma.api.access import current_principal, requires
from oma.api.requests import MAX_NAME, QueryModel, RequestModel
from oma.failover import jobs
from oma.failover.engine import NOT_RUNNING, FailoverEngine
from oma.state import state
from pyapp.api import ApiError

bp = Blueprint("failover", __name__)

MAX_JOBS = 500


class TestFailoverRequest(RequestModel):
    vm_id: str | None = Field(
        None, min_length=1, max_length=MAX_NAME, description="context id, VMware id or name"
    )
    vm_name: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    vm_context_id: str | None = Field(None, min_length=1, max_length=MAX_NAME)

    @model_validator(mode="after")
    def _one_vm(self) -> Self:
        if sum(v is not None for v in (self.vm_id, self.vm_name, self.vm_context_id)) != 1:
            raise ValueError("give one of vm_id, vm_name or vm_context_id")
        return self


class JobsQuery(QueryModel):
    status: str | None = Field(None, max_length=32)
    vm_name: str | None = Field(None, max_length=MAX_NAME)
    limit: int = Field(100, ge=1, le=MAX_JOBS)


def engine() -> FailoverEngine:
    found = state().failover
    if found is None:
        raise ApiError(503, NOT_RUNNING, "the failover engine is not running on this OMA")
    return found


@bp.post("/failover/test")
@requires("operator")
@validate_request(TestFailoverRequest)
async def start_test(data: TestFailoverRequest) -> tuple[dict[str, Any], int]:
    vm = data.vm_context_id or data.vm_id or data.vm_name or ""
    job = await engine().start_test(vm, current_principal().subject)
    return {"job_id": job["id"], "job": job}, 201


@bp.delete("/failover/test/<job_id>")
@requires("operator")
async def end_test(job_id: str) -> dict[str, Any]:
    job = await engine().end_test(job_id)
    return {"job_id": job_id, "status": job["status"], "job": job}


@bp.get("/failover/<job_id>/status")
@requires("viewer")
async def job_status(job_id: str) -> dict[str, Any]:
    return await jobs.job_status(state().db, job_id)


@bp.get("/failover/jobs")
@requires("viewer")
@validate_querystring(JobsQuery)
async def list_jobs(query_args: JobsQuery) -> dict[str, Any]:
    found = await jobs.list_jobs(
        state().db, status=query_args.status, vm_name=query_args.vm_name, limit=query_args.limit
    )
    return {"jobs": found, "count": len(found)}


@bp.get("/failover/<vm_id>/readiness")
@requires("viewer")
async def readiness(vm_id: str) -> dict[str, Any]:
    return await engine().readiness(vm_id)
