"""The backup engine: what turns a ``pending`` backup into a point of a QCOW2 chain.

A backup *pulls* (docs/backup.md, "Data path of a backup"): the VMA snapshots the VM and serves
the disk read-only over NBD; the mover on the OMA reads it and writes the repository's format
itself — a standalone QCOW2 image for a full, an overlay on the previous point's file for an
incremental, each with its BLAKE3 manifest computed inline from the bytes read.

One engine runs in each OMA process (a background task of the app, stopped before the database
and the VMA client close). It claims pending backups with ``SELECT … FOR UPDATE SKIP LOCKED``, up
to ``max_active_backups`` at once (so several OMA processes on one database never drive the same
backup) and, per backup:

1. makes the repository ready (:func:`oma.backups.repositories.ensure_ready`: mounted, a
   directory) and plans the point's file, ``<root>/<vm>/<disk>/<backup_id>.qcow2``;
2. for an incremental, takes the chain's latest ``completed`` point as parent (unless its policy
   forces a full, :meth:`BackupEngine._full_forced`: in an immutable repository locking points
   longer than the policy keeps them, a chain's expired points can never be merged away, so a
   new full starts once the chain's oldest point is past the retention, and retention expires
   the old chain whole once all of its points are past retention and lock) (a failed point is
   never one) and records it on the row, so that the parent cannot be deleted under the copy;
3. asks the VMA for an export job (``POST /replicate``, ``"mode": "export"``) with the parent's
   change ID, and polls ``/status/{id}`` until ``phase`` is ``"exported"``;
4. runs ``mover.copy`` from the export's URI into the new file, over the export's extents (a
   ``full-cbt-reset`` export reads the source's allocation map instead and makes the point a full:
   a new chain). While the copy runs, the VMA's job is watched: an export that fails or vanishes
   stops the copy at once instead of after the mover's reconnection timeout. Progress goes to the
   row at most once a second;
5. records the point ``completed`` (file, manifest, sizes, digest, change ID, chain) and, in an
   immutable repository, locks its files (:mod:`oma.backups.immutability`: a lock record beside
   the image and the file system's immutable attribute until ``created_at + immutable_days``);
6. releases the export (``POST /cleanup``, ``cleanup_all``) and hands the point to the
   ``after_backup`` hook (copy rules of its policy).

On every other path — a failed step, a failed or vanished export, OMA shutdown — the export is
released, the unfinished image and its manifest are removed, and the row ends ``failed`` with the
reason in ``error_message``. A process that died while driving backups leaves rows claimed by
it: the next engine on the same host fails them at start (and removes their files), as the
replication engine does with its jobs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from oma.backups import layout
from oma.backups.chains import disk_lock, lock_stored_point
from oma.backups.repositories import ensure_ready
from oma.config import OmaConfig
from oma.crypto import SecretBox
from oma.vcenter_login import ResolveLogin
from oma.vma_client import ExportedDisk, VmaClient, VmaError, VmaJobNotFound, exports_of
from oma.workers import FINISH_TIMEOUT, VmaJobEngine, claimant_gone
from pyapp import metrics, mover
from pyapp.api import ApiError
from pyapp.db import Database
from pyapp.logs import log_context

log = logging.getLogger(__name__)

ACTIVE = ("pending", "running")
#: At most one progress write per backup per this many seconds.
PROGRESS_INTERVAL = 1.0
#: How long the mover redials an export whose connection dropped (a tunnel restart). A cancelled
#: copy (shutdown, the VMA ending the export) stops redialling at once.
RECONNECT_TIMEOUT = 60.0

AfterBackup = Callable[[str], Awaitable[None]]

#: The latest completed point of a VM disk's chains ($1 vm_key, $2 disk_id, $3 repository_id):
#: what an incremental is written on. Failed points are never parents; the VM is its identity
#: (:func:`oma.backups.layout.vm_key`), never its name.
LATEST_POINT = (
    "SELECT id, chain_id, change_id, file_path FROM backup_jobs"
    " WHERE vm_key = $1 AND disk_id = $2 AND repository_id = $3 AND status = 'completed'"
    " ORDER BY completed_at DESC, created_at DESC LIMIT 1"
)


class BackupError(Exception):
    """A step of the backup failed; the message is what the operator reads in ``error_message``."""


@dataclass
class Parent:
    """The point an incremental is written on: the chain's latest completed point."""

    backup_id: str
    chain_id: str
    change_id: str | None
    file_path: Path


@dataclass
class RunningBackup:
    backup_id: str
    vm_name: str
    vm_key: str
    vm_path: str
    disk_id: str
    requested_type: str
    repository_id: str
    vm_context_id: str | None
    #: The image's path as planned when the backup was created.
    planned: str | None = None
    #: The point's image once the repository is ready (what a failure removes).
    target: Path | None = None
    #: Set before the export request is sent: from then on the VMA may hold a snapshot to release.
    export_requested: bool = False
    #: Set in the same shielded step that records the point completed: its files are kept.
    completed: bool = False
    progress: mover.CopyProgress | None = None
    operation: str = ""

    def on_progress(self, progress: mover.CopyProgress) -> None:
        """The mover's progress callback: only kept here; :meth:`BackupEngine._write_progress`
        writes it to the row at its own pace."""
        self.progress = progress

    @classmethod
    def from_row(cls, row: Any) -> RunningBackup:
        return cls(
            backup_id=row["id"],
            vm_name=row["vm_name"],
            vm_key=row["vm_key"],
            vm_path=row["vm_path"],
            disk_id=row["disk_id"],
            requested_type=row["requested_type"],
            repository_id=row["repository_id"],
            vm_context_id=row["vm_context_id"],
            planned=row["file_path"],
        )


@dataclass
class Silence:
    """Since when the VMA has not answered (None: it answers)."""

    since: float | None = None


@dataclass(frozen=True)
class CopyPlan:
    """How the export becomes the point: the kind of point and what the mover reads."""

    backup_type: str
    parent: Parent | None
    extents: list[tuple[int, int]] | None
    allocated_only: bool


def plan_copy(export: ExportedDisk, parent: Parent | None) -> CopyPlan:
    """The copy of ``export``: an incremental is an overlay on ``parent`` over the changed areas;
    a full reads the allocated areas; a CBT reset reads the source's own allocation map and, like
    any full, starts a new chain (the parent is dropped)."""
    if export.mode == "incremental":
        if parent is None:
            raise BackupError("the VMA planned an incremental pass, but the backup has no parent point")
        if export.extents is None:
            raise BackupError("the VMA's incremental export lists no changed areas")
        return CopyPlan("incremental", parent, export.extents, allocated_only=False)
    if export.mode == "full" and export.extents is not None:
        return CopyPlan("full", None, export.extents, allocated_only=False)
    return CopyPlan("full", None, None, allocated_only=True)


def remove_point_files(image: Path) -> bool:
    """Remove an unfinished point's image and manifest. True when nothing of them is left.
    Blocking: run it in a thread."""
    ok = True
    for path in (image, layout.manifest_path(image)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("cannot remove %s: %s", path, e.strerror or e)
            ok = False
    return ok


async def finish_backup(
    db: Database, backup_id: str, status: str, error: str | None, *, files_removed: bool = True
) -> bool:
    """End an active backup as ``status`` unless it has ended already; True if this call ended it.

    A point that did not complete has no files: its paths are cleared once they are removed (kept
    when removing failed, so an operator can find what is left). Its parent link goes too: it was
    never part of the chain, and the link would keep the parent's row from being deleted. One
    statement, shielded."""
    with trio.CancelScope(shield=True):
        ended = await db.fetchval(
            "UPDATE backup_jobs SET status = $2, error_message = COALESCE($3, error_message),"
            " current_operation = $4,"
            " file_path = CASE WHEN $5 THEN NULL ELSE file_path END,"
            " manifest_path = CASE WHEN $5 THEN NULL ELSE manifest_path END, parent_backup_id = NULL,"
            " completed_at = now(), updated_at = now()"
            " WHERE id = $1 AND status IN ('pending', 'running') RETURNING id",
            backup_id,
            status,
            None if error is None else error[:4000],
            "Backup failed" if status == "failed" else "Backup cancelled",
            files_removed,
        )
    return ended is not None


class BackupEngine(VmaJobEngine):
    kind = "backup engine"
    action = "backup_engine"
    lease_table = "backup_jobs"
    active_statuses = ("pending", "running")

    def __init__(
        self,
        config: OmaConfig,
        db: Database,
        vma: VmaClient,
        box: SecretBox,
        resolve_login: ResolveLogin,
        *,
        after_backup: AfterBackup | None = None,
    ) -> None:
        super().__init__(config, db, vma, resolve_login, max_active=config.max_active_backups)
        self.box = box
        self.after_backup = after_backup
        #: Backups this process drives now, by id.
        self.backups: dict[str, RunningBackup] = {}
        #: The mover's reconnection window when the export drops.
        self.reconnect_timeout = RECONNECT_TIMEOUT

    def active_count(self) -> int:
        return len(self.backups)

    def start(self, nursery: trio.Nursery, row: Any) -> None:
        job = RunningBackup.from_row(row)
        self.backups[job.backup_id] = job
        metrics.ACTIVE_JOBS.labels("backup").inc()
        nursery.start_soon(self._drive, job)

    def driven_ids(self) -> list[str]:
        return list(self.backups)

    async def take_over(self, row: Any) -> None:
        """A backup whose engine stopped renewing its lease (or, on this host, whose process is
        gone; see :mod:`oma.workers`): left alone it would hold its disk's "one active backup"
        slot forever. Its export is released on the VMA, its unfinished files are removed, and it
        fails with the reason; the next backup of the disk starts from the last complete point."""
        await self._release_export(row["id"])
        found = await self.db.fetchrow(
            "SELECT file_path, repository_id FROM backup_jobs WHERE id = $1", row["id"]
        )
        removed = True
        if found is not None and found["file_path"]:
            removed = await self._remove_orphan_files(found["repository_id"], Path(found["file_path"]))
        reason = "its process is gone" if claimant_gone(row["previous"]) else "its lease expired"
        if await finish_backup(
            self.db,
            row["id"],
            "failed",
            f"the OMA process driving the backup ({row['previous']}) stopped: {reason}",
            files_removed=removed,
        ):
            log.warning("backup of a stopped OMA process failed", extra={"claimed_by": row["previous"]})

    async def _remove_orphan_files(self, repository_id: str, image: Path) -> bool:
        """Remove what a dead process left of a point, once its repository is ready: the path of
        an unmounted share is an empty directory, where nothing would be found and the files on
        the share would stay. False (paths kept on the row) when the repository is unavailable."""
        try:
            await ensure_ready(self.db, self.box, self.config.mounts_dir, repository_id)
        except ApiError as e:
            log.warning("cannot remove the files of the orphaned backup: %s", e.message)
            return False
        removed: bool = await trio.to_thread.run_sync(remove_point_files, image)
        return removed

    async def claim(self, limit: int) -> list[Any]:
        return await self.db.fetch(
            "UPDATE backup_jobs b SET claimed_by = $1, claimed_at = now(), status = 'running',"
            " started_at = now(), current_operation = 'Preparing the repository', updated_at = now()"
            " WHERE b.id IN (SELECT id FROM backup_jobs WHERE status = 'pending' AND claimed_by IS NULL"
            "  ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT $2)"
            " RETURNING b.id, b.vm_name, b.vm_key, b.vm_path, b.disk_id, b.requested_type, b.repository_id,"
            " b.vm_context_id, b.file_path",
            self.engine_id,
            limit,
        )

    # -- one backup --------------------------------------------------------------------------------

    async def _drive(self, job: RunningBackup) -> None:
        with log_context(job_id=job.backup_id, action="backup_engine"):
            started = time.monotonic()
            error: str | None = None
            try:
                await self._run(job)
            except BackupError as e:
                error = str(e)
            except (VmaError, ApiError) as e:
                error = e.message
            except Exception as e:
                log.exception("backup engine failure")
                error = f"{type(e).__name__}: {e}"
            except BaseException:  # trio.Cancelled, possibly grouped: the OMA shuts down
                error = "the OMA shut down during the backup"
                raise
            finally:
                with trio.CancelScope(shield=True):  # each step of _finish bounds itself
                    await self._finish(job, error)
                    await self._count(job, started)
                self.backups.pop(job.backup_id, None)
                metrics.ACTIVE_JOBS.labels("backup").dec()
                self.wake()
            if job.completed and self.after_backup is not None:
                try:
                    await self.after_backup(job.backup_id)
                except Exception:
                    log.exception("the after-backup hook (copy rules) failed")

    async def _note(self, job: RunningBackup, operation: str) -> None:
        job.operation = operation
        await self.db.execute(
            "UPDATE backup_jobs SET current_operation = $2, updated_at = now()"
            " WHERE id = $1 AND status = 'running'",
            job.backup_id,
            operation,
        )

    async def _run(self, job: RunningBackup) -> None:
        root = await ensure_ready(self.db, self.box, self.config.mounts_dir, job.repository_id)
        async with self._holding_disk(job):
            parent = None
            if job.requested_type == "incremental" and not await self._full_forced(job):
                parent = await self._take_parent(job)
            target = layout.point_path(
                root, job.vm_key, job.disk_id, job.backup_id, parent.file_path if parent else None
            )
            if job.planned != str(target):
                # The path is on the row before the file can exist: a crash from here on leaves
                # a record of what to remove (recover_orphans).
                await self.db.execute(
                    "UPDATE backup_jobs SET file_path = $2, manifest_path = $3 WHERE id = $1",
                    job.backup_id,
                    str(target),
                    str(layout.manifest_path(target)),
                )
                job.planned = str(target)
            await trio.to_thread.run_sync(_prepare_target, target)
            job.target = target
            export = await self._export(job, parent)
            plan = plan_copy(export, parent)
            result = await self._copy(job, export, plan)
            await self._complete(job, export, plan, result)

    @contextlib.asynccontextmanager
    async def _holding_disk(self, job: RunningBackup) -> AsyncIterator[None]:
        """Hold the disk's chain lock (:func:`oma.backups.chains.disk_lock`) while the point is
        made: a delete or a retention merge of the same chain never runs under a backup reading
        its parent. Polled rather than waited for, so that a shutdown is never stuck in a lock
        wait inside PostgreSQL."""
        waiting = False
        while True:
            async with disk_lock(self.db, job.vm_key, job.disk_id, job.repository_id) as got:
                if got:
                    yield
                    return
            if not waiting:
                waiting = True
                await self._note(job, "Waiting for another operation on this disk's backups to end")
            await trio.sleep(self.config.engine_poll_interval)
            await self._still_running(job)

    async def _full_forced(self, job: RunningBackup) -> bool:
        """True when the backup's policy makes this incremental a full: its repository locks
        points for longer than the policy keeps them (``immutable_days > retention_days``) and the
        chain it would grow started before the retention window. Such a chain can never be
        trimmed by merging (the point that would absorb the expired ones is always still locked),
        so it is closed and retention later removes it whole."""
        row = await self.db.fetchrow(
            "SELECT p.retention_days, r.immutable, r.immutable_days,"
            " (SELECT min(c.created_at) < now() - make_interval(days => p.retention_days)"
            "  FROM backup_jobs c WHERE c.status IN ('completed', 'deleting') AND c.chain_id ="
            f"  (SELECT l.chain_id FROM ({LATEST_POINT}) l)) AS chain_expired"
            " FROM backup_jobs b JOIN backup_policies p ON p.id = b.policy_id"
            " JOIN backup_repositories r ON r.id = b.repository_id WHERE b.id = $4",
            job.vm_key,
            job.disk_id,
            job.repository_id,
            job.backup_id,
        )
        if row is None or not row["immutable"] or row["immutable_days"] <= row["retention_days"]:
            return False
        if not row["chain_expired"]:
            return False
        await self._note(job, "A new full: the chain is older than the policy's retention and locked longer")
        log.info(
            "full forced by policy",
            extra={"retention_days": row["retention_days"], "immutable_days": row["immutable_days"]},
        )
        return True

    async def _lock_point(self, job: RunningBackup) -> None:
        """Lock a completed point's files in an immutable repository."""
        assert job.target is not None
        row = await self.db.fetchrow(
            "SELECT created_at, repository_id FROM backup_jobs WHERE id = $1", job.backup_id
        )
        if row is not None:
            await lock_stored_point(
                self.db, job.target, job.backup_id, row["repository_id"], row["created_at"]
            )

    async def _take_parent(self, job: RunningBackup) -> Parent:
        """The chain's latest completed point, recorded as the backup's parent in one transaction
        with the parent row share-locked: it is still completed when recorded, and from then on
        the foreign key keeps it."""
        async with self.db.transaction() as conn:
            row = await conn.fetchrow(
                f"{LATEST_POINT} FOR SHARE",
                job.vm_key,
                job.disk_id,
                job.repository_id,
            )
            if row is None:
                raise BackupError(
                    f"no completed backup of {job.vm_name} {job.disk_id} in repository {job.repository_id}"
                    " to build an incremental on (was the last point deleted?): start a full backup"
                )
            await conn.execute(
                "UPDATE backup_jobs SET parent_backup_id = $2, chain_id = $3, updated_at = now()"
                " WHERE id = $1",
                job.backup_id,
                row["id"],
                row["chain_id"],
            )
        parent = Parent(row["id"], row["chain_id"], row["change_id"], Path(row["file_path"] or ""))
        if not row["file_path"] or not await trio.to_thread.run_sync(parent.file_path.is_file):
            raise BackupError(f"the file of parent point {parent.backup_id} is missing ({row['file_path']})")
        return parent

    async def _export(self, job: RunningBackup, parent: Parent | None) -> ExportedDisk:
        """Start the VMA's export job and wait until it serves the disk."""
        credential_id: int | None = None
        if job.vm_context_id is not None:
            credential_id = await self.db.fetchval(
                "SELECT credential_id FROM vm_contexts WHERE context_id = $1", job.vm_context_id
            )
        login = await self.resolve_login(credential_id)
        await self._note(job, "Asking the VMA for a snapshot export")
        job.export_requested = True  # a request cut short may still have started the job
        await self.vma.export(
            job_id=job.backup_id,
            vcenter=login.vcenter,
            username=login.username,
            password=login.password,
            tls_mode=login.tls_mode,
            tls_thumbprint=login.tls_thumbprint,
            disks={job.vm_path: [job.disk_id]},
            previous_change_ids={job.vm_path: {job.disk_id: parent.change_id if parent else None}},
        )
        log.info("export requested", extra={"base_change_id": parent.change_id if parent else None})
        silence = Silence()
        while True:
            await trio.sleep(min(0.5, self.config.engine_poll_interval))
            answer = await self._poll_export(job, silence)
            if answer is None:
                continue
            if answer.get("status") in ("failed", "completed", "cancelled"):
                raise BackupError(
                    f"the VMA's export job ended {answer.get('status')} before serving the disk: "
                    f"{answer.get('error') or answer.get('current_operation') or 'no reason given'}"
                )
            if answer.get("phase") != "exported":
                if answer.get("current_operation") and f"VMA: {answer['current_operation']}" != job.operation:
                    await self._note(job, f"VMA: {answer['current_operation']}")
                continue
            exports = exports_of(answer)
            mine = [e for e in exports if e.vm_path == job.vm_path and e.disk_id == job.disk_id]
            if not mine and len(exports) == 1:
                mine = exports  # one disk asked, one served: the VMA named it its own way
            if not mine:
                served = [f"{e.vm_path} {e.disk_id}" for e in exports]
                raise BackupError(f"the VMA exported {served}, not {job.vm_path} {job.disk_id}")
            export = mine[0]
            log.info(
                "disk exported",
                extra={
                    "mode": export.mode,
                    "capacity": export.capacity,
                    "extents": None if export.extents is None else len(export.extents),
                },
            )
            return export

    async def _poll_export(self, job: RunningBackup, silence: Silence) -> dict[str, Any] | None:
        """One look at the backup and its export job: the VMA's ``/status`` answer, or None while
        the VMA does not answer (tolerated for ``vma_lost_timeout`` s: the tunnel restarts).
        Raises :class:`BackupError` when the backup row stopped running or the VMA lost the job."""
        await self._still_running(job)
        try:
            answer = await self.vma.status(job.backup_id)
        except VmaJobNotFound as e:
            raise BackupError("the VMA no longer knows the export job (was it restarted?)") from e
        except VmaError as e:
            now = time.monotonic()
            silence.since = silence.since or now
            if now - silence.since > self.config.vma_lost_timeout:
                raise BackupError(
                    f"no answer from the VMA for {now - silence.since:.0f} s: {e.message}"
                ) from e
            return None
        silence.since = None
        return answer

    async def _still_running(self, job: RunningBackup) -> None:
        status = await self.db.fetchval("SELECT status FROM backup_jobs WHERE id = $1", job.backup_id)
        if status != "running":
            raise BackupError(f"the backup was ended while it ran ({status or 'deleted'})")

    async def _copy(self, job: RunningBackup, export: ExportedDisk, plan: CopyPlan) -> mover.CopyProgress:
        """The mover's copy from the export into the new image, with the VMA's job watched and
        the progress written to the row while it runs."""
        assert job.target is not None
        kind = "an overlay on " + plan.parent.backup_id if plan.parent else "a full image"
        await self._note(job, f"Copying {job.disk_id} ({export.mode}) into {kind}")
        stopped: list[str] = []
        result: mover.CopyProgress | None = None
        failure: str | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_export, job, stopped, nursery.cancel_scope)
            nursery.start_soon(self._write_progress, job)
            try:
                result = await mover.copy(
                    export.uri,
                    str(job.target),
                    extents=plan.extents,
                    allocated_only=plan.allocated_only,
                    backing=plan.parent.file_path if plan.parent else None,
                    reconnect_timeout=self.reconnect_timeout,
                    on_progress=job.on_progress,
                )
            except mover.MoverError as e:
                failure = f"copy from the VMA's export failed: {type(e).__name__}: {e}"
            nursery.cancel_scope.cancel()
        if stopped:  # the cause, rather than the read errors it led to
            raise BackupError(stopped[0] if failure is None else f"{stopped[0]} ({failure})")
        if failure is not None:
            raise BackupError(failure)
        if result is None:
            raise BackupError("the copy was stopped")
        return result

    async def _watch_export(self, job: RunningBackup, stopped: list[str], scope: trio.CancelScope) -> None:
        """Stop the copy as soon as its source is known to be gone: the VMA's export job failed,
        ended or vanished, or the backup row stopped running."""
        silence = Silence()
        while True:
            await trio.sleep(self.config.engine_poll_interval)
            try:
                answer = await self._poll_export(job, silence)
                if answer is not None and answer.get("status") != "running":
                    raise BackupError(
                        f"the VMA's export job ended {answer.get('status')} during the copy: "
                        f"{answer.get('error') or 'no reason given'}"
                    )
            except BackupError as e:
                stopped.append(str(e))
                scope.cancel()
                return
            except Exception:
                log.exception("watching the export failed")

    async def _write_progress(self, job: RunningBackup) -> None:
        written: mover.CopyProgress | None = None
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            p = job.progress
            if p is None or p is written:
                continue
            written = p
            try:
                await self.db.execute(
                    "UPDATE backup_jobs SET progress_percent = $2, bytes_transferred = $3, updated_at = now()"
                    " WHERE id = $1 AND status = 'running'",
                    job.backup_id,
                    min(p.percent, 99.9),
                    p.bytes_read,
                )
            except Exception:
                log.exception("writing the backup's progress failed")

    async def _complete(
        self, job: RunningBackup, export: ExportedDisk, plan: CopyPlan, result: mover.CopyProgress
    ) -> None:
        assert job.target is not None
        if result.manifest is None or result.disk_digest is None:
            raise BackupError("the mover wrote no manifest for the new image")
        stored = (await trio.to_thread.run_sync(job.target.stat)).st_size
        parent = plan.parent
        with trio.CancelScope(shield=True):  # recorded and flagged as one step
            done = await self.db.fetchval(
                "UPDATE backup_jobs SET status = 'completed', backup_type = $2, parent_backup_id = $3,"
                " chain_id = $4, file_path = $5, manifest_path = $6, stored_bytes = $7,"
                " virtual_size_bytes = $8, changed_bytes = $9, disk_digest = $10, change_id = $11,"
                " copy_mode = $12, bytes_transferred = $13, progress_percent = 100,"
                " current_operation = 'Backup completed', completed_at = now(), updated_at = now()"
                " WHERE id = $1 AND status = 'running' RETURNING id",
                job.backup_id,
                plan.backup_type,
                parent.backup_id if parent else None,
                parent.chain_id if parent else job.backup_id,
                str(job.target),
                result.manifest,
                stored,
                export.capacity,
                result.bytes_planned,
                result.disk_digest,
                export.change_id,
                export.mode,
                result.bytes_read,
            )
            job.completed = done is not None
        if not job.completed:
            raise BackupError("the backup was ended while its copy ran (cancelled or deleted)")
        with trio.CancelScope(shield=True):
            await self._lock_point(job)
        log.info(
            "backup completed",
            extra={
                "backup_type": plan.backup_type,
                "copy_mode": export.mode,
                "stored_bytes": stored,
                "changed_bytes": result.bytes_planned,
                "disk_digest": result.disk_digest,
            },
        )

    async def _count(self, job: RunningBackup, started: float) -> None:
        """The backup's end in the metrics: its status, and for a completed point the bytes its
        copy wrote as data and its time."""
        if job.completed:
            metrics.job_ended("backup", "completed")
            written = job.progress.bytes_written if job.progress is not None else 0
            metrics.pass_completed("backup", written, time.monotonic() - started)
            return
        with trio.move_on_after(FINISH_TIMEOUT):
            try:
                status = await self.db.fetchval("SELECT status FROM backup_jobs WHERE id = $1", job.backup_id)
            except Exception:
                log.exception("reading the backup's end for the metrics failed")
                return
            metrics.job_ended("backup", status or "deleted")

    async def _finish(self, job: RunningBackup, error: str | None) -> None:
        """Release the export, and unless the point completed remove its files and fail it.
        Runs shielded: the VMA and database steps have their own deadlines."""
        if job.export_requested:
            await self._release_export(job.backup_id)
        if job.completed:
            return
        if error is None:
            error = "the backup ended without completing"
        with trio.move_on_after(FINISH_TIMEOUT):
            try:
                removed = True
                if job.target is not None:
                    removed = await trio.to_thread.run_sync(remove_point_files, job.target)
                if await finish_backup(self.db, job.backup_id, "failed", error, files_removed=removed):
                    log.error("backup failed: %s", error)
            except Exception:
                log.exception("recording the end of the backup failed")

    async def _release_export(self, backup_id: str) -> None:
        """``cleanup_all`` on the VMA: its sources stop, the snapshot goes. A VMA that does not know
        the job (never started, or released already) has nothing to release."""
        with trio.move_on_after(FINISH_TIMEOUT + 2):
            try:
                answer = await self.vma.cleanup(backup_id, "cleanup_all", wait_s=FINISH_TIMEOUT)
            except VmaJobNotFound:
                return
            except VmaError as e:
                log.warning("the VMA could not release the export: %s", e.message)
                return
            log.info("export released", extra={"snapshots_removed": answer.get("snapshots_removed")})


def _prepare_target(target: Path) -> None:
    """The point's directory, and a guard: the mover writes *into* an existing file instead of
    creating a new image, so a file found at a new point's path is never taken over (nor removed:
    the caller only owns the path once this returns)."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if target.exists():
        raise BackupError(f"{target} exists already; it is not this backup's to overwrite")
