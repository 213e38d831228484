"""The repositories the OMA knows (``backup_repositories``): created, listed, measured, tested and
deleted. :mod:`oma.backups.repositories` prepares the place itself (validation, mounting, probes).

A repository is saved only once it has really been prepared — the local directory created, the
NFS export or CIFS share mounted — and has taken a probe file: a repository that cannot be
reached is refused (422 ``REPOSITORY_UNAVAILABLE`` with the mount's own message) rather than
stored to fail at the first backup. Two repositories never share files: a root that is another's,
lies inside one or holds one is refused (409 ``REPOSITORY_OVERLAP``). The CIFS password is
encrypted with the secret box before it reaches the database and is never part of an answer.

Capacity figures are stored in the row (``total_bytes`` … ``storage_checked_at``). A listing
refreshes those older than :data:`STORAGE_MAX_AGE` without mounting anything (a share that is
not mounted keeps its last figures and says why in ``last_error``); :func:`fresh_storage`
prepares the repository (mounting it if needed) and reads them afresh.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import trio

from oma.backups import repositories as repos
from oma.backups.repositories import (
    REPOSITORY_OVERLAP,
    REPOSITORY_UNAVAILABLE,
    RepositoryError,
    RepositorySpec,
    RepositoryType,
    StorageInfo,
)
from oma.crypto import SecretBox
from oma.store.rows import new_id
from pyapp.api import ApiError
from pyapp.db import Connection, Database, Record, UniqueViolation
from pyapp.logs import log_context

log = logging.getLogger(__name__)

#: Serialises "check overlaps, then insert" of repository creations ("oma_rep1").
_CREATE_LOCK_KEY = 0x6F6D615F72657031
#: Stored capacity figures older than this are read again when repositories are listed.
STORAGE_MAX_AGE = dt.timedelta(minutes=1)
#: How long a listing waits for one ``statvfs`` (a hung NFS server must not hang the listing).
STATVFS_TIMEOUT_S = 5.0
COLUMNS = (
    "r.id, r.name, r.type, r.config, r.secret_ciphertext, r.enabled, r.immutable, r.immutable_days,"
    " r.total_bytes, r.used_bytes, r.available_bytes, r.storage_checked_at, r.last_error,"
    " r.created_at, r.updated_at,"
    " (SELECT count(*) FROM backup_jobs b WHERE b.repository_id = r.id AND b.status = 'completed')"
    " + (SELECT count(*) FROM backup_copies c WHERE c.repository_id = r.id AND c.status = 'completed')"
    " AS backup_count"
)


def _public_spec(row: Record) -> RepositorySpec:
    """The spec without its password: enough to find, read and unmount the repository."""
    return RepositorySpec(row["id"], row["type"], repos.config_of(row))


async def _answer(row: Record, mounts_dir: Path) -> dict[str, Any]:
    """:func:`_response` with ``immutability``: for an immutable repository, whether its locks
    are ``enforced`` by the file system (immutable attribute) or only ``advisory`` (NFS, CIFS,
    a file system without the attribute); None for a repository without locks."""
    mode = None
    if row["immutable"] and row["immutable_days"] > 0:
        mode = await trio.to_thread.run_sync(repos.lock_mode, _public_spec(row), mounts_dir)
    return _response(row, mode, mounts_dir)


def _response(row: Record, immutability: str | None, mounts_dir: Path) -> dict[str, Any]:
    """``RepositoryResponse``: the row without its secret; the config never holds the password
    (it is kept apart, encrypted), ``has_password`` says whether one is stored."""
    spec = _public_spec(row)
    return {
        "id": row["id"],
        "name": row["name"],
        "type": row["type"],
        "config": dict(spec.config),
        "has_password": row["secret_ciphertext"] is not None,
        "enabled": row["enabled"],
        "immutable": row["immutable"],
        "immutable_days": row["immutable_days"],
        "immutability": immutability,
        "storage": {
            "total_bytes": row["total_bytes"],
            "used_bytes": row["used_bytes"],
            "available_bytes": row["available_bytes"],
            "mount_point": str(repos.root_of(spec, mounts_dir)),
            "checked_at": row["storage_checked_at"],
        },
        "last_error": row["last_error"],
        "backup_count": row["backup_count"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


async def _load(conn: Database | Connection, repository_id: str) -> Record:
    row = await conn.fetchrow(f"SELECT {COLUMNS} FROM backup_repositories r WHERE r.id = $1", repository_id)
    if row is None:
        raise ApiError.not_found(f"repository {repository_id} not found")
    return row


async def _store_storage(
    db: Database, repository_id: str, info: StorageInfo | None, error: str | None
) -> None:
    """Record a capacity reading (figures and time), or why there is none (``last_error``)."""
    if info is None:
        await db.execute("UPDATE backup_repositories SET last_error = $2 WHERE id = $1", repository_id, error)
        return
    await db.execute(
        "UPDATE backup_repositories SET total_bytes = $2, used_bytes = $3, available_bytes = $4,"
        " storage_checked_at = now(), last_error = NULL WHERE id = $1",
        repository_id,
        info.total_bytes,
        info.used_bytes,
        info.available_bytes,
    )


async def _refresh_if_stale(db: Database, row: Record, now: dt.datetime, mounts_dir: Path) -> bool:
    """Read the capacity of a repository whose figures are older than :data:`STORAGE_MAX_AGE`.
    True when the row changed."""
    checked = row["storage_checked_at"]
    if checked is not None and now - checked < STORAGE_MAX_AGE:
        return False
    info: StorageInfo | None = None
    error: str | None = None
    with trio.move_on_after(STATVFS_TIMEOUT_S) as scope:
        try:
            # A read-only statvfs: abandoning it on timeout leaves nothing half-written.
            info = await trio.to_thread.run_sync(
                repos.current_storage, _public_spec(row), mounts_dir, abandon_on_cancel=True
            )
        except RepositoryError as e:
            error = str(e)
    if scope.cancelled_caught:
        error = f"reading the capacity took more than {STATVFS_TIMEOUT_S:.0f} s"
    await _store_storage(db, row["id"], info, error)
    return True


async def create_repository(
    db: Database,
    box: SecretBox,
    mounts_dir: Path,
    *,
    name: str,
    repo_type: RepositoryType,
    config: dict[str, Any],
    enabled: bool,
    immutable: bool,
    immutable_days: int,
) -> dict[str, Any]:
    """Validate, prepare (mount, probe) and only then record a new repository."""
    config, password = repos.validate_config(repo_type, config)
    repository_id = new_id("repo")
    spec = RepositorySpec(repository_id, repo_type, config, password)
    root = str(repos.root_of(spec, mounts_dir))
    if await db.fetchval("SELECT EXISTS (SELECT 1 FROM backup_repositories WHERE name = $1)", name):
        raise ApiError.conflict(f"a repository named {name!r} already exists")
    await _refuse_overlap(db, spec, name, mounts_dir)  # before anything is mounted or created
    try:
        info = await trio.to_thread.run_sync(repos.ready_storage, spec, mounts_dir)
    except RepositoryError as e:
        raise ApiError(422, REPOSITORY_UNAVAILABLE, f"repository {name!r} is unavailable: {e}") from e
    ciphertext = box.encrypt(password, repos.SECRET_PURPOSE) if password is not None else None
    try:
        async with db.transaction() as conn:
            # Checked again under a lock with the insert: two creations at once cannot both pass.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _CREATE_LOCK_KEY)
            await _refuse_overlap(conn, spec, name, mounts_dir)
            await conn.execute(
                "INSERT INTO backup_repositories (id, name, type, config, secret_ciphertext, enabled,"
                " immutable, immutable_days, total_bytes, used_bytes, available_bytes, storage_checked_at)"
                " VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10, $11, now())",
                repository_id,
                name,
                repo_type,
                json.dumps(config),
                ciphertext,
                enabled,
                immutable,
                immutable_days,
                info.total_bytes,
                info.used_bytes,
                info.available_bytes,
            )
    except UniqueViolation as exc:
        await trio.to_thread.run_sync(_release_quietly, spec, mounts_dir)
        raise ApiError.conflict(f"a repository named {name!r} already exists") from exc
    except ApiError:
        await trio.to_thread.run_sync(_release_quietly, spec, mounts_dir)
        raise
    with log_context(action="repository_create"):
        log.info(
            "backup repository created",
            extra={"repository_id": repository_id, "type": repo_type, "root": root},
        )
    return await _answer(await _load(db, repository_id), mounts_dir)


async def _refuse_overlap(
    conn: Database | Connection, spec: RepositorySpec, name: str, mounts_dir: Path
) -> None:
    """409 ``REPOSITORY_OVERLAP`` when the new repository's root is an existing repository's,
    lies inside one or holds one, symlinks resolved; a local repository may not hold the
    directory where network repositories are mounted either (it would hold all of them)."""
    rows = await conn.fetch("SELECT id, name, type, config FROM backup_repositories")
    others = [
        (
            f"repository {r['name']!r}",
            repos.root_of(RepositorySpec(r["id"], r["type"], repos.config_of(r)), mounts_dir),
        )
        for r in rows
    ]
    root = repos.root_of(spec, mounts_dir)
    found = await trio.to_thread.run_sync(repos.overlap, root, others)
    if found is None and spec.type == "local":
        found = await trio.to_thread.run_sync(
            repos.overlap, root, [("the directory where network repositories are mounted", mounts_dir)]
        )
    if found is not None:
        what, where = found
        raise ApiError(
            409,
            REPOSITORY_OVERLAP,
            f"repository {name!r} at {root} overlaps {what} at {where} (the same directory, or one"
            " inside the other, symlinks resolved): two repositories never share files",
        )


def _release_quietly(spec: RepositorySpec, mounts_dir: Path) -> None:
    try:
        repos.release(spec, mounts_dir)
    except RepositoryError as e:
        log.warning("could not unmount %s: %s", spec.id, e)


async def list_repositories(
    db: Database, mounts_dir: Path, repo_type: RepositoryType | None, enabled: bool | None
) -> dict[str, Any]:
    """Every repository (optionally of one type, enabled or not), by name; stale capacity
    figures are read again first."""
    sql = (
        f"SELECT {COLUMNS} FROM backup_repositories r WHERE ($1::text IS NULL OR r.type = $1)"
        " AND ($2::boolean IS NULL OR r.enabled = $2) ORDER BY r.name"
    )
    args = (repo_type, enabled)
    rows = await db.fetch(sql, *args)
    now = await db.fetchval("SELECT now()")
    stale = False
    for row in rows:
        stale |= await _refresh_if_stale(db, row, now, mounts_dir)
    if stale:
        rows = await db.fetch(sql, *args)
    items = [await _answer(r, mounts_dir) for r in rows]
    return {"repositories": items, "count": len(items)}


async def get_repository(db: Database, mounts_dir: Path, repository_id: str) -> dict[str, Any]:
    return await _answer(await _load(db, repository_id), mounts_dir)


async def fresh_storage(db: Database, box: SecretBox, mounts_dir: Path, repository_id: str) -> dict[str, Any]:
    """A fresh capacity reading; the repository is prepared (mounted) first, like a backup would."""
    row = await _load(db, repository_id)
    try:
        info = await trio.to_thread.run_sync(repos.prepare_storage, repos.spec_from_row(row, box), mounts_dir)
    except RepositoryError as e:
        await _store_storage(db, repository_id, None, str(e))
        raise ApiError(503, REPOSITORY_UNAVAILABLE, f"repository {repository_id} is unavailable: {e}") from e
    await _store_storage(db, repository_id, info, None)
    checked_at = await db.fetchval(
        "SELECT storage_checked_at FROM backup_repositories WHERE id = $1", repository_id
    )
    return {"repository_id": repository_id, **info.as_dict(), "checked_at": checked_at}


async def try_repository(
    mounts_dir: Path, repo_type: RepositoryType, config: dict[str, Any]
) -> dict[str, Any]:
    """Try a configuration without saving it: ``success: false`` when it cannot be reached,
    422 when the configuration itself is invalid."""
    config, password = repos.validate_config(repo_type, config)
    spec = RepositorySpec(new_id("test"), repo_type, config, password)
    try:
        info = await trio.to_thread.run_sync(repos.try_config, spec, mounts_dir)
    except RepositoryError as e:
        return {"success": False, "message": f"the {repo_type} repository cannot be used", "error": str(e)}
    where = config.get("disk_path") or (
        f"{config['server']}:{config['export_path']}"
        if repo_type == "nfs"
        else f"//{config['server']}/{config['share_name']}"
    )
    return {
        "success": True,
        "message": f"{where} is reachable and writable; {info.available_bytes} bytes available",
        "storage": info.as_dict(),
    }


async def delete_repository(db: Database, mounts_dir: Path, repository_id: str) -> dict[str, Any]:
    """Delete a repository nothing uses (no backup, copy or policy), then unmount it."""
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            "SELECT id, type, config FROM backup_repositories WHERE id = $1 FOR UPDATE",
            repository_id,
        )
        if row is None:
            raise ApiError.not_found(f"repository {repository_id} not found")
        users = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM backup_jobs WHERE repository_id = $1) AS backups,"
            " (SELECT count(*) FROM backup_copies WHERE repository_id = $1) AS copies,"
            " (SELECT array_agg(name ORDER BY name) FROM backup_policies p WHERE p.primary_repository_id = $1"
            "  OR EXISTS (SELECT 1 FROM backup_copy_rules c WHERE c.policy_id = p.id"
            "   AND c.destination_repository_id = $1)) AS policies",
            repository_id,
        )
        assert users is not None
        reasons = []
        if users["backups"]:
            reasons.append(f"{users['backups']} backup(s)")
        if users["copies"]:
            reasons.append(f"{users['copies']} backup copy(ies)")
        if users["policies"]:
            reasons.append(f"policies {', '.join(users['policies'])}")
        if reasons:
            raise ApiError.conflict(f"repository {repository_id} is in use by {'; '.join(reasons)}")
        await conn.execute("DELETE FROM backup_repositories WHERE id = $1", repository_id)
    spec = _public_spec(row)
    unmounted = spec.type != "local"
    warning = None
    try:
        await trio.to_thread.run_sync(repos.release, spec, mounts_dir)
    except RepositoryError as e:
        unmounted, warning = False, str(e)
    with log_context(action="repository_delete"):
        log.info(
            "backup repository deleted", extra={"repository_id": repository_id, "unmount_error": warning}
        )
    body: dict[str, Any] = {"message": "repository deleted", "id": repository_id, "unmounted": unmounted}
    if warning is not None:
        body["warning"] = warning
    return body
