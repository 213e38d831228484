"""Full restore: a backup point copied whole by the mover to a raw file or block device, a new
QCOW2 image, or an NBD target.

Targets (checked before the job is accepted):

``raw``
    An absolute path. A path that does not exist becomes a new sparse file of the disk's size
    (only the point's allocated data is written: the rest stays holes). An existing block device
    is written whole (zeros where the point has none, sent as zero commands), unless it is in use
    (a mounted file system, another exclusive holder: 409). An existing regular file is refused
    (409 ``TARGET_EXISTS``): a full restore never overwrites a file.
``qcow2``
    An absolute path ending in ``.qcow2`` that does not exist: a new standalone image (no
    backing file) with its BLAKE3 manifest beside it, as the mover writes every image.
``nbd``
    An NBD URI (``nbd://host[:port]/export``, ``nbd+unix:///export?socket=...``), e.g. the export
    of a CloudStack volume; written whole, as a block device.

Where a path target may lie: only under a *restore root* an administrator configured
(``OMA_RESTORE_ROOTS``, :attr:`oma.config.OmaConfig.restore_roots`; none by default), both
resolved through every symlink; a block device is allowed when it, or a directory holding it,
is a restore root. Anything else is refused (403 ``TARGET_NOT_ALLOWED``): an operator's request
never writes an arbitrary host path (``/etc/shadow``, ``/root/.ssh``, a disk of the OMA).
A managed volume is written through its NBD export, which needs no root. The paths a job will
write are resolved when it is accepted and again right before the copy: a symlink planted in
between fails the job (:func:`recheck_target`).

Repositories are never written: a path target (and, for QCOW2, the manifest written beside it)
is resolved through every symlink, and one inside any repository's root, or equal to any file a
backup or a copy recorded, is refused (422 ``TARGET_IN_REPOSITORY``). A QCOW2 target whose
manifest path exists is refused like an existing target (409 ``TARGET_EXISTS``): the mover would
replace that manifest.

The job (a ``restore_jobs`` row) records progress about once a second and, at the end, the disk
digest of what was written: for a QCOW2 target the manifest's digest computed while copying;
for raw and NBD targets a BLAKE3 checksum of the target read back after the copy. Either must
equal the point's ``disk_digest`` (when the point has one), else the job fails. A failed job
removes the file it created (new raw file, new QCOW2 image and manifest); it never removes
what existed before (a device, an NBD export, a file named like a raw target's manifest).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import trio

from oma.restore.points import hold_completed
from oma.store.pages import Page, json_page
from oma.store.rows import new_id
from oma.workers import claimant_gone
from pyapp import mover
from pyapp.api import ApiError
from pyapp.db import Database, Record
from pyapp.logs import log_context

log = logging.getLogger(__name__)

TargetType = Literal["raw", "qcow2", "nbd"]
TARGET_EXISTS = "TARGET_EXISTS"
TARGET_IN_REPOSITORY = "TARGET_IN_REPOSITORY"
TARGET_NOT_ALLOWED = "TARGET_NOT_ALLOWED"
INVALID_TARGET = "INVALID_TARGET"
PROGRESS_INTERVAL_S = 1.0
JOB_COLUMNS = (
    "id, backup_id, target_type, target, status, bytes_total, bytes_done, progress_percent, disk_digest,"
    " error_message, created_by, created_at, started_at, completed_at"
)
#: The same, with the id under the name the API uses (``restore_id``).
LIST_COLUMNS = JOB_COLUMNS.replace("id, ", "id AS restore_id, ", 1)


@dataclass(frozen=True)
class TargetPlan:
    """How to write one checked target."""

    target_type: TargetType
    target: str
    creates: bool  # the job creates the target (and removes it on failure)
    target_is_zero: bool  # nothing to zero: only the allocated data is copied
    #: The written paths resolved through every symlink when the target was checked.
    resolved: tuple[str, ...] = ()


def written_paths(target_type: TargetType, target: str) -> list[str]:
    """The files a path target makes the mover write: the target, and a QCOW2 image's manifest."""
    return [target, manifest_path(target)] if target_type == "qcow2" else [target]


def manifest_path(target: str) -> str:
    return target + ".manifest"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_not_in_repository(
    target_type: TargetType, target: str, repository_roots: Sequence[Path]
) -> list[str]:
    """Refuse (422 ``TARGET_IN_REPOSITORY``) a target that would write inside a repository's
    root, both resolved through every symlink (a link to a repository file, a directory link
    into a repository, a dangling link whose destination would be created). Blocking. Returns
    the resolved paths the restore would write, for the caller's check against recorded files."""
    resolved = [os.path.realpath(p) for p in written_paths(target_type, target)]
    for root in repository_roots:
        real_root = Path(os.path.realpath(root))
        for given, real in zip(written_paths(target_type, target), resolved, strict=True):
            if _inside(Path(real), real_root):
                raise ApiError(
                    422,
                    TARGET_IN_REPOSITORY,
                    f"{given} is inside the backup repository at {root}"
                    + (f" (it resolves to {real})" if real != given else "")
                    + ": a full restore never writes into a repository",
                )
    return resolved


def check_restore_root(target_type: TargetType, target: str, restore_roots: Sequence[Path]) -> None:
    """Refuse (403 ``TARGET_NOT_ALLOWED``) a path target that is not under one of the
    administrator's restore roots, target and roots resolved through every symlink (blocking).
    NBD targets need no root."""
    if target_type == "nbd":
        return
    if not target.startswith("/") or "\x00" in target:
        raise ApiError(422, INVALID_TARGET, f"the {target_type} target must be an absolute path")
    roots = [Path(os.path.realpath(r)) for r in restore_roots if r.is_absolute()]
    if not roots:
        raise ApiError(
            403,
            TARGET_NOT_ALLOWED,
            f"full restores to host paths are disabled: {target} is refused. Restore to an NBD"
            " target (a managed volume's export), or ask an administrator to set OMA_RESTORE_ROOTS",
        )
    for given in written_paths(target_type, target):
        real = Path(os.path.realpath(given))
        if not any(_inside(real, root) for root in roots):
            raise ApiError(
                403,
                TARGET_NOT_ALLOWED,
                f"{given}"
                + (f" (it resolves to {real})" if str(real) != given else "")
                + f" is not under a restore root ({', '.join(str(r) for r in restore_roots)}):"
                " a full restore writes only there or to an NBD target",
            )


def check_target(target_type: TargetType, target: str, repository_roots: Sequence[Path] = ()) -> TargetPlan:
    """Validate a target (blocking: it looks at the file system). Raises :class:`ApiError`."""
    if target_type == "nbd":
        if not target.startswith(("nbd://", "nbd+unix://")):
            raise ApiError(422, INVALID_TARGET, "an nbd target is an NBD URI (nbd://host:port/export)")
        return TargetPlan(target_type, target, creates=False, target_is_zero=False)
    path = Path(target)
    if not path.is_absolute() or "\x00" in target:
        raise ApiError(422, INVALID_TARGET, f"the {target_type} target must be an absolute path")
    if target_type == "qcow2" and path.suffix != ".qcow2":
        raise ApiError(422, INVALID_TARGET, "a qcow2 target path ends in .qcow2")
    resolved = tuple(check_not_in_repository(target_type, target, repository_roots))
    if target_type == "qcow2" and os.path.lexists(manifest_path(target)):
        raise ApiError(
            409,
            TARGET_EXISTS,
            f"{manifest_path(target)} exists; a QCOW2 restore writes its manifest there and never"
            " overwrites a file",
        )
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise ApiError(422, INVALID_TARGET, f"the directory {path.parent} does not exist") from None
        return TargetPlan(target_type, str(path), creates=True, target_is_zero=True, resolved=resolved)
    if target_type == "raw" and stat.S_ISBLK(st.st_mode):
        # O_EXCL on a block device fails (EBUSY) while a file system on it is mounted or another
        # holder has it: a restore never writes over a device in use.
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_EXCL))
        except OSError as e:
            raise ApiError(
                409, TARGET_EXISTS, f"block device {path} is in use (mounted, or held): {e.strerror}"
            ) from e
        return TargetPlan(target_type, str(path), creates=False, target_is_zero=False, resolved=resolved)
    raise ApiError(
        409,
        TARGET_EXISTS,
        f"{path} exists; a full restore writes a new file"
        + (" or a block device" if target_type == "raw" else "")
        + ", it never overwrites one",
    )


async def accept_job(
    db: Database, backup_id: str, plan: TargetPlan, created_by: str, worker_id: str
) -> Record:
    """Record a ``pending`` job, unless another one is still writing the same target (409):
    checked and inserted under a transaction lock on the target, so two requests cannot both
    pass; the point is held meanwhile (:func:`oma.restore.points.hold_completed`)."""
    async with db.transaction() as conn:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('restore-target:' || $1))", plan.target)
        await hold_completed(conn, backup_id)
        busy = await conn.fetchval(
            "SELECT id FROM restore_jobs WHERE target = $1 AND status IN ('pending', 'running') LIMIT 1",
            plan.target,
        )
        if busy is not None:
            raise ApiError.conflict(f"restore {busy} is already writing {plan.target}")
        row = await conn.fetchrow(
            "INSERT INTO restore_jobs (id, backup_id, target_type, target, status, created_by, claimed_by)"
            f" VALUES ($1, $2, $3, $4, 'pending', $5, $6) RETURNING {JOB_COLUMNS}",
            new_id("restore"),
            backup_id,
            plan.target_type,
            plan.target,
            created_by,
            worker_id,
        )
    assert row is not None
    return row


def _remove_target_files(target_type: TargetType, target: str) -> None:
    """Remove what a job wrote at a target it created: the file, and a QCOW2 image's manifest
    (a raw target has none: a file named like one is someone else's)."""
    for p in written_paths(target_type, target):
        Path(p).unlink(missing_ok=True)


def _remove_created(plan: TargetPlan) -> None:
    if plan.creates:
        _remove_target_files(plan.target_type, plan.target)


def _remove_orphaned_target(target_type: str, target: str) -> None:
    """What an interrupted job created: a raw or QCOW2 target that is a regular file was made by
    the job (those targets refuse existing files); a device or an export is left alone."""
    if target_type in ("raw", "qcow2") and Path(target).is_file():
        _remove_target_files("qcow2" if target_type == "qcow2" else "raw", target)


async def fail_orphaned_jobs(db: Database) -> list[str]:
    """Fail the jobs an OMA process on this host was running when it died, and remove the
    partial targets they created. Returns their ids."""
    rows = await db.fetch(
        "SELECT id, target_type, target, claimed_by FROM restore_jobs"
        " WHERE status IN ('pending', 'running') AND claimed_by LIKE $1",
        f"{socket.gethostname()}:%",
    )
    failed = []
    for row in rows:
        if not claimant_gone(row["claimed_by"]):
            continue
        await trio.to_thread.run_sync(_remove_orphaned_target, row["target_type"], row["target"])
        ended = await db.fetchval(
            "UPDATE restore_jobs SET status = 'failed', completed_at = now(),"
            " error_message = $2 WHERE id = $1 AND status IN ('pending', 'running') RETURNING id",
            row["id"],
            f"the OMA process running the restore ({row['claimed_by']}) stopped",
        )
        if ended is not None:
            failed.append(row["id"])
            log.warning("restore of a stopped OMA process failed", extra={"restore_id": row["id"]})
    return failed


class DigestMismatch(Exception):
    """What was written does not read back as the backup point."""


@dataclass
class _Latest:
    """The last progress report of the copy (written by the mover's reporter task)."""

    value: mover.CopyProgress | None = None

    def set(self, progress: mover.CopyProgress) -> None:
        self.value = progress


def _reason(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


def _cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(trio.Cancelled) is not None
    return isinstance(exc, trio.Cancelled)


async def _record_progress(db: Database, restore_id: str, latest: _Latest) -> None:
    """Write the copy's progress about once a second; a failed write is logged, never fatal
    (the copy matters, its progress figures do not)."""
    while True:
        await trio.sleep(PROGRESS_INTERVAL_S)
        if latest.value is None:
            continue
        try:
            await db.execute(
                "UPDATE restore_jobs SET bytes_done = $2, progress_percent = $3 WHERE id = $1",
                restore_id,
                latest.value.bytes_read,
                min(latest.value.percent, 99.9),
            )
        except Exception as exc:
            log.warning("recording the progress of a full restore failed: %s", exc)


class TargetChanged(Exception):
    """The target is no longer what was checked when the job was accepted."""


def recheck_target(plan: TargetPlan, repository_roots: Sequence[Path]) -> None:
    """Check a path target again right before the copy (blocking): a symlink planted into a
    repository since the job was accepted is refused, and so is any file that appeared at a
    target the job was to create (it is not the job's to write, nor to remove)."""
    if plan.target_type == "nbd":
        return
    try:
        resolved = check_not_in_repository(plan.target_type, plan.target, repository_roots)
    except ApiError as e:
        raise TargetChanged(f"{e.message} (the target changed after the restore was accepted)") from e
    if plan.resolved and tuple(resolved) != plan.resolved:
        raise TargetChanged(
            f"{plan.target} now resolves to {resolved[0]}, not {plan.resolved[0]} as when the restore"
            " was accepted (a symlink changed): it is left alone"
        )
    if plan.creates:
        for path in written_paths(plan.target_type, plan.target):
            if os.path.lexists(path):
                raise TargetChanged(f"{path} appeared after the restore was accepted; it is left alone")


async def run_full_restore(
    db: Database,
    restore_id: str,
    source: str,
    plan: TargetPlan,
    expected: str | None,
    repository_roots: Sequence[Path] = (),
) -> None:
    """Run one accepted job to its end (``completed`` or ``failed``); never raises but
    cancellation, which marks the job failed first. Only files this job created are removed
    when it fails."""
    created = False
    with log_context(job_id=restore_id, action="restore_full"):
        try:
            size = await trio.to_thread.run_sync(lambda: mover.ImageReader(source).size)
            await db.execute(
                "UPDATE restore_jobs SET status = 'running', started_at = now(), bytes_total = $2"
                " WHERE id = $1",
                restore_id,
                size,
            )
            latest = _Latest()
            await trio.to_thread.run_sync(recheck_target, plan, repository_roots)
            created = plan.creates  # from here on, what is at the target is this job's
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_record_progress, db, restore_id, latest)
                result = await mover.copy(
                    source,
                    plan.target,
                    allocated_only=plan.target_is_zero,
                    target_is_zero=plan.target_is_zero,
                    write_manifest=plan.target_type == "qcow2",
                    on_progress=latest.set,
                )
                nursery.cancel_scope.cancel()
            digest = result.disk_digest
            if plan.target_type != "qcow2" or digest is None:
                digest = (await mover.checksum(plan.target)).disk_digest
            if expected is not None and digest != expected:
                raise DigestMismatch(
                    f"the restored disk's digest {digest} differs from the backup's {expected}"
                )
            await db.execute(
                "UPDATE restore_jobs SET status = 'completed', bytes_done = bytes_total,"
                " progress_percent = 100, disk_digest = $2, completed_at = now() WHERE id = $1",
                restore_id,
                digest,
            )
            log.info("full restore completed", extra={"disk_digest": digest})
        except BaseException as exc:
            message = "cancelled: the OMA is shutting down" if _cancelled(exc) else _reason(exc)
            with trio.CancelScope(shield=True):
                if created:
                    await trio.to_thread.run_sync(_remove_created, plan)
                await db.execute(
                    "UPDATE restore_jobs SET status = 'failed', error_message = $2, completed_at = now()"
                    " WHERE id = $1",
                    restore_id,
                    message,
                )
            log.warning("full restore failed: %s", message)
            if _cancelled(exc) or not isinstance(exc, Exception):
                raise


def job_body(row: Record) -> dict[str, Any]:
    """The API's view of a ``restore_jobs`` row (``restore_id`` rather than ``id``)."""
    out = dict(row.items())
    out["restore_id"] = out.pop("id")
    return out


async def restore_page(db: Database, status: str | None, backup_id: str | None, page: Page) -> str:
    """A page of the full restore jobs (optionally of one status and/or one point), newest first,
    as JSON."""
    return await json_page(
        db,
        "restores",
        columns=LIST_COLUMNS,
        from_where="FROM restore_jobs t WHERE ($1::text IS NULL OR t.status = $1)"
        " AND ($2::text IS NULL OR t.backup_id = $2)",
        order=[("created_at", "DESC"), ("id", "DESC")],
        args=(status, backup_id),
        page=page,
    )


async def load_restore(db: Database, restore_id: str) -> dict[str, Any]:
    row = await db.fetchrow(f"SELECT {JOB_COLUMNS} FROM restore_jobs WHERE id = $1", restore_id)
    if row is None:
        raise ApiError.not_found(f"restore job {restore_id!r} not found", "RESTORE_NOT_FOUND")
    return job_body(row)
