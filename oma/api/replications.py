"""Replications, ChangeID (CBT) and the progress proxy: the HTTP side.

Each route parses and validates its request, calls one function of the replication domain
(:mod:`oma.replication`: :mod:`~oma.replication.creation`, :mod:`~oma.replication.jobs`,
:mod:`~oma.replication.change_ids`, :mod:`~oma.replication.progress`) and renders its answer; the
domain's rules (identity, bases, the status machine, locks) are documented there.
``GET /replications/changeid`` answers for the VM's current volume (``change_id: null``: "no
base: copy everything").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from oma.api.access import allow_vma, current_principal, requires
from oma.api.requests import (
    MAX_NAME,
    MAX_TEXT,
    PageQuery,
    QueryModel,
    RequestModel,
    SerialId,
    json_response,
    not_cut_short,
)
from oma.replication import change_ids
from oma.replication.creation import create_job
from oma.replication.identity import DiskSpec, SourceVm
from oma.replication.jobs import JobUpdate, delete_job, get_job, list_jobs, update_job
from oma.replication.progress import job_progress
from oma.replication.volumes import delete_job_volumes
from oma.state import state
from oma.vma_client import VmaError, VmaJobNotFound, VmaUnreachable
from pyapp.api import JOB_NOT_FOUND, OPERATION_FAILED, ApiError

bp = Blueprint("replications", __name__)


class SourceDisk(RequestModel):
    id: str = Field(min_length=1, max_length=MAX_NAME, description="VMware disk key, e.g. disk-2000")
    path: str | None = Field(None, max_length=MAX_TEXT)
    capacity_bytes: int | None = Field(None, ge=0)


class SourceVM(RequestModel):
    id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME,
        pattern=r"^[^:\s/]+$",
        description="VMware managed object id (e.g. vm-143): with the vCenter, the VM's identity",
    )
    name: str = Field(min_length=1, max_length=MAX_NAME)
    path: str = Field(min_length=1, max_length=MAX_TEXT, description="inventory path, /DC/vm/NAME")
    datacenter: str = Field("", max_length=MAX_NAME)
    disks: list[SourceDisk] = Field(
        default_factory=list, max_length=64, description="disks to copy; empty: every disk in the inventory"
    )


class CreateReplicationRequest(RequestModel):
    source_vm: SourceVM
    vcenter_host: str = Field("", max_length=MAX_NAME)
    replication_type: Literal["initial", "incremental"] | None = Field(
        None, description="omitted: incremental when every disk has a stored change ID, else initial"
    )
    credential_id: SerialId | None = Field(
        None, description="VMware credential to run the job with; omitted: the VM's, else the default"
    )


class UpdateReplicationRequest(RequestModel):
    status: Literal["pending", "replicating", "completed", "failed", "cancelled"] | None = None
    progress_percent: float | None = Field(None, ge=0, le=100)
    bytes_transferred: int | None = Field(None, ge=0)
    total_bytes: int | None = Field(None, ge=0)
    current_operation: str | None = Field(None, max_length=MAX_TEXT)
    error_message: str | None = Field(None, max_length=MAX_TEXT)


class ReplicationListQuery(PageQuery):
    status: Literal["pending", "replicating", "completed", "failed", "cancelled"] | None = None
    vm_name: str | None = Field(None, max_length=MAX_NAME)


class ChangeIdQuery(QueryModel):
    vm_path: str = Field(min_length=1, max_length=MAX_TEXT)
    disk_id: str = Field(min_length=1, max_length=MAX_NAME)


class StoreChangeIdRequest(RequestModel):
    disk_id: str = Field(min_length=1, max_length=MAX_NAME)
    change_id: str = Field(min_length=1, max_length=1024)
    vm_path: str | None = Field(
        None, max_length=MAX_TEXT, description="sent by the VMA; must be the job's VM when given"
    )


@bp.get("/replications")
@requires("viewer")
@allow_vma
@validate_querystring(ReplicationListQuery)
async def list_replications(query_args: ReplicationListQuery) -> Response:
    page = await list_jobs(state().db, query_args, status=query_args.status, vm_name=query_args.vm_name)
    return json_response(page)


@bp.post("/replications")
@requires("operator")
@allow_vma
@validate_request(CreateReplicationRequest)
async def create_replication(data: CreateReplicationRequest) -> tuple[dict[str, Any], int]:
    st, vm = state(), data.source_vm
    ids = [d.id for d in vm.disks]
    if len(set(ids)) != len(ids):
        raise ApiError.unprocessable("source_vm.disks lists a disk twice")
    source = SourceVm(
        name=vm.name,
        path=vm.path,
        id=vm.id,
        datacenter=vm.datacenter,
        disks=tuple(DiskSpec(d.id, d.capacity_bytes) for d in vm.disks),
    )
    job = await create_job(
        st.db,
        st.job_events,
        source,
        vcenter_host=data.vcenter_host,
        replication_type=data.replication_type,
        credential_id=data.credential_id,
        created_by=current_principal().subject,
    )
    return job, 201


@bp.get("/replications/changeid")
@requires("viewer")
@allow_vma
@validate_querystring(ChangeIdQuery)
async def get_previous_change_id(query_args: ChangeIdQuery) -> dict[str, Any]:
    """The latest change ID of the current volume of the VM last replicated from ``vm_path``: none
    when that volume is being made anew (or failed), whatever older volumes or VMs stored. For a
    path whose jobs never had a volume (run outside the engine), the latest one recorded."""
    return await change_ids.latest_change_id(state().db, query_args.vm_path, query_args.disk_id)


@bp.get("/replications/<job_id>")
@requires("viewer")
@allow_vma
async def get_replication(job_id: str) -> dict[str, Any]:
    return await get_job(state().db, job_id)


@bp.put("/replications/<job_id>")
@requires("operator")
@allow_vma
@validate_request(UpdateReplicationRequest)
async def update_replication(job_id: str, data: UpdateReplicationRequest) -> dict[str, Any]:
    if not data.model_dump(exclude_unset=True):
        raise ApiError.unprocessable("nothing to update")
    st = state()
    with not_cut_short():
        return await update_job(st.db, st.job_events, job_id, JobUpdate(**data.model_dump()))


class DeleteReplicationQuery(QueryModel):
    delete_volumes: bool = Field(
        False,
        description="also delete the volumes the job wrote into: CloudStack volumes are detached"
        " from the OMA VM and deleted, files removed (the next pass of the disks is a full one)",
    )


@bp.delete("/replications/<job_id>")
@requires("operator")
@validate_querystring(DeleteReplicationQuery)
async def delete_replication(job_id: str, query_args: DeleteReplicationQuery) -> dict[str, Any]:
    st = state()
    with not_cut_short():
        deleted = (
            await delete_job_volumes(st.db, st.replica_volumes, job_id) if query_args.delete_volumes else []
        )
        await delete_job(st.db, job_id)
    answer: dict[str, Any] = {"message": "replication job deleted", "job_id": job_id}
    if query_args.delete_volumes:
        answer["volumes_deleted"] = deleted
    return answer


@bp.post("/replications/<job_id>/changeid")
@requires("operator")
@allow_vma
@validate_request(StoreChangeIdRequest)
async def store_change_id(job_id: str, data: StoreChangeIdRequest) -> tuple[dict[str, Any], int]:
    with not_cut_short():
        stored = await change_ids.store_change_id(
            state().db, job_id, data.disk_id, data.change_id, vm_path=data.vm_path
        )
    return stored, 201


def _vma_api_error(exc: VmaError, job_id: str) -> ApiError:
    if isinstance(exc, VmaJobNotFound):
        return ApiError.not_found(f"the VMA has no job {job_id!r}", JOB_NOT_FOUND)
    if isinstance(exc, VmaUnreachable):
        return ApiError.upstream(exc.message)
    return ApiError(502, OPERATION_FAILED, exc.message)


@bp.get("/progress/<job_id>")
@requires("viewer")
@allow_vma
async def vma_progress_proxy(job_id: str) -> dict[str, Any]:
    try:
        return await state().vma.progress(job_id)
    except VmaError as exc:
        raise _vma_api_error(exc, job_id) from exc


@bp.get("/replications/<job_id>/progress")
@requires("viewer")
@allow_vma
async def replication_progress(job_id: str) -> dict[str, Any]:
    st = state()
    return await job_progress(st.db, st.vma, job_id)
