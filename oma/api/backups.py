"""Backups: start, list, get, delete, and the chain of a VM disk (the seed's "Backup API Endpoints").

``POST /backup/start`` only records a ``pending`` backup after checking what can be checked at
once — the VM is managed, the disk is one of its disks, the repository exists and is enabled, the
policy (if any) stores into that repository, an incremental has a completed point to build on
(else 409 ``NO_PARENT``) — and wakes the backup engine (``oma/backups/engine.py``), which does the
rest. A partial unique index allows one *active* backup per VM disk, so two concurrent starts for
one disk give one backup and one 409, decided by PostgreSQL.

Disks are named as the inventory names them (``disk-2000``); like replication, a request may also
give the disk's key (``2000``) or its index among the VM's disks (``0``).

``DELETE /backup/{id}`` is :func:`oma.backups.chains.delete_backup`: every remaining point stays
restorable (docs/backup.md, "Deleting a point").

The static routes ``/backup/list`` and ``/backup/chain`` are registered before
``/backup/{backup_id}``, and Werkzeug ranks static parts first anyway: a backup id is never read
as ``list`` or ``chain``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from oma.api.requests import MAX_NAME, PageQuery, QueryModel, RequestModel, json_response, not_cut_short
from oma.auth import requires
from oma.backups.chains import delete_backup
from oma.backups.engine import ACTIVE, LATEST_POINT
from oma.backups.layout import manifest_path, point_path, vm_key
from oma.backups.repositories import enabled_spec, root_of
from oma.backups.verify import verify_backup
from oma.state import state
from oma.store.pages import json_page
from oma.store.rows import json_columns, new_id
from pyapp.api import ApiError
from pyapp.db import Connection, Database, Record, UniqueViolation
from pyapp.logs import log_context

log = logging.getLogger(__name__)
bp = Blueprint("backups", __name__)

NO_PARENT = "NO_PARENT"
AMBIGUOUS_VM = "AMBIGUOUS_VM"
VM_IDENTITY_UNKNOWN = "VM_IDENTITY_UNKNOWN"
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
TagText = Annotated[str, Field(max_length=MAX_NAME)]


class StartBackupRequest(RequestModel):
    vm_name: str | None = Field(
        None, min_length=1, max_length=MAX_NAME, description="a managed VM (its VM context)"
    )
    vm_context_id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_NAME,
        description="the VM context; required when two managed VMs share the name",
    )
    disk_id: str = Field(
        min_length=1, max_length=MAX_NAME, description="disk id (disk-2000), key (2000) or index (0)"
    )
    backup_type: Literal["full", "incremental"]
    repository_id: str | None = Field(
        None, min_length=1, max_length=MAX_NAME, description="omitted: the policy's primary repository"
    )
    policy_id: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    tags: dict[TagText, TagText] = Field(default_factory=dict, max_length=64)


class BackupListQuery(PageQuery):
    vm_name: str | None = Field(None, max_length=MAX_NAME)
    vm_context_id: str | None = Field(None, max_length=MAX_NAME)
    repository_id: str | None = Field(None, max_length=MAX_NAME)
    backup_type: Literal["full", "incremental"] | None = None
    status: Status | None = None


class ChainQuery(QueryModel):
    vm_name: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    vm_context_id: str | None = Field(None, min_length=1, max_length=MAX_NAME)
    disk_id: str = Field("0", min_length=1, max_length=MAX_NAME, description="disk id, key or index")
    repository_id: str | None = Field(
        None, min_length=1, max_length=MAX_NAME, description="omitted: the disk's latest chain anywhere"
    )


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


def resolve_disk_id(requested: str, known: Sequence[str]) -> str | None:
    """The disk ``requested`` names among ``known`` (in the VM's order): its id (``disk-2000``),
    its key (``2000``) or its index (``0``). None when it names none of them."""
    if requested in known:
        return requested
    if requested.isdigit():
        if f"disk-{requested}" in known:
            return f"disk-{requested}"
        index = int(requested)
        if index < len(known):
            return known[index]
    return None


async def _inventory_disks(db: Database, vmware_vm_id: str | None, vm_path: str) -> list[str]:
    """The VM's disk ids in inventory order (empty when the inventory does not know the VM)."""
    row = await db.fetchrow(
        "SELECT disks FROM vms WHERE ($1::text IS NOT NULL AND id = $1) OR path = $2 LIMIT 1",
        vmware_vm_id,
        vm_path,
    )
    disks = (
        json.loads(row["disks"]) if row and isinstance(row["disks"], str) else (row["disks"] if row else [])
    )
    return [str(d["id"]) for d in disks if isinstance(d, dict) and d.get("id")]


async def find_context(
    db: Database, vm_name: str | None, vm_context_id: str | None, *, required: bool = True
) -> Record | None:
    """The VM context a request names by ``vm_context_id`` and/or ``vm_name``. Names are for
    display only: a name that two managed VMs share (one name in two folders) is refused with
    409 ``AMBIGUOUS_VM`` rather than guessed. None (``required`` off) when nothing matches."""
    if vm_name is None and vm_context_id is None:
        raise ApiError.unprocessable("vm_name or vm_context_id is required")
    rows = await db.fetch(
        "SELECT context_id, vm_name, vm_path, vmware_vm_id, vcenter_host FROM vm_contexts"
        " WHERE ($1::text IS NULL OR vm_name = $1) AND ($2::text IS NULL OR context_id = $2)"
        " ORDER BY context_id LIMIT 10",
        vm_name,
        vm_context_id,
    )
    if len(rows) > 1:
        raise ApiError(
            409,
            AMBIGUOUS_VM,
            f"{len(rows)} managed VMs are named {vm_name!r}"
            f" ({', '.join(str(r['context_id']) + ' at ' + str(r['vm_path']) for r in rows)}):"
            " give vm_context_id",
        )
    if not rows:
        if not required:
            return None
        if vm_context_id is not None:
            raise ApiError.not_found(f"no VM context {vm_context_id!r} (with vm_name {vm_name!r})")
        raise ApiError.not_found(
            f"VM {vm_name!r} is not managed (no VM context): add it through discovery first"
        )
    row: Record = rows[0]
    return row


def context_key(ctx: Record) -> str:
    """The stable identity a context's backups are keyed by (oma/backups/layout.py)."""
    if not ctx["vmware_vm_id"]:
        raise ApiError(
            409,
            VM_IDENTITY_UNKNOWN,
            f"the managed object id of VM {ctx['vm_name']!r} is unknown, and backups are keyed by it,"
            " never by a name: run a discovery of the VM first",
        )
    return vm_key(ctx["vcenter_host"] or "", ctx["vmware_vm_id"])


@bp.post("/backup/start")
@requires("operator")
@validate_request(StartBackupRequest)
async def start_backup(data: StartBackupRequest) -> tuple[dict[str, Any], int]:
    st = state()
    db = st.db
    ctx = await find_context(db, data.vm_name, data.vm_context_id)
    assert ctx is not None
    vm_name: str = ctx["vm_name"]
    key = context_key(ctx)
    known = await _inventory_disks(db, ctx["vmware_vm_id"], ctx["vm_path"])
    disk_id = resolve_disk_id(data.disk_id, known) if known else data.disk_id
    if disk_id is None:
        raise ApiError.unprocessable(f"VM {vm_name!r} has no disk {data.disk_id!r} (its disks: {known})")
    if not known and disk_id.isdigit():
        raise ApiError.unprocessable(
            f"the inventory does not list the disks of {vm_name!r}, so {data.disk_id!r} cannot be read"
            " as a disk key or index: give the disk id (e.g. disk-2000) or run a discovery"
        )
    repository_id = data.repository_id
    if data.policy_id is not None:
        policy = await db.fetchrow(
            "SELECT primary_repository_id, enabled FROM backup_policies WHERE id = $1", data.policy_id
        )
        if policy is None:
            raise ApiError.not_found(f"policy {data.policy_id!r} not found")
        if not policy["enabled"]:
            raise ApiError.conflict(f"policy {data.policy_id} is disabled")
        if repository_id is None:
            repository_id = policy["primary_repository_id"]
        elif repository_id != policy["primary_repository_id"]:
            raise ApiError.unprocessable(
                f"policy {data.policy_id} stores its backups in repository {policy['primary_repository_id']},"
                f" not {repository_id}"
            )
    if repository_id is None:
        raise ApiError.unprocessable(
            "repository_id is required (or a policy_id, whose primary repository is used)"
        )
    repo = await enabled_spec(db, st.box, repository_id)
    parent = None
    if data.backup_type == "incremental":
        parent = await db.fetchrow(LATEST_POINT, key, disk_id, repository_id)
        if parent is None:
            raise ApiError(
                409,
                NO_PARENT,
                f"no completed backup of {vm_name} {disk_id} in repository {repository_id}:"
                " an incremental needs one to build on (start a full backup first)",
            )
    backup_id = new_id("backup")
    planned = point_path(
        root_of(repo, st.config.mounts_dir),
        key,
        disk_id,
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
            vm_name,
            ctx["vm_path"],
            disk_id,
            data.backup_type,
            repository_id,
            data.policy_id,
            parent["id"] if parent else None,
            parent["chain_id"] if parent else backup_id,
            str(planned),
            json.dumps(data.tags),
            key,
            str(manifest_path(planned)),
        )
    except UniqueViolation as exc:
        if exc.constraint_name != ACTIVE_INDEX:
            raise
        active = await db.fetchval(
            "SELECT id FROM backup_jobs WHERE vm_key = $1 AND disk_id = $2 AND status = ANY($3::text[])",
            key,
            disk_id,
            list(ACTIVE),
        )
        raise ApiError.conflict(
            f"{vm_name} {disk_id} already has a backup in progress ({active or 'just ended'})"
        ) from exc
    with log_context(job_id=backup_id, action="backup_start"):
        log.info(
            "backup requested",
            extra={
                "vm_name": vm_name,
                "vm_key": key,
                "disk_id": disk_id,
                "backup_type": data.backup_type,
                "repository_id": repository_id,
            },
        )
    st.wake_backup_engine()
    return await load_backup(db, backup_id), 202


@bp.get("/backup/list")
@requires("viewer")
@validate_querystring(BackupListQuery)
async def list_backups(query_args: BackupListQuery) -> Response:
    q = query_args
    return json_response(await json_page(
        state().db,
        "backups",
        columns=BACKUP_FIELDS,
        from_where=f"FROM ({BACKUP_VIEW}) t WHERE ($1::text IS NULL OR t.vm_name = $1)"
        " AND ($2::text IS NULL OR t.vm_context_id = $2) AND ($3::text IS NULL OR t.repository_id = $3)"
        " AND ($4::text IS NULL OR t.backup_type = $4) AND ($5::text IS NULL OR t.status = $5)",
        order=[("created_at", "DESC"), ("backup_id", "DESC")],
        args=(q.vm_name, q.vm_context_id, q.repository_id, q.backup_type, q.status),
        page=q,
    ))


@bp.get("/backup/chain")
@requires("viewer")
@validate_querystring(ChainQuery)
async def backup_chain(query_args: ChainQuery) -> dict[str, Any]:
    """The disk's latest chain (in ``repository_id``, else anywhere): its completed points, full
    first. A VM with no backup of that disk answers an empty chain."""
    q = query_args
    db = state().db
    if q.vm_name is None and q.vm_context_id is None:
        raise ApiError.bad_request("vm_name or vm_context_id is required")
    ctx = await find_context(db, q.vm_name, q.vm_context_id, required=q.vm_context_id is not None)
    if ctx is not None:
        vm_name, key = ctx["vm_name"], context_key(ctx)
    else:  # a VM no longer managed, known by the name its backups recorded
        vm_name = q.vm_name
        keys = [
            r["vm_key"]
            for r in await db.fetch(
                "SELECT DISTINCT vm_key FROM backup_jobs WHERE vm_name = $1 ORDER BY vm_key", vm_name
            )
        ]
        if not keys:
            raise ApiError.not_found(f"VM {q.vm_name!r} is neither managed nor backed up")
        if len(keys) > 1:
            raise ApiError(
                409, AMBIGUOUS_VM, f"backups of {len(keys)} VMs named {vm_name!r} exist: give vm_context_id"
            )
        key = keys[0]
    backed_up = [
        r["disk_id"]
        for r in await db.fetch(
            "SELECT DISTINCT disk_id FROM backup_jobs WHERE vm_key = $1 ORDER BY disk_id", key
        )
    ]
    known = await _inventory_disks(db, ctx["vmware_vm_id"], ctx["vm_path"]) if ctx else []
    known += [d for d in backed_up if d not in known]
    disk_id = resolve_disk_id(q.disk_id, known)
    if disk_id is None:
        raise ApiError.not_found(f"VM {vm_name!r} has no disk {q.disk_id!r} (known disks: {known})")
    chain_id = await db.fetchval(
        "SELECT chain_id FROM backup_jobs WHERE vm_key = $1 AND disk_id = $2"
        " AND ($3::text IS NULL OR repository_id = $3) AND status = 'completed'"
        " ORDER BY completed_at DESC, created_at DESC LIMIT 1",
        key,
        disk_id,
        q.repository_id,
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
        "vm_name": vm_name,
        "disk_id": disk_id,
        "repository_id": points[-1]["repository_id"] if points else q.repository_id,
    }


@bp.get("/backup/<backup_id>")
@requires("viewer")
async def get_backup(backup_id: str) -> dict[str, Any]:
    return await load_backup(state().db, backup_id)


@bp.delete("/backup/<backup_id>")
@requires("operator")
async def delete_backup_point(backup_id: str) -> dict[str, Any]:
    st = state()
    with log_context(job_id=backup_id, action="backup_delete"), not_cut_short():
        # Not cut short by a client that hangs up: a delete stopped half-way leaves its points
        # 'deleting' until a retry or retention finishes it.
        answer = await delete_backup(st.db, st.box, st.config.mounts_dir, backup_id)
        log.info("backup deleted", extra={"merged_into": answer.get("merged_into")})
    return answer


@bp.post("/backup/<backup_id>/verify")
@requires("operator")
async def verify_backup_point(backup_id: str) -> dict[str, Any]:
    """Re-read every layer of the point, in every repository holding it, against its manifests
    (``oma/backups/verify.py``): a flipped byte on a repository disk is named by file and chunk."""
    st = state()
    with log_context(job_id=backup_id, action="backup_verify"):
        answer = await verify_backup(st.db, st.box, st.config.mounts_dir, backup_id)
        log.info("backup verified", extra={"ok": answer["ok"]})
    return answer
