"""Backups: start, list, get, delete, and the chain of a VM disk (the seed's "Backup API Endpoints");
the HTTP side of :mod:`oma.backups.points`, :mod:`oma.backups.chains` and :mod:`oma.backups.verify`.

``DELETE /backup/{id}`` is :func:`oma.backups.chains.delete_backup`: every remaining point stays
restorable (docs/backup.md, "Deleting a point").

The static routes ``/backup/list`` and ``/backup/chain`` are registered before
``/backup/{backup_id}``, and Werkzeug ranks static parts first anyway: a backup id is never read
as ``list`` or ``chain``.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from oma.api.access import requires
from oma.api.requests import MAX_NAME, PageQuery, QueryModel, RequestModel, json_response, not_cut_short
from oma.backups import points
from oma.backups.chains import delete_backup
from oma.backups.points import Status
from oma.backups.verify import verify_backup
from oma.state import state
from pyapp.api import ApiError
from pyapp.logs import log_context

log = logging.getLogger(__name__)
bp = Blueprint("backups", __name__)

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


@bp.post("/backup/start")
@requires("operator")
@validate_request(StartBackupRequest)
async def start_backup(data: StartBackupRequest) -> tuple[dict[str, Any], int]:
    st = state()
    backup = await points.start_backup(
        st.db,
        st.box,
        st.config.mounts_dir,
        vm_name=data.vm_name,
        vm_context_id=data.vm_context_id,
        disk_id=data.disk_id,
        backup_type=data.backup_type,
        repository_id=data.repository_id,
        policy_id=data.policy_id,
        tags=data.tags,
        wake_engine=st.wake_backup_engine,
    )
    return backup, 202


@bp.get("/backup/list")
@requires("viewer")
@validate_querystring(BackupListQuery)
async def list_backups(query_args: BackupListQuery) -> Response:
    q = query_args
    return json_response(
        await points.backup_page(
            state().db,
            q,
            vm_name=q.vm_name,
            vm_context_id=q.vm_context_id,
            repository_id=q.repository_id,
            backup_type=q.backup_type,
            status=q.status,
        )
    )


@bp.get("/backup/chain")
@requires("viewer")
@validate_querystring(ChainQuery)
async def backup_chain(query_args: ChainQuery) -> dict[str, Any]:
    """The disk's latest chain (in ``repository_id``, else anywhere): its completed points, full
    first. A VM with no backup of that disk answers an empty chain."""
    q = query_args
    if q.vm_name is None and q.vm_context_id is None:
        raise ApiError.bad_request("vm_name or vm_context_id is required")
    return await points.backup_chain(
        state().db,
        vm_name=q.vm_name,
        vm_context_id=q.vm_context_id,
        disk_id=q.disk_id,
        repository_id=q.repository_id,
    )


@bp.get("/backup/<backup_id>")
@requires("viewer")
async def get_backup(backup_id: str) -> dict[str, Any]:
    return await points.load_backup(state().db, backup_id)


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
