"""Backup copies (3-2-1): a point's QCOW2 file and manifest put into another repository and
verified there.

**Queueing.** :func:`enqueue_policy_copies` (called by the backup engine after each completed
backup) queues one ``pending`` row of ``backup_copies`` per enabled copy rule of the backup's
policy; :func:`request_copy` (in a transaction of its own: :func:`queue_copy`) is the manual
``POST /backups/{id}/copy``. A copy of an incremental is only valid next to the copy of its
parent (the overlay names its backing file relatively), so queueing for a rule also queues the
copies of the point's ancestors that the destination lacks (a rule added to a running chain) and
re-queues those that failed.

**The worker.** :class:`CopyWorker` runs in every OMA process with the backup services. It claims
pending rows with ``FOR UPDATE SKIP LOCKED`` — never a copy whose parent's copy in the same
repository is still queued or running, so a chain is copied oldest first — and for each:

1. ``pending → copying``: both repositories are made ready (:func:`repositories.ensure_ready`:
   mounted, enabled); the QCOW2 file and then its manifest are streamed (``sendfile``, in a
   thread) to temporary names beside their final place (same relative layout as the primary,
   ``oma/backups/layout.py``), each fsynced;
2. the image is renamed into place, the directory fsynced, then the manifest, and the directory
   fsynced again. An earlier attempt's manifest is removed before anything is written, so at any
   moment the destination holds either no manifest or the manifest of a fully written image;
   an image without a manifest is never a restore point (and the database, the authority, says
   ``copying``);
3. ``copying → verifying``: :func:`pyapp.mover.verify` re-reads the copy through its own chain in
   the destination (its parent is the parent's copy) against its manifest; every chunk must
   match, and the manifest's disk digest must equal the primary's ``disk_digest``;
4. ``verifying → completed`` (``verified``, the digest found), or ``failed`` with a message
   naming what went wrong and the copy's files removed.

A rule with ``verify_after_copy: false`` skips step 3 (``verified`` stays false); manual copies
are always verified. Rules with ``copy_mode: "scheduled"`` are queued at once but run at the
next scheduled pass (every ``OMA_RETENTION_INTERVAL`` s, and when the worker starts), so bulk
copies can be kept apart from the backup window; ``immediate`` ones run as soon as a slot is free.

**Crashes and shutdown.** At start the worker puts back to ``pending`` the copies that a dead OMA
process on this host left ``copying`` or ``verifying``; at shutdown it stops its copies, removes
their partial files and puts them back to ``pending``. A copy is redone from the start, never
resumed: the files are whole-file copies, cheap to redo and simple to prove complete.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from oma.backups import layout
from oma.backups.chains import lock_stored_point
from oma.backups.repositories import ensure_ready
from oma.config import OmaConfig
from oma.crypto import SecretBox
from oma.workers import ClaimWorker, claimant_gone
from pyapp import mover
from pyapp.api import ApiError
from pyapp.db import Connection, Database, Record
from pyapp.logs import log_context

log = logging.getLogger(__name__)

NO_PARENT_COPY = "NO_PARENT_COPY"
#: Where the running worker is kept in ``app.extensions`` (the API wakes it for a manual copy).
COPY_WORKER_KEY = "oma.copy_worker"
#: Copies driven at once per process (each streams whole files: more would only share the disks).
MAX_ACTIVE_COPIES = 2
POLL_INTERVAL_S = 2.0
#: Bytes per ``sendfile`` call: the copy checks for cancellation between two calls.
STREAM_CHUNK = 64 << 20
TMP_SUFFIX = ".copy-tmp"
ACTIVE_STATUSES = ("copying", "verifying")
#: A copy as the API shows it (``GET /backups/{id}/copies``).
COPY_COLUMNS = (
    "id AS copy_id, backup_id, repository_id, status, file_path, size_bytes, disk_digest, verified,"
    " error_message, created_at, started_at, completed_at"
)
#: How long a shutdown waits for the worker to put its copies back.
STOP_TIMEOUT_S = 10.0


class CopyError(Exception):
    """Why a copy failed, in words for the operator (stored in ``error_message``)."""


# -- queueing -----------------------------------------------------------------------------------

#: What queueing a failed copy again resets (the same in both ways of queueing).
_REQUEUE_SET = (
    "status = 'pending', error_message = NULL, claimed_by = NULL, started_at = NULL, completed_at = NULL,"
    " file_path = NULL, size_bytes = NULL, disk_digest = NULL, verified = false"
)

_QUEUE_WITH_ANCESTORS = f"""
WITH RECURSIVE chain AS (
    SELECT id, parent_backup_id FROM backup_jobs WHERE id = $1
    UNION ALL
    SELECT b.id, b.parent_backup_id FROM backup_jobs b JOIN chain ON b.id = chain.parent_backup_id
)
INSERT INTO backup_copies (id, backup_id, repository_id, copy_rule_id, status)
SELECT 'copy-' || replace(gen_random_uuid()::text, '-', ''), chain.id, $2, $3, 'pending' FROM chain
ON CONFLICT (backup_id, repository_id) DO UPDATE
    SET {_REQUEUE_SET}, copy_rule_id = COALESCE(EXCLUDED.copy_rule_id, backup_copies.copy_rule_id)
    WHERE backup_copies.status = 'failed'
RETURNING id, backup_id
"""


async def enqueue_policy_copies(db: Database, backup_id: str) -> list[str]:
    """Queue the copies a completed backup owes its policy: one per enabled copy rule (and the
    ancestors' copies that destination lacks). Returns the ids of the rows queued or re-queued;
    a copy already queued, running or completed is left alone."""
    queued: list[str] = []
    async with db.transaction() as conn:
        rules = await conn.fetch(
            "SELECT r.id, r.destination_repository_id FROM backup_jobs b"
            " JOIN backup_copy_rules r ON r.policy_id = b.policy_id"
            " WHERE b.id = $1 AND b.status = 'completed' AND r.enabled"
            " AND r.destination_repository_id <> b.repository_id ORDER BY r.created_at, r.id",
            backup_id,
        )
        for rule in rules:
            rows = await conn.fetch(
                _QUEUE_WITH_ANCESTORS, backup_id, rule["destination_repository_id"], rule["id"]
            )
            queued.extend(r["id"] for r in rows)
    if queued:
        log.info("backup copies queued", extra={"backup_id": backup_id, "copy_ids": queued})
    return queued


async def request_copy(conn: Connection, backup_id: str, repository_id: str) -> str:
    """The manual copy of one point into ``repository_id`` (``POST /backups/{id}/copy``), in the
    caller's transaction. Refuses (404/409) what could not give a valid copy; a copy already
    queued is returned as it is, a failed one is queued again."""
    backup = await conn.fetchrow(
        "SELECT id, status, repository_id, parent_backup_id FROM backup_jobs WHERE id = $1 FOR SHARE",
        backup_id,
    )
    if backup is None:
        raise ApiError.not_found(f"backup {backup_id} not found")
    if not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM backup_repositories WHERE id = $1)", repository_id
    ):
        raise ApiError.not_found(f"repository {repository_id} not found")
    if backup["status"] != "completed":
        raise ApiError.conflict(
            f"backup {backup_id} is {backup['status']}; only a completed backup is copied"
        )
    if backup["repository_id"] == repository_id:
        raise ApiError.conflict(f"backup {backup_id} is stored in repository {repository_id} already")
    if backup["parent_backup_id"] is not None:
        parent_copy = await conn.fetchval(
            "SELECT status FROM backup_copies WHERE backup_id = $1 AND repository_id = $2",
            backup["parent_backup_id"],
            repository_id,
        )
        if parent_copy != "completed":
            raise ApiError(
                409,
                NO_PARENT_COPY,
                f"backup {backup_id} is an incremental on {backup['parent_backup_id']}, which has no"
                f" completed copy in repository {repository_id} (its copy is {parent_copy or 'missing'});"
                " copy the parent first",
            )
    copy_id = await conn.fetchval(
        "INSERT INTO backup_copies (id, backup_id, repository_id, status) VALUES ($1, $2, $3, 'pending')"
        " ON CONFLICT (backup_id, repository_id) DO NOTHING RETURNING id",  # two requests at once
        f"copy-{uuid.uuid4().hex}",
        backup_id,
        repository_id,
    )
    if copy_id is not None:
        return str(copy_id)
    existing = await conn.fetchrow(
        "SELECT id, status FROM backup_copies WHERE backup_id = $1 AND repository_id = $2 FOR UPDATE",
        backup_id,
        repository_id,
    )
    if existing is None:
        raise ApiError.conflict(f"the copy of backup {backup_id} to {repository_id} changed meanwhile; retry")
    if existing["status"] in ("completed", *ACTIVE_STATUSES):
        raise ApiError.conflict(
            f"backup {backup_id} already has a {existing['status']} copy ({existing['id']}) in"
            f" repository {repository_id}"
        )
    if existing["status"] == "failed":
        await conn.execute(f"UPDATE backup_copies SET {_REQUEUE_SET} WHERE id = $1", existing["id"])
    return str(existing["id"])


async def queue_copy(db: Database, backup_id: str, repository_id: str) -> str:
    """:func:`request_copy` in a transaction of its own; returns the copy's id."""
    async with db.transaction() as conn:
        copy_id = await request_copy(conn, backup_id, repository_id)
    with log_context(action="backup_copy_request"):
        log.info(
            "backup copy requested",
            extra={"backup_id": backup_id, "repository_id": repository_id, "copy_id": copy_id},
        )
    return copy_id


async def copies_of(db: Database, backup_id: str) -> list[dict[str, Any]]:
    """The copies of one point, oldest first; 404 for an unknown point."""
    if not await db.fetchval("SELECT EXISTS (SELECT 1 FROM backup_jobs WHERE id = $1)", backup_id):
        raise ApiError.not_found(f"backup {backup_id} not found")
    rows = await db.fetch(
        f"SELECT {COPY_COLUMNS} FROM backup_copies WHERE backup_id = $1 ORDER BY created_at, id", backup_id
    )
    return [dict(r.items()) for r in rows]


# -- files --------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_of(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def _stream(src: Path, dst: Path, check_cancelled: Callable[[], None]) -> int:
    """Copy ``src`` to the new file ``dst`` with ``sendfile`` (kernel to kernel), chunk by chunk
    so a stop request is seen between two chunks, and fsync it. Returns the size."""
    with src.open("rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            offset = 0
            while offset < size:
                check_cancelled()
                sent = os.sendfile(fd, fin.fileno(), offset, min(STREAM_CHUNK, size - offset))
                if sent == 0:
                    raise CopyError(f"{src} ended at {offset} bytes while being copied ({size} expected)")
                offset += sent
            os.fsync(fd)
        finally:
            os.close(fd)
    return size


def remove_copy_files(dest: Path) -> None:
    """Remove whatever a copy to ``dest`` may have left: manifest first (an image without its
    manifest is never taken as a restore point), then the image and both temporary files."""
    manifest = layout.manifest_path(dest)
    for path in (manifest, _temp_of(manifest), dest, _temp_of(dest)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    with contextlib.suppress(OSError):
        fsync_dir(dest.parent)


def copy_destination(src: Path, src_root: Path, dest_root: Path) -> Path:
    """Where the copy of the primary file ``src`` goes: the same path relative to its
    repository's root (a chain keeps one directory in every repository, so its overlays find
    their backing files there)."""
    try:
        rel = src.relative_to(src_root)
    except ValueError as e:
        raise CopyError(f"the primary file {src} is not inside its repository's root {src_root}") from e
    if ".." in rel.parts or not rel.parts:
        raise CopyError(f"the primary file {src} has no place under {src_root}")
    return dest_root / rel


def is_same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


def write_copy(
    src: Path,
    src_manifest: Path,
    dest: Path,
    check_cancelled: Callable[[], None] = trio.from_thread.check_cancelled,
) -> int:
    """Put ``src`` and its manifest at ``dest`` (and ``dest``'s manifest name), crash-safe: the
    image is in place before its manifest appears. Blocking: run it in a thread started by
    ``trio.to_thread.run_sync``, whose cancellation ``check_cancelled`` raises between two
    chunks. Returns the image's size; the caller removes the files of a copy that failed."""
    dest_manifest = layout.manifest_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    with contextlib.suppress(FileNotFoundError):
        dest_manifest.unlink()  # an earlier attempt's manifest must never sit beside a new image
    tmp_image, tmp_manifest = _temp_of(dest), _temp_of(dest_manifest)
    try:
        size = _stream(src, tmp_image, check_cancelled)
        _stream(src_manifest, tmp_manifest, check_cancelled)
        os.replace(tmp_image, dest)
        fsync_dir(dest.parent)
        os.replace(tmp_manifest, dest_manifest)
        fsync_dir(dest.parent)
    except FileNotFoundError as e:
        raise CopyError(f"cannot read {e.filename}: the primary file is missing") from e
    except OSError as e:
        raise CopyError(f"copying {src} to {dest} failed: {e.strerror or e}") from e
    return size


def describe_mismatches(report: mover.VerifyReport, limit: int = 3) -> str:
    shown = "; ".join(
        f"chunk {m.index} at offset {m.offset} ({m.length} bytes): expected {m.expected[:16]}…,"
        f" found {m.found[:16]}…"
        for m in report.mismatches[:limit]
    )
    more = f" and {len(report.mismatches) - limit} more" if len(report.mismatches) > limit else ""
    return f"{len(report.mismatches)} chunk(s) of {report.image} differ from its manifest: {shown}{more}"


async def verify_copy(image: Path, expected_digest: str | None) -> mover.VerifyReport:
    """Re-read a copy through its chain in its repository and compare it with its manifest, and
    that manifest with the primary's digest. Raises :class:`CopyError` naming what differs."""
    if expected_digest is None:
        raise CopyError("the primary backup has no recorded disk digest to compare the copy with")
    try:
        report = await mover.verify(str(image))
    except mover.MoverError as e:
        raise CopyError(f"verification of {image} could not run: {e}") from e
    if report.mismatches or not report.ok:
        raise CopyError(f"verification failed: {describe_mismatches(report)}")
    if report.expected_digest != expected_digest:
        raise CopyError(
            f"verification failed: the copy's manifest has disk digest {report.expected_digest},"
            f" the primary backup {expected_digest}"
        )
    return report


# -- the worker ---------------------------------------------------------------------------------

_CLAIM = """
UPDATE backup_copies c SET status = 'copying', claimed_by = $1, started_at = now(), error_message = NULL
WHERE c.id IN (
    SELECT q.id FROM backup_copies q
    JOIN backup_jobs b ON b.id = q.backup_id
    LEFT JOIN backup_copy_rules r ON r.id = q.copy_rule_id
    WHERE q.status = 'pending' AND q.claimed_by IS NULL
      AND (r.copy_mode IS DISTINCT FROM 'scheduled' OR q.created_at <= $3)
      AND NOT EXISTS (SELECT 1 FROM backup_copies p
                      WHERE p.backup_id = b.parent_backup_id AND p.repository_id = q.repository_id
                        AND p.status IN ('pending', 'copying', 'verifying'))
    ORDER BY q.created_at, q.id
    FOR UPDATE OF q SKIP LOCKED LIMIT $2)
RETURNING c.id, c.backup_id, c.repository_id, c.copy_rule_id
"""


class CopyWorker(ClaimWorker):
    """Claims pending copies and drives them (see the module doc). One per OMA process."""

    kind = "copy worker"
    action = "copy_worker"

    def __init__(
        self,
        config: OmaConfig,
        db: Database,
        box: SecretBox,
        *,
        max_active: int = MAX_ACTIVE_COPIES,
        poll_interval: float = POLL_INTERVAL_S,
    ) -> None:
        super().__init__(max_active=max_active, poll_interval=poll_interval)
        self.config = config
        self.db = db
        self.box = box
        #: Copies of ``scheduled`` rules queued before this moment may run.
        self.scheduled_cutoff = dt.datetime.now(dt.UTC)
        self.active: set[str] = set()

    def active_count(self) -> int:
        return len(self.active)

    async def claim(self, limit: int) -> list[Record]:
        return await self.db.fetch(_CLAIM, self.worker_id, limit, self.scheduled_cutoff)

    def start(self, nursery: trio.Nursery, row: Record) -> None:
        self.active.add(row["id"])
        nursery.start_soon(self._drive, row)

    async def start_side_tasks(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._schedule_loop)

    async def on_stop(self) -> None:
        with trio.move_on_after(STOP_TIMEOUT_S):
            await self._release_claims()

    async def _release_claims(self) -> None:
        """The last step of a stop: any copy still claimed by this worker goes back to pending
        (each drive does it for its own copy; this catches what no drive held)."""
        try:
            released = await self.db.fetch(
                f"UPDATE backup_copies SET {_REQUEUE_SET} WHERE claimed_by = $1"
                " AND status IN ('pending', 'copying', 'verifying') RETURNING id",
                self.worker_id,
            )
        except Exception:
            log.exception("releasing the copies of this worker failed")
            return
        if released:
            log.info("backup copies released at stop", extra={"copy_ids": [r["id"] for r in released]})

    async def recover_orphans(self) -> None:
        """Put back to ``pending`` the copies an OMA process on this host claimed and no longer
        drives (it died), once what they wrote is removed: they are redone from the start. A
        copy whose files cannot be removed now (its repository is unavailable) keeps its path
        and waits for the next start."""
        rows = await self.db.fetch(
            "SELECT id, claimed_by, file_path, repository_id FROM backup_copies"
            " WHERE status IN ('pending', 'copying', 'verifying') AND claimed_by LIKE $1",
            f"{socket.gethostname()}:%",
        )
        for row in rows:
            if not claimant_gone(row["claimed_by"]):
                continue
            if row["file_path"]:
                try:
                    await ensure_ready(self.db, self.box, self.config.mounts_dir, row["repository_id"])
                    await trio.to_thread.run_sync(remove_copy_files, Path(row["file_path"]))
                except (ApiError, OSError) as e:
                    message = e.message if isinstance(e, ApiError) else str(e)
                    log.warning(
                        "cannot remove the files of an interrupted copy: %s",
                        message,
                        extra={"copy_id": row["id"], "target": row["file_path"]},
                    )
                    continue
            await self.db.execute(
                "UPDATE backup_copies SET status = 'pending', claimed_by = NULL, started_at = NULL,"
                " file_path = NULL, size_bytes = NULL WHERE id = $1 AND claimed_by = $2",
                row["id"],
                row["claimed_by"],
            )
            log.warning(
                "copy of a stopped OMA process queued again",
                extra={"copy_id": row["id"], "claimed_by": row["claimed_by"]},
            )

    async def _schedule_loop(self) -> None:
        while True:
            await trio.sleep(self.config.retention_interval)
            self.scheduled_cutoff = dt.datetime.now(dt.UTC)
            self.wake()

    async def _drive(self, row: Record) -> None:
        copy_id = row["id"]
        dest: list[Path] = []  # set once the copy's destination is known (what to clean up)
        try:
            try:
                await self._copy(row, dest)
            except CopyError as e:
                await self._fail(copy_id, str(e), dest)
            except Exception as e:
                log.exception("backup copy failed unexpectedly", extra={"copy_id": copy_id})
                await self._fail(copy_id, f"internal error: {type(e).__name__}: {e}", dest)
            except BaseException:
                # Shutdown: trio.Cancelled, alone or (through the mover's nursery) in a group.
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT_S):
                    await self._requeue(copy_id, dest)
                raise
        finally:
            self.active.discard(copy_id)
            self.wake()  # a slot is free, and a child copy may have been waiting on this one

    async def _copy(self, row: Record, dest_holder: list[Path]) -> None:
        copy_id, backup_id, repository_id = row["id"], row["backup_id"], row["repository_id"]
        b = await self.db.fetchrow(
            "SELECT b.vm_key, b.disk_id, b.repository_id, b.status, b.file_path, b.manifest_path,"
            " b.disk_digest, b.parent_backup_id, b.created_at,"
            " (SELECT p.status FROM backup_copies p WHERE p.backup_id = b.parent_backup_id"
            "   AND p.repository_id = $2) AS parent_copy_status,"
            " (SELECT r.verify_after_copy FROM backup_copy_rules r WHERE r.id = $3) AS verify_after_copy"
            " FROM backup_jobs b WHERE b.id = $1",
            backup_id,
            repository_id,
            row["copy_rule_id"],
        )
        if b is None:
            raise CopyError(f"backup {backup_id} no longer exists")
        if b["status"] != "completed" or not b["file_path"]:
            raise CopyError(f"backup {backup_id} is {b['status']}; only a completed backup is copied")
        if b["parent_backup_id"] is not None and b["parent_copy_status"] != "completed":
            raise CopyError(
                f"{NO_PARENT_COPY}: the parent {b['parent_backup_id']} has no completed copy in repository"
                f" {repository_id} (its copy is {b['parent_copy_status'] or 'missing'})"
            )
        try:
            src_root = await ensure_ready(self.db, self.box, self.config.mounts_dir, b["repository_id"])
            dest_root = await ensure_ready(self.db, self.box, self.config.mounts_dir, repository_id)
        except ApiError as e:
            raise CopyError(e.message) from e
        src = Path(b["file_path"])
        src_manifest = Path(b["manifest_path"]) if b["manifest_path"] else layout.manifest_path(src)
        dest = copy_destination(src, src_root, dest_root)
        if await trio.to_thread.run_sync(is_same_file, src, dest):
            raise CopyError(
                f"the destination {dest} is the primary file itself (two repositories on one path?)"
            )
        # The path is recorded before anything is written there: a process that dies while
        # copying leaves a row that says what to remove (recover_orphans).
        await self.db.execute(
            "UPDATE backup_copies SET file_path = $2 WHERE id = $1 AND status = 'copying'", copy_id, str(dest)
        )
        dest_holder.append(dest)  # from here on, a failure removes what the copy wrote there
        log.info("copying backup", extra={"copy_id": copy_id, "backup_id": backup_id, "target": str(dest)})
        # Never abandoned: cancelling (shutdown) stops the thread between two chunks and waits.
        size = await trio.to_thread.run_sync(write_copy, src, src_manifest, dest)
        verify = b["verify_after_copy"] is not False  # manual copies (no rule) are always verified
        digest: str | None = None
        if verify:
            await self.db.execute(
                "UPDATE backup_copies SET status = 'verifying', file_path = $2, size_bytes = $3"
                " WHERE id = $1",
                copy_id,
                str(dest),
                size,
            )
            digest = (await verify_copy(dest, b["disk_digest"])).found_digest
        await self.db.execute(
            "UPDATE backup_copies SET status = 'completed', file_path = $2, size_bytes = $3,"
            " disk_digest = $4, verified = $5, error_message = NULL, completed_at = now() WHERE id = $1",
            copy_id,
            str(dest),
            size,
            digest,
            verify,
        )
        log.info(
            "backup copy completed",
            extra={"copy_id": copy_id, "backup_id": backup_id, "verified": verify, "bytes": size},
        )
        # A copy is a point of its repository: locked there as the backup was in its own
        # (counted from the backup's time, as retention counts it).
        await lock_stored_point(self.db, dest, backup_id, repository_id, b["created_at"])

    async def _fail(self, copy_id: str, message: str, dest: list[Path]) -> None:
        left: str | None = None
        if dest:
            try:
                await trio.to_thread.run_sync(remove_copy_files, dest[0])
            except OSError as e:  # the failed row keeps the path of what is left
                left = str(dest[0])
                message = f"{message}; its files at {left} could not be removed: {e.strerror or e}"
        await self.db.execute(
            # The files are gone (else file_path says where they are): no size or digest
            # describes the copy any more.
            "UPDATE backup_copies SET status = 'failed', error_message = $2, verified = false,"
            " file_path = $3, size_bytes = NULL, disk_digest = NULL, completed_at = now() WHERE id = $1",
            copy_id,
            message,
            left,
        )
        log.warning("backup copy failed: %s", message, extra={"copy_id": copy_id})

    async def _requeue(self, copy_id: str, dest: list[Path]) -> None:
        """Shutdown: remove the partial files and leave the copy for the next start."""
        if dest:
            await trio.to_thread.run_sync(remove_copy_files, dest[0])
        await self.db.execute(
            "UPDATE backup_copies SET status = 'pending', claimed_by = NULL, started_at = NULL,"
            " file_path = NULL, size_bytes = NULL WHERE id = $1",
            copy_id,
        )
        log.info("backup copy interrupted by shutdown; queued again", extra={"copy_id": copy_id})
