"""The backup points a restore reads: only ``completed`` ones, and kept so while a restore
starts.

Chain deletion and retention (``oma.backups.chains``) lock a point's row, then refuse points
with an open mount or a running restore. A restore therefore re-reads the point's status with
``FOR SHARE`` in the transaction that records the mount or the job: either it waits for the
deletion to decide (and sees the point gone or ``deleting``), or the deletion sees the new row.
"""

from __future__ import annotations

from pyapp.api import ApiError
from pyapp.db import Connection, Database, Record

BACKUP_NOT_FOUND = "BACKUP_NOT_FOUND"
BACKUP_NOT_COMPLETED = "BACKUP_NOT_COMPLETED"


async def completed_backup(db: Database, backup_id: str, purpose: str) -> Record:
    """The ``backup_jobs`` row (``id, status, file_path, disk_digest``) of a completed point.
    404 ``BACKUP_NOT_FOUND``, 409 ``BACKUP_NOT_COMPLETED`` (``purpose``: "mounted", ...)."""
    backup = await db.fetchrow(
        "SELECT id, status, file_path, disk_digest FROM backup_jobs WHERE id = $1", backup_id
    )
    if backup is None:
        raise ApiError.not_found(f"backup {backup_id!r} not found", BACKUP_NOT_FOUND)
    if backup["status"] != "completed" or not backup["file_path"]:
        raise ApiError(
            409,
            BACKUP_NOT_COMPLETED,
            f"backup {backup_id} is {backup['status']}; only completed backups can be {purpose}",
        )
    return backup


async def hold_completed(conn: Connection, backup_id: str) -> None:
    """Inside a transaction: lock the point's row against deletion until commit; 409 when it is
    no longer completed."""
    status = await conn.fetchval("SELECT status FROM backup_jobs WHERE id = $1 FOR SHARE", backup_id)
    if status != "completed":
        raise ApiError(409, BACKUP_NOT_COMPLETED, f"backup {backup_id} is {status or 'deleted'}")
