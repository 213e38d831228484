"""File-level restore (the seed's "File-Level Restore") and full restore, under ``/api/v1``.

Mount a completed backup point, browse it, download files and directories, unmount; watch the
resources and the cleanup service; restore a point whole to a raw file or device, a new QCOW2
image (both only under an administrator's restore root, ``OMA_RESTORE_ROOTS``) or an NBD
target. The contract is docs/backup.md ("File-level restore", "Full restore"); the work is done
by :mod:`oma.restore`. Every view touches the mount it serves (``last_access_at``); downloads
keep touching it while they stream.
"""

from __future__ import annotations

import mimetypes
import time
from collections.abc import AsyncIterator
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from oma.api.requests import MAX_NAME, MAX_TEXT, PageQuery, RequestModel, json_response
from oma.auth import current_principal, requires
from oma.restore.archive import CHUNK, ArchiveFormat, stream_archive
from oma.restore.full import JOB_COLUMNS, LIST_COLUMNS, check_restore_root, job_body
from oma.restore.service import RestoreService, restore_service
from oma.store.pages import json_page
from pyapp.api import ApiError

bp = Blueprint("restore", __name__)

MAX_LISTING = 100_000
KEEPALIVE_S = 30.0


class MountRequest(RequestModel):
    backup_id: str = Field(min_length=1, max_length=MAX_NAME)
    volume: str | None = Field(
        None, min_length=1, max_length=MAX_NAME, description="mount only this volume (part1, lvm-vg-lv, ...)"
    )


class ListFilesQuery(BaseModel):
    path: str = Field("/", max_length=MAX_TEXT)
    recursive: bool = False
    limit: int = Field(10_000, ge=1, le=MAX_LISTING, description="at most this many entries")


class PathQuery(BaseModel):
    path: str = Field(min_length=1, max_length=MAX_TEXT)


class DirectoryDownloadQuery(BaseModel):
    path: str = Field(min_length=1, max_length=MAX_TEXT)
    format: Literal["zip", "tar.gz"] = "zip"


class FullRestoreRequest(RequestModel):
    backup_id: str = Field(min_length=1, max_length=MAX_NAME)
    target_type: Literal["raw", "qcow2", "nbd"]
    target: str = Field(min_length=1, max_length=MAX_TEXT)


class FullRestoreListQuery(PageQuery):
    status: Literal["pending", "running", "completed", "failed", "cancelled"] | None = None
    backup_id: str | None = Field(None, max_length=MAX_NAME)


class _Keepalive:
    """Touches the mount while a download streams, so a long download keeps it from expiring."""

    def __init__(self, service: RestoreService, mount_id: str) -> None:
        self._service = service
        self._mount_id = mount_id
        self._last = time.monotonic()

    async def __call__(self) -> None:
        if time.monotonic() - self._last >= KEEPALIVE_S:
            self._last = time.monotonic()
            await self._service.touch(self._mount_id)


def _disposition(filename: str) -> str:
    """``Content-Disposition`` for a name read from a guest: an ASCII fallback without quotes or
    control characters (a hostile name must not break the header), and the exact name in
    RFC 5987 form."""
    ascii_name = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    exact = quote(filename, safe="", errors="surrogateescape")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{exact}"


def _streamed(body: AsyncIterator[bytes], content_type: str, filename: str, length: int | None) -> Response:
    response = Response(body, content_type=content_type)
    response.headers["Content-Disposition"] = _disposition(filename)
    if length is not None:
        response.headers["Content-Length"] = str(length)
    response.timeout = None  # a download may take longer than RESPONSE_TIMEOUT
    return response


@bp.post("/restore/mount")
@requires("operator")
@validate_request(MountRequest)
async def mount_backup(data: MountRequest) -> tuple[dict[str, Any], int]:
    return await restore_service().create_mount(data.backup_id, data.volume, current_principal().subject), 201


@bp.delete("/restore/<mount_id>")
@requires("operator")
async def unmount_backup(mount_id: str) -> dict[str, Any]:
    return await restore_service().unmount(mount_id)


@bp.get("/restore/mounts")
@requires("viewer")
async def list_mounts() -> dict[str, Any]:
    mounts = await restore_service().active_mounts()
    return {"mounts": mounts, "count": len(mounts)}


@bp.get("/restore/<mount_id>/files")
@requires("operator")
@validate_querystring(ListFilesQuery)
async def list_files(mount_id: str, query_args: ListFilesQuery) -> dict[str, Any]:
    service = restore_service()
    mount = await service.touch(mount_id)
    files, truncated = await service.run_sync(
        lambda: mount.listdir(query_args.path, recursive=query_args.recursive, limit=query_args.limit)
    )
    return {
        "mount_id": mount_id,
        "path": query_args.path,
        "recursive": query_args.recursive,
        "files": files,
        "total_count": len(files),
        "truncated": truncated,
    }


@bp.get("/restore/<mount_id>/file-info")
@requires("operator")
@validate_querystring(PathQuery)
async def file_info(mount_id: str, query_args: PathQuery) -> dict[str, Any]:
    service = restore_service()
    mount = await service.touch(mount_id)
    return await service.run_sync(mount.stat, query_args.path)


@bp.get("/restore/<mount_id>/download")
@requires("operator")
@validate_querystring(PathQuery)
async def download_file(mount_id: str, query_args: PathQuery) -> Response:
    service = restore_service()
    mount = await service.touch(mount_id)
    reader, info = await service.run_sync(mount.open_file, query_args.path)
    keepalive = _Keepalive(service, mount_id)

    async def body() -> AsyncIterator[bytes]:
        try:
            while chunk := await service.run_sync(reader.read, CHUNK):
                yield chunk
                await keepalive()
        finally:
            reader.close()

    content_type = mimetypes.guess_type(info["name"])[0] or "application/octet-stream"
    return _streamed(body(), content_type, info["name"], int(info["size"]))


@bp.get("/restore/<mount_id>/download-directory")
@requires("operator")
@validate_querystring(DirectoryDownloadQuery)
async def download_directory(mount_id: str, query_args: DirectoryDownloadQuery) -> Response:
    service = restore_service()
    mount = await service.touch(mount_id)
    start = await service.run_sync(mount.locate_directory, query_args.path)
    fmt: ArchiveFormat = query_args.format
    root_name = start.parts[-1] if start.parts else f"restore-{mount_id}"
    body = stream_archive(
        fmt,
        mount,
        start,
        root_name,
        producers=service.archive_producers,
        on_chunk=_Keepalive(service, mount_id),
    )
    content_type = "application/zip" if fmt == "zip" else "application/gzip"
    return _streamed(body, content_type, f"{root_name}.{fmt}", None)


@bp.get("/restore/resources")
@requires("viewer")
async def resources() -> dict[str, Any]:
    return await restore_service().resources()


@bp.get("/restore/cleanup-status")
@requires("viewer")
async def cleanup_status() -> dict[str, Any]:
    return await restore_service().cleanup_status()


@bp.post("/restore/full")
@requires("operator")
@validate_request(FullRestoreRequest)
async def start_full_restore(data: FullRestoreRequest) -> tuple[dict[str, Any], int]:
    service = restore_service()
    # A path target only under an administrator's restore root (403 TARGET_NOT_ALLOWED).
    await service.run_sync(check_restore_root, data.target_type, data.target, service.config.restore_roots)
    job = await service.start_full_restore(
        data.backup_id, data.target_type, data.target, current_principal().subject
    )
    return job, 202


@bp.get("/restore/full")
@requires("viewer")
@validate_querystring(FullRestoreListQuery)
async def list_full_restores(query_args: FullRestoreListQuery) -> Response:
    return json_response(await json_page(
        restore_service().db,
        "restores",
        columns=LIST_COLUMNS,
        from_where="FROM restore_jobs t WHERE ($1::text IS NULL OR t.status = $1)"
        " AND ($2::text IS NULL OR t.backup_id = $2)",
        order=[("created_at", "DESC"), ("id", "DESC")],
        args=(query_args.status, query_args.backup_id),
        page=query_args,
    ))


@bp.get("/restore/full/<restore_id>")
@requires("viewer")
async def get_full_restore(restore_id: str) -> dict[str, Any]:
    row = await restore_service().db.fetchrow(
        f"SELECT {JOB_COLUMNS} FROM restore_jobs WHERE id = $1", restore_id
    )
    if row is None:
        raise ApiError.not_found(f"restore job {restore_id!r} not found", "RESTORE_NOT_FOUND")
    return job_body(row)
