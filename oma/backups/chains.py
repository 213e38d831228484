"""Removing backup points without losing the others: API deletion and retention.

A chain is a full and the incrementals on it (``chain_id``), oldest first. A point's data is
needed by every newer point of its chain, so a point leaves in one of two ways:

- the newest point of its chain: its files go (in every repository holding it), then its row;
- the oldest points: they are merged into the oldest point that stays (``k``) with the mover's
  crash-safe consolidation — a new standalone image written beside ``k``, verified against
  ``k``'s manifest, renamed over ``k``'s file; only then are the older files removed — in the
  primary repository and in every repository holding copies. ``k`` becomes the full of its
  chain; its logical disk, and so its digest, do not change.

A middle increment cannot leave alone (the API refuses with ``CHAIN_DEPENDENCY``).

What stops a removal: an immutability lock on any copy of a point that would be removed or
rewritten — the database's (repository flag and days) *or* the point's own lock record beside its
files (:mod:`oma.backups.immutability`: a database edit alone never unlocks a point; the files'
immutable attribute is cleared only once the record's date has passed) — an open file-restore
mount or a running full restore of a removed point, a copy in progress, a backup of the same
disk in flight. The API answers 409 naming the reason; retention
postpones the chain to a later run.

Crash safety across the database and the files: the points to remove are first marked
``deleting`` (never a parent, never restored from) in one transaction; then the files are
changed (each step crash-safe on its own); then one transaction removes the rows and makes ``k``
the full. A crash in between leaves ``deleting`` points, which the next attempt (a retry of the
delete, or retention) finishes: consolidation of a chain that is already merged is skipped, and
files already gone are fine. A session advisory lock per VM disk (the VM's identity, never its
name) and repository
(:func:`disk_lock`) keeps two OMA processes — and a backup being written — from working on one
chain at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from oma.backups import immutability
from oma.backups.layout import manifest_path
from oma.backups.repositories import ensure_ready
from oma.crypto import SecretBox
from pyapp import mover
from pyapp.api import CONFLICT, NOT_FOUND, OPERATION_FAILED, ApiError
from pyapp.db import Connection, Database, Record

log = logging.getLogger(__name__)

CHAIN_DEPENDENCY = "CHAIN_DEPENDENCY"
IMMUTABLE = "IMMUTABLE"
MOUNTED = "MOUNTED"
#: First key of the advisory locks taken on a VM disk's backups in one repository.
_LOCK_CLASS = 0x0BAC

_POINT_COLUMNS = (
    "b.id, b.parent_backup_id, b.status, b.created_at, b.vm_key, b.disk_id, b.repository_id,"
    " b.chain_id, b.file_path, b.disk_digest"
)


class ChainBusy(Exception):
    """The chain cannot be changed now; the message says why (and when, for a lock)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Replica:
    """One stored copy of a point: the primary file or a completed copy in another repository."""

    repository_id: str
    path: Path
    locked_until: dt.datetime | None
    copy_id: str | None = None


@dataclass
class Point:
    id: str
    parent_backup_id: str | None
    status: str
    created_at: dt.datetime
    vm_key: str
    disk_id: str
    repository_id: str
    chain_id: str
    disk_digest: str | None
    replicas: list[Replica] = field(default_factory=list)


#: Chooses, from a chain (oldest first), the points to remove and the point they merge into.
Pick = Callable[[list[Point]], tuple[list[Point], Point | None]]


@dataclass
class RetentionResult:
    """What one retention pass over some chains did."""

    chains: int = 0
    removed: list[str] = field(default_factory=list)
    new_fulls: list[str] = field(default_factory=list)
    postponed: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


def locked_until(immutable: bool, immutable_days: int, stored_at: dt.datetime) -> dt.datetime | None:
    """The end of a stored file's immutability lock, or None when its repository has none."""
    if not immutable or immutable_days <= 0:
        return None
    return stored_at + dt.timedelta(days=immutable_days)


async def lock_stored_point(
    db: Database, image: Path, backup_id: str, repository_id: str, stored_at: dt.datetime
) -> None:
    """Lock the files of a point just stored in ``repository_id`` (a backup's image, or its copy
    in another repository) when that repository is immutable: the lock record and the immutable
    attribute (:func:`oma.backups.immutability.lock_point`). A failure is logged: the point stays
    completed, its database lock holds, and the retention run locks it later."""
    row = await db.fetchrow(
        "SELECT immutable, immutable_days, now() AS now FROM backup_repositories WHERE id = $1", repository_id
    )
    if row is None:
        return
    until = locked_until(row["immutable"], row["immutable_days"], stored_at)
    if until is None:
        return
    try:
        mode = await trio.to_thread.run_sync(
            immutability.lock_point, image, backup_id, stored_at, until, row["now"]
        )
    except (OSError, immutability.LockError) as e:
        log.error("cannot lock the point's files: %s", e, extra={"file_path": str(image)})
        return
    log.info(
        "point locked",
        extra={"file_path": str(image), "locked_until": until.isoformat(), "lock_mode": mode},
    )


@contextlib.asynccontextmanager
async def disk_lock(
    db: Database, vm_key: str, disk_id: str, repository_id: str, *, wait: bool = False
) -> AsyncIterator[bool]:
    """Hold the advisory lock of one VM disk's chains in one repository (a session lock on a
    connection kept for the whole block). The VM is its identity (``vm_key``), never its name.
    Yields False when ``wait`` is off and another holder has it."""
    key = f"{vm_key}\x1f{disk_id}\x1f{repository_id}"
    async with db.connection() as conn:
        if wait:
            await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", _LOCK_CLASS, key)
            got = True
        else:
            got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))", _LOCK_CLASS, key))
        try:
            yield got
        finally:
            if got:
                with trio.CancelScope(shield=True):
                    await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", _LOCK_CLASS, key)


def _point(row: Record) -> Point:
    return Point(
        row["id"],
        row["parent_backup_id"],
        row["status"],
        row["created_at"],
        row["vm_key"],
        row["disk_id"],
        row["repository_id"],
        row["chain_id"],
        row["disk_digest"],
    )


async def _load_chain(conn: Connection, chain_id: str) -> list[Point]:
    """The stored points of a chain, oldest first, locked, with every replica."""
    rows = await conn.fetch(
        f"SELECT {_POINT_COLUMNS}, r.immutable, r.immutable_days FROM backup_jobs b"
        " JOIN backup_repositories r ON r.id = b.repository_id"
        " WHERE b.chain_id = $1 AND b.status IN ('completed', 'deleting')"
        " ORDER BY b.created_at, b.id FOR UPDATE OF b",
        chain_id,
    )
    points = {row["id"]: _point(row) for row in rows}
    for row in rows:
        if row["file_path"]:
            points[row["id"]].replicas.append(
                Replica(
                    row["repository_id"],
                    Path(row["file_path"]),
                    locked_until(row["immutable"], row["immutable_days"], row["created_at"]),
                )
            )
    copies = await conn.fetch(
        "SELECT c.id, c.backup_id, c.repository_id, c.status, c.file_path, c.created_at,"
        " r.immutable, r.immutable_days FROM backup_copies c"
        " JOIN backup_repositories r ON r.id = c.repository_id WHERE c.backup_id = ANY($1::text[])",
        list(points),
    )
    for c in copies:
        if c["status"] in ("pending", "copying", "verifying"):
            raise ChainBusy(
                CONFLICT, f"a copy of backup {c['backup_id']} to {c['repository_id']} is in progress"
            )
        if c["status"] == "completed" and c["file_path"]:
            points[c["backup_id"]].replicas.append(
                Replica(
                    c["repository_id"],
                    Path(c["file_path"]),
                    locked_until(c["immutable"], c["immutable_days"], c["created_at"]),
                    c["id"],
                )
            )
    return list(points.values())


async def _check_removable(
    conn: Connection, removed: Sequence[Point], kept: Point | None, now: dt.datetime
) -> None:
    """Raise :class:`ChainBusy` when anything forbids removing ``removed`` (and rewriting ``kept``)."""
    for point, verb in [*((p, "deleted") for p in removed), *(((kept, "rewritten"),) if kept else ())]:
        for replica in point.replicas:
            if replica.locked_until is not None and replica.locked_until > now:
                raise ChainBusy(
                    IMMUTABLE,
                    f"backup {point.id} is immutable in repository {replica.repository_id} until"
                    f" {replica.locked_until.isoformat()}: it cannot be {verb} before then",
                )
    ids = [p.id for p in removed]
    mounted = await conn.fetchval(
        "SELECT backup_id FROM restore_mounts WHERE backup_id = ANY($1::text[])"
        " AND status = 'mounted' LIMIT 1",
        ids,
    )
    if mounted is not None:
        raise ChainBusy(MOUNTED, f"backup {mounted} is open for file-level restore: unmount it first")
    restoring = await conn.fetchval(
        "SELECT backup_id FROM restore_jobs WHERE backup_id = ANY($1::text[])"
        " AND status IN ('pending', 'running') LIMIT 1",
        ids,
    )
    if restoring is not None:
        raise ChainBusy(CONFLICT, f"backup {restoring} is being restored")
    sample = removed[0]
    in_flight = await conn.fetchval(
        "SELECT id FROM backup_jobs WHERE vm_key = $1 AND disk_id = $2 AND repository_id = $3"
        " AND status IN ('pending', 'running') LIMIT 1",
        sample.vm_key,
        sample.disk_id,
        sample.repository_id,
    )
    if in_flight is not None:
        raise ChainBusy(CONFLICT, f"backup {in_flight} of the same disk is in progress")


def _file_locks(points: Sequence[Point], now: dt.datetime) -> tuple[str, Path, dt.datetime] | None:
    """The first replica whose own lock record still holds it at ``now`` (blocking): (backup id,
    image, end of lock). A damaged record holds its point for ever (reported as such)."""
    for point in points:
        for replica in point.replicas:
            try:
                until = immutability.locked_until(replica.path)
            except immutability.LockError as e:
                raise ChainBusy(IMMUTABLE, f"backup {point.id}: {e}") from e
            if until is not None and until > now:
                return point.id, replica.path, until
    return None


async def _check_file_locks(removed: Sequence[Point], kept: Point | None, now: dt.datetime) -> None:
    """Raise :class:`ChainBusy` (``IMMUTABLE``) when a lock record beside a file to remove or
    rewrite still holds it, whatever the database says about its repository."""
    found = await trio.to_thread.run_sync(_file_locks, [*removed, *([kept] if kept else [])], now)
    if found is not None:
        backup_id, path, until = found
        raise ChainBusy(
            IMMUTABLE,
            f"backup {backup_id} is immutable until {until.isoformat()} by its lock record"
            f" {immutability.lock_path(path)}: it cannot be deleted or rewritten before then",
        )


def _release(paths: Iterable[Path], now: dt.datetime) -> None:
    """Clear the immutable attribute of files whose recorded lock has ended (blocking)."""
    for path in paths:
        if not immutability.release_expired(path, now):
            raise RuntimeError(f"{path} is still locked by its lock record")


def _remove_files(paths: Iterable[Path]) -> None:
    """Remove point files (newest first, as given), their manifests and lock records; missing
    ones are fine."""
    for path in paths:
        for p in (path, manifest_path(path), immutability.lock_path(path)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


async def _merge_into(kept_path: Path) -> tuple[int, str | None]:
    """Make ``kept_path`` standalone by merging its whole backing chain into it (crash-safe).
    Returns its new file size and the digest of its logical disk (None: nothing to merge)."""
    info = await mover.info(kept_path)
    depth = int(info["depth"])
    if depth <= 1:
        return (await trio.Path(kept_path).stat()).st_size, None
    report = await mover.consolidate(kept_path, layers=depth)
    return (await trio.Path(kept_path).stat()).st_size, report.disk_digest


def _repositories(removed: Sequence[Point], kept: Point | None) -> list[str]:
    return sorted({r.repository_id for p in [*removed, *([kept] if kept else [])] for r in p.replicas})


async def _change_files(removed: Sequence[Point], kept: Point | None, now: dt.datetime) -> dict[str, int]:
    """Merge or remove, repository by repository (each one ready). Returns the new file size of
    ``kept`` in each repository where it was made standalone."""
    sizes: dict[str, int] = {}
    every = [r.path for p in [*removed, *([kept] if kept else [])] for r in p.replicas]
    await trio.to_thread.run_sync(_release, every, now)  # expired locks only: checked before
    for repository_id in _repositories(removed, kept):
        kept_replica = (
            next((r for r in kept.replicas if r.repository_id == repository_id), None) if kept else None
        )
        if kept is not None and kept_replica is not None:
            size, digest = await _merge_into(kept_replica.path)
            if digest is not None and kept.disk_digest and digest != kept.disk_digest:
                raise RuntimeError(
                    f"merged image {kept_replica.path} has digest {digest},"
                    f" backup {kept.id} has {kept.disk_digest}"
                )
            sizes[repository_id] = size
        leftovers = [
            r.path for p in reversed(removed) for r in p.replicas if r.repository_id == repository_id
        ]
        await trio.to_thread.run_sync(_remove_files, leftovers)
    return sizes


async def _finish(db: Database, removed: Sequence[Point], kept: Point | None, sizes: dict[str, int]) -> None:
    async with db.transaction() as conn:
        if kept is not None:
            await conn.execute(
                "UPDATE backup_jobs SET parent_backup_id = NULL, backup_type = 'full',"
                " stored_bytes = COALESCE($2, stored_bytes), updated_at = now() WHERE id = $1",
                kept.id,
                sizes.get(kept.repository_id),
            )
            for replica in kept.replicas:
                if replica.copy_id is not None and replica.repository_id in sizes:
                    await conn.execute(
                        "UPDATE backup_copies SET size_bytes = $2 WHERE id = $1",
                        replica.copy_id,
                        sizes[replica.repository_id],
                    )
        await conn.execute("DELETE FROM backup_jobs WHERE id = ANY($1::text[])", [p.id for p in removed])


async def _remove(
    db: Database,
    box: SecretBox,
    mounts_dir: Path,
    chain_id: str,
    pick: Pick,
    now: dt.datetime,
) -> tuple[list[Point], Point | None]:
    """The three steps (mark, change files, finish) for the points ``pick(chain)`` chooses:
    ``pick`` returns ``(removed, kept)`` or raises :class:`ChainBusy`."""
    async with db.transaction() as conn:
        chain = await _load_chain(conn, chain_id)
        removed, kept = pick(chain)
        if not removed:
            return [], None
        await _check_removable(conn, removed, kept, now)
        for repository_id in _repositories(removed, kept):  # mounted before anything is marked
            await ensure_ready(db, box, mounts_dir, repository_id)
        await _check_file_locks(removed, kept, now)
        await conn.execute(
            "UPDATE backup_jobs SET status = 'deleting', updated_at = now() WHERE id = ANY($1::text[])",
            [p.id for p in removed],
        )
    sizes = await _change_files(removed, kept, now)
    with trio.CancelScope(shield=True):  # the files have changed: the rows must follow
        await _finish(db, removed, kept, sizes)
    log.info(
        "backup points removed",
        extra={
            "removed": [p.id for p in removed],
            "new_full": kept.id if kept else None,
            "chain_id": chain_id,
        },
    )
    return list(removed), kept


async def delete_backup(db: Database, box: SecretBox, mounts_dir: Path, backup_id: str) -> dict[str, Any]:
    """``DELETE /api/v1/backup/{id}``: remove one point, keeping every other point restorable."""
    row = await db.fetchrow(
        "SELECT id, status, chain_id, vm_name, vm_key, disk_id, repository_id, file_path"
        " FROM backup_jobs WHERE id = $1",
        backup_id,
    )
    if row is None:
        raise ApiError(404, NOT_FOUND, f"backup {backup_id} not found")
    if row["status"] in ("pending", "running"):
        raise ApiError.conflict(f"backup {backup_id} is {row['status']}: wait for its end")
    if row["status"] in ("failed", "cancelled"):
        # Never a parent, never stored as a point: only leftovers can remain.
        if row["file_path"]:
            await trio.to_thread.run_sync(_remove_files, [Path(row["file_path"])])
        await db.execute("DELETE FROM backup_jobs WHERE id = $1", backup_id)
        return {"message": "backup deleted", "backup_id": backup_id}

    def pick(chain: list[Point]) -> tuple[list[Point], Point | None]:
        ids = [p.id for p in chain]
        if backup_id not in ids:
            raise ChainBusy(CONFLICT, f"backup {backup_id} changed meanwhile; try again")
        i = ids.index(backup_id)
        if i == len(chain) - 1:
            return [chain[i]], None
        if i == 0:
            return [chain[0]], chain[1]
        raise ChainBusy(
            CHAIN_DEPENDENCY,
            f"backup {backup_id} is a middle increment: {len(chain) - 1 - i} newer point(s) need its data."
            " Delete points from either end of the chain, or let retention merge it",
        )

    async with disk_lock(db, row["vm_key"], row["disk_id"], row["repository_id"]) as got:
        if not got:
            raise ApiError.conflict(
                f"another operation on the backups of {row['vm_name']} {row['disk_id']} is running"
            )
        try:
            _, kept = await _remove(db, box, mounts_dir, row["chain_id"], pick, dt.datetime.now(dt.UTC))
        except ChainBusy as e:
            raise ApiError(409, e.code, str(e)) from e
        except (mover.MoverError, OSError, RuntimeError) as e:
            log.exception("deleting backup %s failed", backup_id)
            raise ApiError(500, OPERATION_FAILED, f"deleting backup {backup_id} failed: {e}") from e
    answer: dict[str, Any] = {"message": "backup deleted", "backup_id": backup_id}
    if kept is not None:
        answer["merged_into"] = kept.id
        answer["message"] = f"backup deleted; its data was merged into {kept.id}, now the full of the chain"
    return answer


def _retention_pick(cutoff: dt.datetime, newest_chain: bool) -> Pick:
    def pick(chain: list[Point]) -> tuple[list[Point], Point | None]:
        expired = [p.status == "deleting" or p.created_at < cutoff for p in chain]
        if not newest_chain and all(expired):
            return list(chain), None  # a whole older chain: nothing newer needs it
        keep = next((i for i, e in enumerate(expired) if not e), len(chain) - 1)
        return chain[:keep], chain[keep] if keep > 0 else None

    return pick


async def apply_retention(
    db: Database,
    box: SecretBox,
    mounts_dir: Path,
    chain_point_ids: list[str],
    retention_days: int,
    now: dt.datetime,
) -> RetentionResult:
    """Retention over the points of one VM disk in one repository (any order; they may span
    several chains). Expired points (older than ``retention_days``) are merged into the oldest
    point kept in their chain; an older chain whose points have all expired goes whole; the
    newest point of the disk always stays."""
    result = RetentionResult()
    rows = await db.fetch(
        "SELECT chain_id, vm_key, disk_id, repository_id, max(created_at) AS newest FROM backup_jobs"
        " WHERE id = ANY($1::text[]) AND status IN ('completed', 'deleting')"
        " GROUP BY chain_id, vm_key, disk_id, repository_id ORDER BY newest",
        chain_point_ids,
    )
    if not rows:
        return result
    cutoff = now - dt.timedelta(days=retention_days)
    first = rows[0]
    async with disk_lock(db, first["vm_key"], first["disk_id"], first["repository_id"]) as got:
        for i, row in enumerate(rows):
            result.chains += 1
            if not got:
                result.postponed.append(
                    {"chain_id": row["chain_id"], "reason": "another operation holds the disk"}
                )
                continue
            try:
                removed, kept = await _remove(
                    db, box, mounts_dir, row["chain_id"], _retention_pick(cutoff, i == len(rows) - 1), now
                )
            except ChainBusy as e:
                result.postponed.append({"chain_id": row["chain_id"], "reason": str(e)})
                continue
            except (ApiError, mover.MoverError, OSError, RuntimeError) as e:
                message = e.message if isinstance(e, ApiError) else f"{type(e).__name__}: {e}"
                log.error("retention of chain %s failed: %s", row["chain_id"], message)
                result.failed.append({"chain_id": row["chain_id"], "error": message})
                continue
            result.removed.extend(p.id for p in removed)
            if kept is not None:
                result.new_fulls.append(kept.id)
    return result
