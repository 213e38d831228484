"""Replication jobs: their records and the rules of their states.

Status machine::

    pending -> replicating -> completed
       |            |-------> failed
       |------------+-------> cancelled      (terminal states never change again)

Reaching a terminal state releases the disks (``active = false``) in the same transaction, and
the VM context follows the job (:func:`on_status_change`).

Locks: every transaction that changes a job locks its VM context first, then the job, then the
job's disks and volumes (:func:`lock_job`); the creation's single statement upserts the context
first. One order, so a creation and a status change of the same VM never deadlock.
"""

from __future__ import annotations

from typing import Any

from oma.store.rows import row_dict
from pyapp.api import JOB_NOT_FOUND, ApiError
from pyapp.db import Connection

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
