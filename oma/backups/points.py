"""Backup points as the API starts, lists and reads them (docs/backup.md, ``BackupResponse``).

:func:`start_backup` only records a ``pending`` backup after checking what can be checked at
once — the VM is managed, the disk is one of its disks, the repository exists and is enabled, the
policy (if any) stores into that repository, an incremental has a completed point to build on
(else 409 ``NO_PARENT``) — and wakes the backup engine (:mod:`oma.backups.engine`), which does the
rest. A partial unique index allows one *active* backup per VM disk, so two concurrent starts for
one disk give one backup and one 409, decided by PostgreSQL.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from oma.backups.engine import ACTIVE, LATEST_POINT
from oma.backups.layout import manifest_path, point_path
from oma.backups.repositories import enabled_spec, root_of
from oma.backups.vm_disks import AMBIGUOUS_VM, context_key, find_context, inventory_disks, resolve_disk_id
from oma.crypto import SecretBox
from oma.store.pages import Page, json_page
from oma.store.rows import json_columns, new_id
from pyapp.api import ApiError
from pyapp.db import Connection, Database, Record, UniqueViolation
from pyapp.logs import log_context

log = logging.getLogger(__name__)

NO_PARENT = "NO_PARENT"
ACTIVE_INDEX = "backup_jobs_one_active"
#: The fields of a ``BackupResponse`` (docs/backup.md), in answer order; ``copy_mode`` (the VMA's
#: plan: full, incremental, full-cbt-reset) is this implementation's addition.
BACKUP_FIELDS = (
    "backup_id, vm_name, vm_context_id, vm_key, disk_id, backup_type, requested_type, repository_id,"
    " policy_id, parent_backup_id, chain_id, status, file_path, progress_percent, bytes_transferred,"
    " current_operation, virtual_size_bytes, stored_bytes, changed_bytes, disk_digest, change_id,"
    " copy_mode, tags, error_message, created_at, started_at, completed_at, locked_until"
)
#: Backups as ``BackupResponse`` rows. ``locked_until`` is the immutability lock of a stored point
#: (as :func:`oma.backups.chains.locked_until` computes it), rendered here like every timestamp
#: of a list page (``api_ts``), so single answers and list pages read the same.
BACKUP_VIEW = (
    "SELECT b.id AS backup_id, b.vm_name, b.vm_context_id, b.vm_key, b.disk_id, b.backup_type,"
    " b.requested_type, b.repository_id, b.policy_id, b.parent_backup_id, b.chain_id, b.status, b.file_path,"
    " b.progress_percent, b.bytes_transferred, b.current_operation, b.virtual_size_bytes,"
    " b.stored_bytes, b.changed_bytes, b.disk_digest, b.change_id, b.copy_mode, b.tags, b.error_message,"
    " b.created_at, b.started_at, b.completed_at,"
    " api_ts(CASE WHEN r.immutable AND r.immutable_days > 0 AND b.status IN ('completed', 'deleting')"
    "  THEN b.created_at + make_interval(days => r.immutable_days) END) AS locked_until"
    " FROM backup_jobs b JOIN backup_repositories r ON r.id = b.repository_id"
)
_SELECT = f"SELECT {json_columns(BACKUP_FIELDS)} FROM ({BACKUP_VIEW}) t"

Status = Literal["pending", "running", "completed", "failed", "cancelled", "deleting"]
BackupType = Literal["full", "incremental"]


def _backup_dict(row: Record) -> dict[str, Any]:
    out = dict(row.items())
    if isinstance(out["tags"], str):
        out["tags"] = json.loads(out["tags"])
    return out


async def _backups(db: Database | Connection, where: str, *args: Any) -> list[dict[str, Any]]:
    """``BackupResponse`` objects of the backups matching ``where`` (over ``t``, the view)."""
    return [_backup_dict(r) for r in await db.fetch(f"{_SELECT} WHERE {where}", *args)]


async def load_backup(db: Database | Connection, backup_id: str) -> dict[str, Any]:
    found = await _backups(db, "t.backup_id = $1", backup_id)
    if not found:
        raise ApiError.not_found(f"backup {backup_id!r} not found")
    return found[0]


async def start_backup(
    db: Database,
    box: SecretBox,
    mounts_dir: Path,
    *,
    vm_name: str | None,
    vm_context_id: str | None,
    disk_id: str,
    backup_type: BackupType,
    repository_id: str | None,
    policy_id: str | None,
    tags: dict[str, str],
    wake_engine: Callable[[], None],
) -> dict[str, Any]:
    """Record a ``pending`` backup (see the module doc), call ``wake_engine``, and answer the
    backup as it is then."""
    ctx = await find_context(db, vm_name, vm_context_id)
    assert ctx is not None
    name: str = ctx["vm_name"]
    key = context_key(ctx)
    known = await inventory_disks(db, ctx["vmware_vm_id"], ctx["vm_path"])
    disk = resolve_disk_id(disk_id, known) if known else disk_id
    if disk is None:
        raise ApiError.unprocessable(f"VM {name!r} has no disk {disk_id!r} (its disks: {known})")
    if not known and disk.isdigit():
        raise ApiError.unprocessable(
            f"the inventory does not list the disks of {name!r}, so {disk_id!r} cannot be read"
            " as a disk key or index: give the disk id (e.g. disk-2000) or run a discovery"
        )
    if policy_id is not None:
        policy = await db.fetchrow(
            "SELECT primary_repository_id, enabled FROM backup_policies WHERE id = $1", policy_id
        )
        if policy is None:
            raise ApiError.not_found(f"policy {policy_id!r} not found")
        if not policy["enabled"]:
            raise ApiError.conflict(f"policy {policy_id} is disabled")
        if repository_id is None:
            repository_id = policy["primary_repository_id"]
        elif repository_id != policy["primary_repository_id"]:
            raise ApiError.unprocessable(
                f"policy {policy_id} stores its backups in repository {policy['primary_repository_id']},"
                f" not {repository_id}"
            )
    if repository_id is None:
        raise ApiError.unprocessable(
            "repository_id is required (or a policy_id, whose primary repository is used)"
        )
    repo = await enabled_spec(db, box, repository_id)
    parent = None
    if backup_type == "incremental":
        parent = await db.fetchrow(LATEST_POINT, key, disk, repository_id)
        if parent is None:
            raise ApiError(
                409,
                NO_PARENT,
                f"no completed backup of {name} {disk} in repository {repository_id}:"
                " an incremental needs one to build on (start a full backup first)",
            )
    backup_id = new_id("backup")
    planned = point_path(
        root_of(repo, mounts_dir),
        key,
        disk,
        backup_id,
        Path(parent["file_path"]) if parent and parent["file_path"] else None,
    )
    try:
        await db.execute(
            "INSERT INTO backup_jobs (id, vm_context_id, vm_name, vm_key, vm_path, disk_id, backup_type,"
            " requested_type, repository_id, policy_id, parent_backup_id, chain_id, status, file_path,"
            " manifest_path, tags, current_operation)"
            " VALUES ($1, $2, $3, $13, $4, $5, $6, $6, $7, $8, $9, $10, 'pending', $11, $14, $12::jsonb,"
            " 'queued')",
            backup_id,
            ctx["context_id"],
            name,
            ctx["vm_path"],
            disk,
            backup_type,
            repository_id,
            policy_id,
            parent["id"] if parent else None,
            parent["chain_id"] if parent else backup_id,
            str(planned),
            json.dumps(tags),
            key,
            str(manifest_path(planned)),
        )
    except UniqueViolation as exc:
        if exc.constraint_name != ACTIVE_INDEX:
            raise
        active = await db.fetchval(
            "SELECT id FROM backup_jobs WHERE vm_key = $1 AND disk_id = $2 AND status = ANY($3::text[])",
            key,
            disk,
            list(ACTIVE),
        )
        raise ApiError.conflict(
            f"{name} {disk} already has a backup in progress ({active or 'just ended'})"
        ) from exc
    with log_context(job_id=backup_id, action="backup_start"):
        log.info(
            "backup requested",
            extra={
                "vm_name": name,
                "vm_key": key,
                "disk_id": disk,
                "backup_type": backup_type,
                "repository_id": repository_id,
            },
        )
    wake_engine()
    return await load_backup(db, backup_id)


async def backup_page(
    db: Database,
    page: Page,
    *,
    vm_name: str | None,
    vm_context_id: str | None,
    repository_id: str | None,
    backup_type: BackupType | None,
    status: Status | None,
) -> str:
    """A page of the backups matching every filter given, newest first, as JSON."""
    return await json_page(
        db,
        "backups",
        columns=BACKUP_FIELDS,
        from_where=f"FROM ({BACKUP_VIEW}) t WHERE ($1::text IS NULL OR t.vm_name = $1)"
        " AND ($2::text IS NULL OR t.vm_context_id = $2) AND ($3::text IS NULL OR t.repository_id = $3)"
        " AND ($4::text IS NULL OR t.backup_type = $4) AND ($5::text IS NULL OR t.status = $5)",
        order=[("created_at", "DESC"), ("backup_id", "DESC")],
        args=(vm_name, vm_context_id, repository_id, backup_type, status),
        page=page,
    )


async def backup_chain(
    db: Database, *, vm_name: str | None, vm_context_id: str | None, disk_id: str, repository_id: str | None
) -> dict[str, Any]:
    """The disk's latest chain (in ``repository_id``, else anywhere): its completed points, full
    first. A VM with no backup of that disk answers an empty chain; a VM no longer managed is
    found by the name its backups recorded."""
    ctx = await find_context(db, vm_name, vm_context_id, required=vm_context_id is not None)
    if ctx is not None:
        name, key = ctx["vm_name"], context_key(ctx)
    else:  # a VM no longer managed, known by the name its backups recorded
        name = vm_name
        keys = [
            r["vm_key"]
            for r in await db.fetch(
                "SELECT DISTINCT vm_key FROM backup_jobs WHERE vm_name = $1 ORDER BY vm_key", name
            )
        ]
        if not keys:
            raise ApiError.not_found(f"VM {vm_name!r} is neither managed nor backed up")
        if len(keys) > 1:
            raise ApiError(
                409, AMBIGUOUS_VM, f"backups of {len(keys)} VMs named {name!r} exist: give vm_context_id"
            )
        key = keys[0]
    backed_up = [
        r["disk_id"]
        for r in await db.fetch(
            "SELECT DISTINCT disk_id FROM backup_jobs WHERE vm_key = $1 ORDER BY disk_id", key
        )
    ]
    known = await inventory_disks(db, ctx["vmware_vm_id"], ctx["vm_path"]) if ctx else []
    known += [d for d in backed_up if d not in known]
    disk = resolve_disk_id(disk_id, known)
    if disk is None:
        raise ApiError.not_found(f"VM {name!r} has no disk {disk_id!r} (known disks: {known})")
    chain_id = await db.fetchval(
        "SELECT chain_id FROM backup_jobs WHERE vm_key = $1 AND disk_id = $2"
        " AND ($3::text IS NULL OR repository_id = $3) AND status = 'completed'"
        " ORDER BY completed_at DESC, created_at DESC LIMIT 1",
        key,
        disk,
        repository_id,
    )
    points = (
        await _backups(
            db, "t.chain_id = $1 AND t.status = 'completed' ORDER BY t.created_at, t.backup_id", chain_id
        )
        if chain_id
        else []
    )
    full = next((p for p in points if p["parent_backup_id"] is None), points[0] if points else None)
    return {
        "chain_id": chain_id,
        "full_backup_id": full["backup_id"] if full else None,
        "backups": points,
        "total_size_bytes": sum(p["stored_bytes"] or 0 for p in points),
        "backup_count": len(points),
        "vm_name": name,
        "disk_id": disk,
        "repository_id": points[-1]["repository_id"] if points else repository_id,
    }
