"""Replications, ChangeID (CBT) and the progress proxy.

A replication job copies the disks of one VM (all of them, or the ones listed). Each disk of a
job is a row of ``replication_job_disks``; a partial unique index allows one *active* row per VM
disk (``vm_path``, ``disk_id``), so two concurrent creations for the same disk yield one job and
one 409, decided by PostgreSQL rather than by a check-then-insert race.

Status machine::

    pending -> replicating -> completed
       |            |-------> failed
       |------------+-------> cancelled      (terminal states never change again)

Reaching a terminal state releases the disks (``active = false``) in the same transaction.

Change IDs: after a pass the VMA stores the vCenter change ID of each disk
(``POST /replications/{job_id}/changeid``); the next pass asks for it
(``GET /replications/changeid?vm_path=&disk_id=``; ``change_id: null`` means "no base: copy
everything"). A failed or cancelled job cannot record a change ID: a base that was never fully
copied would silently lose changed blocks on the next incremental pass.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from oma.api.common import MAX_NAME, MAX_TEXT, Page, iso, json_page, new_id, not_cut_short, row_dict
from oma.auth import allow_vma, current_principal
from oma.state import state
from oma.vma_client import VmaError, VmaJobNotFound, VmaUnreachable
from pyapp.api import JOB_NOT_FOUND, OPERATION_FAILED, ApiError
from pyapp.db import Connection, Database, UniqueViolation
from pyapp.logs import log_context

log = logging.getLogger(__name__)
bp = Blueprint("replications", __name__)

ACTIVE = ("pending", "replicating")
TERMINAL = ("completed", "failed", "cancelled")
TRANSITIONS: dict[str, set[str]] = {
    "pending": {"pending", "replicating", "completed", "failed", "cancelled"},
    "replicating": {"replicating", "completed", "failed", "cancelled"},
}
JOB_COLUMNS = (
    "id, vm_context_id, vm_id, vm_name, vm_path, vcenter_host, datacenter, replication_type, status,"
    " progress_percent, bytes_transferred, total_bytes, current_operation, error_message, created_by,"
    " created_at, updated_at, started_at, completed_at, credential_id"
)
ACTIVE_DISK_INDEX = "replication_job_disks_one_active"


class SourceDisk(BaseModel):
    id: str = Field(min_length=1, max_length=MAX_NAME, description="VMware disk key, e.g. disk-2000")
    path: str | None = Field(None, max_length=MAX_TEXT)
    capacity_bytes: int | None = Field(None, ge=0)


class SourceVM(BaseModel):
    id: str | None = Field(None, max_length=MAX_NAME, description="VMware managed object id")
    name: str = Field(min_length=1, max_length=MAX_NAME)
    path: str = Field(min_length=1, max_length=MAX_TEXT, description="inventory path, /DC/vm/NAME")
    datacenter: str = Field("", max_length=MAX_NAME)
    disks: list[SourceDisk] = Field(
        default_factory=list, max_length=64, description="disks to copy; empty: every disk in the inventory"
    )


class CreateReplicationRequest(BaseModel):
    source_vm: SourceVM
    vcenter_host: str = Field("", max_length=MAX_NAME)
    replication_type: Literal["initial", "incremental"] | None = Field(
        None, description="omitted: incremental when every disk has a stored change ID, else initial"
    )
    credential_id: int | None = Field(
        None, ge=1, description="VMware credential to run the job with; omitted: the VM's, else the default"
    )


class UpdateReplicationRequest(BaseModel):
    status: Literal["pending", "replicating", "completed", "failed", "cancelled"] | None = None
    progress_percent: float | None = Field(None, ge=0, le=100)
    bytes_transferred: int | None = Field(None, ge=0)
    total_bytes: int | None = Field(None, ge=0)
    current_operation: str | None = Field(None, max_length=MAX_TEXT)
    error_message: str | None = Field(None, max_length=MAX_TEXT)


class ReplicationListQuery(Page):
    status: Literal["pending", "replicating", "completed", "failed", "cancelled"] | None = None
    vm_name: str | None = Field(None, max_length=MAX_NAME)


class ChangeIdQuery(BaseModel):
    vm_path: str = Field(min_length=1, max_length=MAX_TEXT)
    disk_id: str = Field(min_length=1, max_length=MAX_NAME)


class StoreChangeIdRequest(BaseModel):
    disk_id: str = Field(min_length=1, max_length=MAX_NAME)
    change_id: str = Field(min_length=1, max_length=1024)
    vm_path: str | None = Field(
        None, max_length=MAX_TEXT, description="sent by the VMA; must be the job's VM when given"
    )


async def _job_disks(conn: Any, job_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT d.disk_id, d.capacity_bytes, d.active, d.base_change_id, d.volume_path, d.nbd_uri,"
        " d.copy_mode, d.bytes_written, d.bytes_zeroed,"
        " (SELECT c.change_id FROM vm_disk_changeids c WHERE c.job_id = d.job_id AND c.disk_id = d.disk_id"
        "  ORDER BY c.id DESC LIMIT 1) AS change_id"
        " FROM replication_job_disks d WHERE d.job_id = $1 ORDER BY d.disk_id",
        job_id,
    )
    return [dict(r) for r in rows]


async def load_job(conn: Any, job_id: str, *, for_update: bool = False) -> dict[str, Any]:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {JOB_COLUMNS} FROM replication_jobs WHERE id = $1{lock}", job_id)
    if row is None:
        raise ApiError.not_found(f"replication job {job_id!r} not found", JOB_NOT_FOUND)
    return row_dict(row)


async def _disks_for(conn: Database | Connection, vm: SourceVM) -> list[SourceDisk]:
    if vm.disks:
        ids = [d.id for d in vm.disks]
        if len(set(ids)) != len(ids):
            raise ApiError.unprocessable("source_vm.disks lists a disk twice")
        return vm.disks
    row = await conn.fetchrow(
        "SELECT disks FROM vms WHERE ($1::text IS NOT NULL AND id = $1) OR path = $2 LIMIT 1", vm.id, vm.path
    )
    disks = row_dict(row)["disks"] if row else []
    found = [
        SourceDisk(id=str(d["id"]), path=d.get("path"), capacity_bytes=d.get("capacity_bytes"))
        for d in disks
        if isinstance(d, dict) and d.get("id")
    ]
    if not found:
        raise ApiError.unprocessable(
            "source_vm.disks is empty and the inventory knows no disk for this VM; list the disks"
        )
    return found


@bp.get("/replications")
@allow_vma
@validate_querystring(ReplicationListQuery)
async def list_replications(query_args: ReplicationListQuery) -> Response:
    return await json_page(
        state().db,
        "replications",
        columns=JOB_COLUMNS,
        from_where="FROM replication_jobs t WHERE ($1::text IS NULL OR t.status = $1)"
        " AND ($2::text IS NULL OR t.vm_name = $2)",
        order=[("created_at", "DESC"), ("id", "DESC")],
        args=(query_args.status, query_args.vm_name),
        page=query_args,
    )


@bp.post("/replications")
@allow_vma
@validate_request(CreateReplicationRequest)
async def create_replication(data: CreateReplicationRequest) -> tuple[dict[str, Any], int]:
    principal = current_principal()
    db = state().db
    vm = data.source_vm
    job_id = new_id("repl")
    disks = await _disks_for(db, vm)
    bases = {
        r["disk_id"]: r["change_id"]
        for r in await db.fetch(
            "SELECT DISTINCT ON (disk_id) disk_id, change_id FROM vm_disk_changeids"
            " WHERE vm_path = $1 AND disk_id = ANY($2::text[]) ORDER BY disk_id, id DESC",
            vm.path,
            [d.id for d in disks],
        )
    }
    all_have_base = all(d.id in bases for d in disks)
    kind = data.replication_type or ("incremental" if all_have_base else "initial")
    if kind == "incremental" and not all_have_base:
        missing = sorted(d.id for d in disks if d.id not in bases)
        raise ApiError.conflict(f"incremental replication needs a stored change ID for disks {missing}")
    disks = sorted(disks, key=lambda d: d.id)
    base_ids = [bases.get(d.id) if kind == "incremental" else None for d in disks]
    try:
        # One statement, so one atomic step: upsert the VM context (pointing at the new job), insert
        # the job and its disks. The partial unique index on active disks makes a concurrent
        # creation for the same disk fail here as a whole (nothing of it is kept).
        row = await db.fetchrow(
            "WITH ctx AS ("
            "  INSERT INTO vm_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, datacenter,"
            "   current_job_id, current_status, total_jobs, last_job_at)"
            "  VALUES ($2, $3, $4, $5, $6, $7, $1, 'replication_pending', 1, now())"
            "  ON CONFLICT (vm_name) DO UPDATE SET vm_path = EXCLUDED.vm_path,"
            "   vmware_vm_id = COALESCE(EXCLUDED.vmware_vm_id, vm_contexts.vmware_vm_id),"
            "   current_job_id = EXCLUDED.current_job_id, current_status = 'replication_pending',"
            "   total_jobs = vm_contexts.total_jobs + 1, last_job_at = now(), updated_at = now()"
            "  RETURNING context_id),"
            " job AS ("
            "  INSERT INTO replication_jobs (id, vm_context_id, vm_id, vm_name, vm_path, vcenter_host,"
            "   datacenter, replication_type, status, total_bytes, current_operation, created_by,"
            "   credential_id)"
            "  SELECT $1, ctx.context_id, $4, $3, $5, $6, $7, $8, 'pending', $9, 'queued', $10, $14 FROM ctx"
            f"  RETURNING {JOB_COLUMNS}),"
            " disks AS ("
            "  INSERT INTO replication_job_disks (job_id, disk_id, vm_path, capacity_bytes, base_change_id)"
            "  SELECT job.id, u.disk_id, $5, u.capacity_bytes, u.base_change_id"
            "  FROM job, unnest($11::text[], $12::bigint[], $13::text[]) AS u(disk_id, capacity_bytes,"
            "   base_change_id)"
            "  RETURNING 1)"
            " SELECT job.*, (SELECT count(*) FROM disks) AS disk_count FROM job",
            job_id,
            new_id("ctx"),
            vm.name,
            vm.id,
            vm.path,
            data.vcenter_host,
            vm.datacenter,
            kind,
            sum(d.capacity_bytes or 0 for d in disks),
            principal.subject,
            [d.id for d in disks],
            [d.capacity_bytes for d in disks],
            base_ids,
            data.credential_id,
        )
    except UniqueViolation as exc:
        if exc.constraint_name != ACTIVE_DISK_INDEX:
            raise
        existing = await db.fetchval(
            "SELECT job_id FROM replication_job_disks WHERE vm_path = $1 AND disk_id = ANY($2::text[])"
            " AND active LIMIT 1",
            vm.path,
            [d.id for d in disks],
        )
        raise ApiError.conflict(
            f"VM {vm.name!r} already has an active replication job ({existing}) for one of these disks"
        ) from exc
    assert row is not None
    job = row_dict(row, exclude=("disk_count",))
    job["disks"] = [
        {
            "disk_id": d.id,
            "capacity_bytes": d.capacity_bytes,
            "active": True,
            "base_change_id": base,
            "volume_path": None,
            "nbd_uri": None,
            "copy_mode": None,
            "bytes_written": None,
            "bytes_zeroed": None,
            "change_id": None,
        }
        for d, base in zip(disks, base_ids, strict=True)
    ]
    with log_context(job_id=job_id, action="replication_create"):
        log.info("replication job created", extra={"vm_name": vm.name, "replication_type": kind})
    state().wake_engine()
    return job, 201


@bp.get("/replications/changeid")
@allow_vma
@validate_querystring(ChangeIdQuery)
async def get_previous_change_id(query_args: ChangeIdQuery) -> dict[str, Any]:
    row = await state().db.fetchrow(
        "SELECT change_id, job_id, created_at FROM vm_disk_changeids WHERE vm_path = $1 AND disk_id = $2"
        " ORDER BY id DESC LIMIT 1",
        query_args.vm_path,
        query_args.disk_id,
    )
    return {
        "vm_path": query_args.vm_path,
        "disk_id": query_args.disk_id,
        "change_id": row["change_id"] if row else None,
        "job_id": row["job_id"] if row else None,
        "recorded_at": iso(row["created_at"]) if row else None,
    }


@bp.get("/replications/<job_id>")
@allow_vma
async def get_replication(job_id: str) -> dict[str, Any]:
    db = state().db
    job = await load_job(db, job_id)
    job["disks"] = await _job_disks(db, job_id)
    return job


@bp.put("/replications/<job_id>")
@allow_vma
@validate_request(UpdateReplicationRequest)
async def update_replication(job_id: str, data: UpdateReplicationRequest) -> dict[str, Any]:
    changes = data.model_dump(exclude_unset=True)
    if not changes:
        raise ApiError.unprocessable("nothing to update")
    with not_cut_short():
        return await _update_replication(job_id, data)


async def _update_replication(job_id: str, data: UpdateReplicationRequest) -> dict[str, Any]:
    async with state().db.transaction() as conn:
        job = await load_job(conn, job_id, for_update=True)
        old, new = job["status"], data.status or job["status"]
        if old in TERMINAL:
            raise ApiError.conflict(f"job {job_id} is {old}; a finished job cannot change")
        if new not in TRANSITIONS[old]:
            raise ApiError.conflict(f"job {job_id} cannot go from {old} to {new}")
        await conn.execute(
            "UPDATE replication_jobs SET status = $2,"
            " progress_percent = CASE WHEN $2 = 'completed' THEN 100 ELSE COALESCE($3, progress_percent) END,"
            " bytes_transferred = COALESCE($4, bytes_transferred), total_bytes = COALESCE($5, total_bytes),"
            " current_operation = COALESCE($6, current_operation), error_message = COALESCE($7, "
            "error_message),"
            " started_at = CASE WHEN $2 = 'replicating' THEN COALESCE(started_at, now()) ELSE started_at END,"
            " completed_at = CASE WHEN $2 IN ('completed', 'failed', 'cancelled') THEN now() ELSE NULL END,"
            " updated_at = now() WHERE id = $1",
            job_id,
            new,
            data.progress_percent,
            data.bytes_transferred,
            data.total_bytes,
            data.current_operation,
            data.error_message,
        )
        if new != old:
            await on_status_change(conn, job, new)
        job = await load_job(conn, job_id)
        job["disks"] = await _job_disks(conn, job_id)
    if new != old:
        with log_context(job_id=job_id, action="replication_status"):
            log.info("replication job %s -> %s", old, new)
    return job


async def on_status_change(conn: Connection, job: dict[str, Any], new: str) -> None:
    """What follows a status change of ``job`` (locked in ``conn``'s transaction): terminal states
    release the disks; the VM context follows the job."""
    context_status = {
        "replicating": "replicating",
        "completed": "replicated",
        "failed": "failed",
        "cancelled": "cancelled",
    }.get(new, "replication_pending")
    if new in TERMINAL:
        await conn.execute("UPDATE replication_job_disks SET active = false WHERE job_id = $1", job["id"])
    await conn.execute(
        "UPDATE vm_contexts SET current_status = $2, updated_at = now(),"
        " successful_jobs = successful_jobs + (CASE WHEN $3 = 'completed' THEN 1 ELSE 0 END),"
        " failed_jobs = failed_jobs + (CASE WHEN $3 = 'failed' THEN 1 ELSE 0 END)"
        " WHERE context_id = $1 AND current_job_id = $4",
        job["vm_context_id"],
        context_status,
        new,
        job["id"],
    )


@bp.delete("/replications/<job_id>")
async def delete_replication(job_id: str) -> dict[str, Any]:
    with not_cut_short():
        return await _delete_replication(job_id)


async def _delete_replication(job_id: str) -> dict[str, Any]:
    async with state().db.transaction() as conn:
        job = await load_job(conn, job_id, for_update=True)
        if job["status"] in ACTIVE:
            raise ApiError.conflict(
                f"job {job_id} is {job['status']}; cancel it first (PUT status=cancelled)"
            )
        await conn.execute("UPDATE vm_contexts SET current_job_id = NULL WHERE current_job_id = $1", job_id)
        await conn.execute("DELETE FROM replication_jobs WHERE id = $1", job_id)
    with log_context(job_id=job_id, action="replication_delete"):
        log.info("replication job deleted")
    return {"message": "replication job deleted", "job_id": job_id}


@bp.post("/replications/<job_id>/changeid")
@allow_vma
@validate_request(StoreChangeIdRequest)
async def store_change_id(job_id: str, data: StoreChangeIdRequest) -> tuple[dict[str, Any], int]:
    with not_cut_short():
        return await _store_change_id(job_id, data)


async def _store_change_id(job_id: str, data: StoreChangeIdRequest) -> tuple[dict[str, Any], int]:
    async with state().db.transaction() as conn:
        job = await load_job(conn, job_id, for_update=True)
        if job["status"] in ("failed", "cancelled"):
            raise ApiError.conflict(f"job {job_id} is {job['status']}; its change IDs cannot become a base")
        if data.vm_path is not None and data.vm_path != job["vm_path"]:
            raise ApiError.unprocessable(f"job {job_id} replicates {job['vm_path']!r}, not {data.vm_path!r}")
        disk = await conn.fetchrow(
            "SELECT vm_path FROM replication_job_disks WHERE job_id = $1 AND disk_id = $2",
            job_id,
            data.disk_id,
        )
        if disk is None:
            raise ApiError.not_found(f"job {job_id} has no disk {data.disk_id!r}")
        row = await conn.fetchrow(
            "INSERT INTO vm_disk_changeids (vm_path, disk_id, change_id, job_id) VALUES ($1, $2, $3, $4)"
            " RETURNING created_at",
            disk["vm_path"],
            data.disk_id,
            data.change_id,
            job_id,
        )
    with log_context(job_id=job_id, action="changeid_store"):
        log.info("change ID stored", extra={"disk_id": data.disk_id})
    assert row is not None
    return {
        "job_id": job_id,
        "vm_path": disk["vm_path"],
        "disk_id": data.disk_id,
        "change_id": data.change_id,
        "recorded_at": iso(row["created_at"]),
    }, 201


def _vma_api_error(exc: VmaError, job_id: str) -> ApiError:
    if isinstance(exc, VmaJobNotFound):
        return ApiError.not_found(f"the VMA has no job {job_id!r}", JOB_NOT_FOUND)
    if isinstance(exc, VmaUnreachable):
        return ApiError.upstream(exc.message)
    return ApiError(502, OPERATION_FAILED, exc.message)


@bp.get("/progress/<job_id>")
@allow_vma
async def vma_progress_proxy(job_id: str) -> dict[str, Any]:
    try:
        return await state().vma.progress(job_id)
    except VmaError as exc:
        raise _vma_api_error(exc, job_id) from exc


LIVE_FIELDS = (
    "progress_percent",
    "bytes_transferred",
    "total_bytes",
    "current_operation",
    "throughput_bps",
    "phase",
    "current_disk",
    "eta_seconds",
)  # the VMA's per-disk figures stay under "vma" ("disks" is the job's disks, from the database)


@bp.get("/replications/<job_id>/progress")
@allow_vma
async def replication_progress(job_id: str) -> dict[str, Any]:
    st = state()
    job = await load_job(st.db, job_id)
    merged: dict[str, Any] = {
        "job_id": job_id,
        "status": job["status"],
        "replication_type": job["replication_type"],
        "vm_name": job["vm_name"],
        "progress_percent": job["progress_percent"],
        "bytes_transferred": job["bytes_transferred"],
        "total_bytes": job["total_bytes"],
        "current_operation": job["current_operation"],
        "throughput_bps": None,
        "phase": None,
        "current_disk": None,
        "eta_seconds": None,
        "disks": await _job_disks(st.db, job_id),
        "started_at": job["started_at"],
        "updated_at": job["updated_at"],
        "completed_at": job["completed_at"],
        "error_message": job["error_message"],
        "source": "database",
        "vma": None,
        "vma_error": None,
    }
    if job["status"] in ACTIVE:
        try:
            live = await st.vma.progress(job_id)
        except VmaError as exc:
            merged["vma_error"] = exc.message
        else:
            merged["vma"] = live
            merged["source"] = "vma"
            for key in LIVE_FIELDS:
                if live.get(key) is not None:
                    merged[key] = live[key]
    return merged
