"""Replication jobs: their records and the rules of their states.

Status machine::

    pending -> replicating -> completed
       |            |-------> failed
       |------------+-------> cancelled      (terminal states never change again)

Reaching a terminal state releases the disks (``active = false``) in the same transaction, and
the VM context follows the job (:func:`on_status_change`).

Every change of status is one transaction with the job row locked; once it committed, the change
is published to the app's :class:`~oma.replication.events.JobEvents` (the domain never calls
into its listeners' modules). The VMA reports through :func:`update_job`; the engine ends a job
with :func:`finish_job`, which never overrides an end already recorded.

Locks: every transaction that changes a job locks its VM context first, then the job, then the
job's disks and volumes (:func:`lock_job`); the creation's single statement upserts the context
first (:mod:`oma.replication.creation`). One order, so a creation and a status change of the same
VM never deadlock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio

from oma.replication.events import JobChange, JobEvents
from oma.store.pages import Page, json_page
from oma.store.rows import row_dict
from pyapp.api import JOB_NOT_FOUND, ApiError
from pyapp.db import Connection, Database
from pyapp.logs import log_context

log = logging.getLogger(__name__)

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


class JobError(Exception):
    """A step of the job failed; the message is what the operator reads in ``error_message``."""


async def job_disks(conn: Database | Connection, job_id: str) -> list[dict[str, Any]]:
    """The disks of ``job_id`` as the API shows them, each with the last change ID it stored."""
    rows = await conn.fetch(
        "SELECT d.disk_id, d.capacity_bytes, d.active, d.base_change_id, d.volume_id, d.volume_generation,"
        " d.volume_path, d.cloudstack_volume_id, d.nbd_uri,"
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


async def get_job(db: Database, job_id: str) -> dict[str, Any]:
    """``job_id`` with its disks; 404 when there is no such job."""
    job = await load_job(db, job_id)
    job["disks"] = await job_disks(db, job_id)
    return job


async def list_jobs(db: Database, page: Page, *, status: str | None, vm_name: str | None) -> str:
    """One page of the jobs, newest first, as the JSON body of the list."""
    return await json_page(
        db,
        "replications",
        columns=JOB_COLUMNS,
        from_where="FROM replication_jobs t WHERE ($1::text IS NULL OR t.status = $1)"
        " AND ($2::text IS NULL OR t.vm_name = $2)",
        order=[("created_at", "DESC"), ("id", "DESC")],
        args=(status, vm_name),
        page=page,
    )


@dataclass(frozen=True)
class JobUpdate:
    """What a report or an operator changes in a job; None: unchanged."""

    status: str | None = None
    progress_percent: float | None = None
    bytes_transferred: int | None = None
    total_bytes: int | None = None
    current_operation: str | None = None
    error_message: str | None = None


async def update_job(db: Database, events: JobEvents, job_id: str, update: JobUpdate) -> dict[str, Any]:
    """Apply ``update`` to ``job_id`` (409 for a finished job or a status it cannot reach); returns
    the job with its disks."""
    async with db.transaction() as conn:
        job = await lock_job(conn, job_id)
        old, new = job["status"], update.status or job["status"]
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
            update.progress_percent,
            update.bytes_transferred,
            update.total_bytes,
            update.current_operation,
            update.error_message,
        )
        if new != old:
            await on_status_change(conn, job, new)
        job = await load_job(conn, job_id)
        job["disks"] = await job_disks(conn, job_id)
    if new != old:
        with log_context(job_id=job_id, action="replication_status"):
            log.info("replication job %s -> %s", old, new)
        events.publish(JobChange(job_id, old, new))
    return job


async def finish_job(db: Database, events: JobEvents, job_id: str, status: str, error: str | None) -> bool:
    """End ``job_id`` as ``status`` unless it has ended already; True if this call ended it.
    Shielded: a transaction cut in the middle would keep the job row locked."""
    with trio.CancelScope(shield=True):
        old = await _finish_job(db, job_id, status, error)
    if old is None:
        return False
    events.publish(JobChange(job_id, old, status))
    return True


async def _finish_job(db: Database, job_id: str, status: str, error: str | None) -> str | None:
    """The status ``job_id`` had before this call ended it; None if it did not."""
    async with db.transaction() as conn:
        try:
            job = await lock_job(conn, job_id)
        except ApiError:
            return None  # deleted meanwhile
        if job["status"] in TERMINAL:
            return None
        operation = "Replication completed" if status == "completed" else "Replication failed"
        await conn.execute(
            "UPDATE replication_jobs SET status = $2, error_message = COALESCE($3, error_message),"
            " current_operation = $4,"
            " progress_percent = CASE WHEN $2 = 'completed' THEN 100 ELSE progress_percent END,"
            " completed_at = now(), updated_at = now()"
            " WHERE id = $1",
            job_id,
            status,
            None if error is None else error[:4000],
            operation,
        )
        await on_status_change(conn, job, status)
    old: str = job["status"]
    return old


async def delete_job(db: Database, job_id: str) -> None:
    """Remove a job that is not active (409 otherwise) and its disks; the change IDs it stored stay."""
    async with db.transaction() as conn:
        job = await lock_job(conn, job_id)
        if job["status"] in ACTIVE:
            raise ApiError.conflict(
                f"job {job_id} is {job['status']}; cancel it first (PUT status=cancelled)"
            )
        await conn.execute("UPDATE vm_contexts SET current_job_id = NULL WHERE current_job_id = $1", job_id)
        await conn.execute("DELETE FROM replication_jobs WHERE id = $1", job_id)
    with log_context(job_id=job_id, action="replication_delete"):
        log.info("replication job deleted")
