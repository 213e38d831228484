"""Replications, ChangeID (CBT) and the progress proxy.

A replication job copies the disks of one VM (all of them, or the ones listed). A VM is known by
its identity: its vCenter and managed object id (``source_vm.id``, else the inventory's id for
``source_vm.path``, else ``path:<path>``); names and paths are for display only. Each disk of a
job is a row of ``replication_job_disks``; a partial unique index allows one *active* row per VM
disk (vCenter, VM id, disk id), so two concurrent creations for the same disk yield one job and
one 409, decided by PostgreSQL rather than by a check-then-insert race.

Status machine::

    pending -> replicating -> completed
       |            |-------> failed
       |------------+-------> cancelled      (terminal states never change again)

Reaching a terminal state releases the disks (``active = false``) in the same transaction.

Change IDs: after a pass the VMA stores the vCenter change ID of each disk
(``POST /replications/{job_id}/changeid``). A change ID belongs to the target volume (and its
generation, ``replica_volumes``) that received it: the base of a disk's next pass is the latest
change ID of the disk's current volume generation, fixed in the job at creation and sent to the
VMA with the job (``base_change_id`` per disk; null: a full pass). A volume made anew has a new
generation, so no earlier change ID can be a base for it. ``GET /replications/changeid`` answers
for the VM's current volume (``change_id: null``: "no base: copy everything"). A failed or
cancelled job cannot record a change ID: a base that was never fully copied would silently lose
changed blocks on the next incremental pass.

Locks: every transaction that changes a job locks its VM context first, then the job, then the
job's disks and volumes (:func:`lock_job`); the creation's single statement upserts the context
first. One order, so a creation and a status change of the same VM never deadlock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

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
from oma.auth import allow_vma, current_principal, requires
from oma.state import state
from oma.store.pages import json_page
from oma.store.rows import iso, new_id, row_dict
from oma.vma_client import VmaError, VmaJobNotFound, VmaUnreachable
from pyapp.api import JOB_NOT_FOUND, OPERATION_FAILED, ApiError
from pyapp.db import Connection, Database, ForeignKeyViolation, UniqueViolation
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


async def _job_disks(conn: Any, job_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT d.disk_id, d.capacity_bytes, d.active, d.base_change_id, d.volume_id, d.volume_generation,"
        " d.volume_path, d.nbd_uri,"
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


async def lock_job(conn: Connection, job_id: str) -> dict[str, Any]:
    """Lock ``job_id`` for a change, in the one lock order: its VM context, then the job (a
    creation upserts the context first too). Raises 404 when the job does not exist."""
    await conn.execute(
        "SELECT 1 FROM vm_contexts WHERE context_id = (SELECT vm_context_id FROM"
        " replication_jobs WHERE id = $1)"
        " FOR NO KEY UPDATE",
        job_id,
    )
    return await load_job(conn, job_id, for_update=True)


async def _disks_for(conn: Database | Connection, vm: SourceVM) -> list[SourceDisk]:
    if vm.disks:
        ids = [d.id for d in vm.disks]
        if len(set(ids)) != len(ids):
            raise ApiError.unprocessable("source_vm.disks lists a disk twice")
        return vm.disks
    # By id when the request names the VM (another VM may sit at the same path), else by path.
    row = await conn.fetchrow(
        "SELECT disks FROM vms WHERE CASE WHEN $1::text IS NOT NULL THEN id = $1 ELSE path = $2 END"
        " ORDER BY updated_at DESC LIMIT 1",
        vm.id,
        vm.path,
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
@requires("viewer")
@allow_vma
@validate_querystring(ReplicationListQuery)
async def list_replications(query_args: ReplicationListQuery) -> Response:
    return json_response(await json_page(
        state().db,
        "replications",
        columns=JOB_COLUMNS,
        from_where="FROM replication_jobs t WHERE ($1::text IS NULL OR t.status = $1)"
        " AND ($2::text IS NULL OR t.vm_name = $2)",
        order=[("created_at", "DESC"), ("id", "DESC")],
        args=(query_args.status, query_args.vm_name),
        page=query_args,
    ))


@dataclass(frozen=True)
class VmIdentity:
    """A VM as the replicas know it: its vCenter and its managed object id there (``path:<path>``
    when nobody knows the id)."""

    vcenter: str
    vm_id: str


async def resolve_identity(conn: Database | Connection, vm: SourceVM, vcenter_host: str) -> VmIdentity:
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


@dataclass(frozen=True)
class DiskBase:
    """The base a disk's next pass can build on: the latest change ID of its current volume
    generation, if that volume holds a complete pass (``ready``). A disk that never had a volume
    (its jobs were run outside this OMA's engine, as in the seed: the VMA given its own targets)
    has the latest change ID recorded without a volume (``volume_id`` None); the engine never
    applies such a base to a volume of its own."""

    volume_id: str | None
    generation: int | None
    change_id: str


async def disk_bases(
    conn: Database | Connection, who: VmIdentity, disk_ids: list[str]
) -> dict[str, DiskBase]:
    rows = await conn.fetch(
        "SELECT d.disk_id, v.id, v.generation, CASE"
        "  WHEN v.id IS NULL THEN (SELECT c.change_id FROM vm_disk_changeids c WHERE c.vcenter_host = $1"
        "   AND c.vm_id = $2 AND c.disk_id = d.disk_id AND c.volume_id IS NULL ORDER BY c.id DESC LIMIT 1)"
        "  WHEN v.state = 'ready' THEN (SELECT c.change_id FROM vm_disk_changeids c WHERE c.volume_id = v.id"
        "   AND c.generation = v.generation ORDER BY c.id DESC LIMIT 1)"
        " END AS change_id"
        " FROM unnest($3::text[]) AS d(disk_id) LEFT JOIN replica_volumes v"
        " ON v.vcenter_host = $1 AND v.vm_id = $2 AND v.disk_id = d.disk_id",
        who.vcenter,
        who.vm_id,
        disk_ids,
    )
    return {r["disk_id"]: DiskBase(r["id"], r["generation"], r["change_id"]) for r in rows if r["change_id"]}


@bp.post("/replications")
@requires("operator")
@allow_vma
@validate_request(CreateReplicationRequest)
async def create_replication(data: CreateReplicationRequest) -> tuple[dict[str, Any], int]:
    principal = current_principal()
    db = state().db
    vm = data.source_vm
    job_id = new_id("repl")
    disks = sorted(await _disks_for(db, vm), key=lambda d: d.id)
    who = await resolve_identity(db, vm, data.vcenter_host)
    bases = await disk_bases(db, who, [d.id for d in disks])
    all_have_base = all(d.id in bases for d in disks)
    kind = data.replication_type or ("incremental" if all_have_base else "initial")
    if kind == "incremental" and not all_have_base:
        missing = sorted(d.id for d in disks if d.id not in bases)
        raise ApiError.conflict(
            f"incremental replication needs a complete earlier pass into the current volume of disks"
            f" {missing}: run an initial replication (or omit replication_type)"
        )
    # initial: every disk gets a full pass into a new volume generation; incremental: each disk
    # builds on its volume's latest change ID (the engine checks the volume is still that one).
    used = [bases[d.id] if kind == "incremental" else None for d in disks]
    try:
        # One statement, so one atomic step: upsert the VM context (pointing at the new job), insert
        # the job and its disks. The partial unique index on active disks makes a concurrent
        # creation for the same disk fail here as a whole (nothing of it is kept). The context is
        # locked first, as every other writer of a job does (lock_job).
        row = await db.fetchrow(
            "WITH ctx AS ("
            "  INSERT INTO vm_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, datacenter,"
            "   current_job_id, current_status, total_jobs, last_job_at)"
            "  VALUES ($2, $3, $4, $5, $6, $7, $1, 'replication_pending', 1, now())"
            "  ON CONFLICT (vcenter_host, vmware_vm_id) DO UPDATE SET vm_path = EXCLUDED.vm_path,"
            "   vm_name = EXCLUDED.vm_name,"
            "   current_job_id = EXCLUDED.current_job_id, current_status = 'replication_pending',"
            "   total_jobs = vm_contexts.total_jobs + 1, last_job_at = now(), updated_at = now()"
            "  RETURNING context_id),"
            " job AS ("
            "  INSERT INTO replication_jobs (id, vm_context_id, vm_id, vm_name, vm_path, vcenter_host,"
            "   datacenter, replication_type, status, total_bytes, current_operation, created_by,"
            "   credential_id)"
            "  SELECT $1, ctx.context_id, $4, $3, $5, $6, $7, $8, 'pending', $9, 'queued', $10, $14 FROM ctx"
            f"  RETURNING"
            f" {JOB_COLUMNS}),"
            " disks AS"
            " ("
            "  INSERT INTO replication_job_disks (job_id, disk_id, vm_path, vcenter_host,"
            " vm_id, capacity_bytes,"
            "   base_change_id, volume_id, volume_generation)"
            "  SELECT job.id, u.disk_id, $5, $6, $4, u.capacity_bytes, u.base_change_id,"
            " u.volume_id, u.generation"
            "  FROM job, unnest($11::text[], $12::bigint[], $13::text[], $15::text[], $16::int[])"
            "   AS u(disk_id, capacity_bytes, base_change_id, volume_id, generation)"
            "  RETURNING 1)"
            " SELECT job.*, (SELECT count(*) FROM disks) AS disk_count FROM job",
            job_id,
            new_id("ctx"),
            vm.name,
            who.vm_id,
            vm.path,
            who.vcenter,
            vm.datacenter,
            kind,
            sum(d.capacity_bytes or 0 for d in disks),
            principal.subject,
            [d.id for d in disks],
            [d.capacity_bytes for d in disks],
            [b.change_id if b else None for b in used],
            data.credential_id,
            [b.volume_id if b else None for b in used],
            [b.generation if b else None for b in used],
        )
    except UniqueViolation as exc:
        if exc.constraint_name != ACTIVE_DISK_INDEX:
            raise
        existing = await db.fetchval(
            "SELECT job_id FROM replication_job_disks WHERE vcenter_host = $1 AND vm_id = $2"
            " AND disk_id = ANY($3::text[]) AND active LIMIT 1",
            who.vcenter,
            who.vm_id,
            [d.id for d in disks],
        )
        raise ApiError.conflict(
            f"VM {vm.name!r} already has an active replication job ({existing}) for one of these disks"
        ) from exc
    except ForeignKeyViolation as exc:  # the only reference the request names: its credential
        message = f"credential_id {data.credential_id}: no such VMware credential"
        raise ApiError.unprocessable(message) from exc
    assert row is not None
    job = row_dict(row, exclude=("disk_count",))
    job["disks"] = [
        {
            "disk_id": d.id,
            "capacity_bytes": d.capacity_bytes,
            "active": True,
            "base_change_id": base.change_id if base else None,
            "volume_id": base.volume_id if base else None,
            "volume_generation": base.generation if base else None,
            "volume_path": None,
            "nbd_uri": None,
            "copy_mode": None,
            "bytes_written": None,
            "bytes_zeroed": None,
            "change_id": None,
        }
        for d, base in zip(disks, used, strict=True)
    ]
    with log_context(job_id=job_id, action="replication_create"):
        log.info(
            "replication job created",
            extra={"vm_name": vm.name, "vm_id": who.vm_id, "vcenter": who.vcenter, "replication_type": kind},
        )
    state().wake_engine()
    return job, 201


@bp.get("/replications/changeid")
@requires("viewer")
@allow_vma
@validate_querystring(ChangeIdQuery)
async def get_previous_change_id(query_args: ChangeIdQuery) -> dict[str, Any]:
    """The latest change ID of the current volume of the VM last replicated from ``vm_path``: none
    when that volume is being made anew (or failed), whatever older volumes or VMs stored. For a
    path whose jobs never had a volume (run outside the engine), the latest one recorded."""
    row = await state().db.fetchrow(
        "WITH v AS (SELECT id, generation, state FROM replica_volumes WHERE vm_path = $1 AND disk_id = $2"
        "  ORDER BY updated_at DESC LIMIT 1)"
        " SELECT c.change_id, c.job_id, c.created_at FROM vm_disk_changeids c WHERE CASE"
        "  WHEN EXISTS (SELECT 1 FROM v)"
        "   THEN (c.volume_id, c.generation) = (SELECT id, generation FROM v WHERE state = 'ready')"
        "  ELSE c.volume_id IS NULL AND c.vm_path = $1 AND c.disk_id = $2"
        " END ORDER BY c.id DESC LIMIT 1",
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
@requires("viewer")
@allow_vma
async def get_replication(job_id: str) -> dict[str, Any]:
    db = state().db
    job = await load_job(db, job_id)
    job["disks"] = await _job_disks(db, job_id)
    return job


@bp.put("/replications/<job_id>")
@requires("operator")
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
        job = await lock_job(conn, job_id)
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
@requires("operator")
async def delete_replication(job_id: str) -> dict[str, Any]:
    with not_cut_short():
        return await _delete_replication(job_id)


async def _delete_replication(job_id: str) -> dict[str, Any]:
    async with state().db.transaction() as conn:
        job = await lock_job(conn, job_id)
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
@requires("operator")
@allow_vma
@validate_request(StoreChangeIdRequest)
async def store_change_id(job_id: str, data: StoreChangeIdRequest) -> tuple[dict[str, Any], int]:
    with not_cut_short():
        return await _store_change_id(job_id, data)


async def _store_change_id(job_id: str, data: StoreChangeIdRequest) -> tuple[dict[str, Any], int]:
    async with state().db.transaction() as conn:
        job = await lock_job(conn, job_id)
        if job["status"] in ("failed", "cancelled"):
            raise ApiError.conflict(f"job {job_id} is {job['status']}; its change IDs cannot become a base")
        if data.vm_path is not None and data.vm_path != job["vm_path"]:
            raise ApiError.unprocessable(f"job {job_id} replicates {job['vm_path']!r}, not {data.vm_path!r}")
        disk = await conn.fetchrow(
            "SELECT vm_path, vcenter_host, vm_id, volume_id, volume_generation FROM replication_job_disks"
            " WHERE job_id = $1 AND disk_id = $2",
            job_id,
            data.disk_id,
        )
        if disk is None:
            raise ApiError.not_found(f"job {job_id} has no disk {data.disk_id!r}")
        # The volume becomes 'ready' (it holds a complete pass) in the same step as its change ID,
        # and only if it is still the generation this job wrote. A job without a volume (not run
        # by the engine) records a change ID of no volume: never a base for a volume.
        if disk["volume_id"] is not None and not await conn.fetchval(
            "UPDATE replica_volumes SET state = 'ready', error_message = NULL, updated_at = now()"
            " WHERE id = $1 AND generation = $2 RETURNING true",
            disk["volume_id"],
            disk["volume_generation"],
        ):
            raise ApiError.conflict(
                f"the volume of {data.disk_id} was made anew since job {job_id} started: its change ID"
                " would describe another volume"
            )
        row = await conn.fetchrow(
            "INSERT INTO vm_disk_changeids (vm_path, disk_id, change_id, job_id,"
            " vcenter_host, vm_id, volume_id,"
            " generation) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING created_at",
            disk["vm_path"],
            data.disk_id,
            data.change_id,
            job_id,
            disk["vcenter_host"],
            disk["vm_id"],
            disk["volume_id"],
            disk["volume_generation"],
        )
    with log_context(job_id=job_id, action="changeid_store"):
        log.info(
            "change ID stored",
            extra={
                "disk_id": data.disk_id,
                "volume_id": disk["volume_id"],
                "generation": disk["volume_generation"],
            },
        )
    assert row is not None
    return {
        "job_id": job_id,
        "vm_path": disk["vm_path"],
        "disk_id": data.disk_id,
        "change_id": data.change_id,
        "volume_id": disk["volume_id"],
        "volume_generation": disk["volume_generation"],
        "recorded_at": iso(row["created_at"]),
    }, 201


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
@requires("viewer")
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
