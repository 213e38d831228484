"""The restore service of one OMA process: open mounts, their cleanup, full restore jobs.

Mount state lives in ``restore_mounts``, so any worker process serves any mount: a process
opens the image the first time it serves a mount and keeps the :class:`~oma.restore.mount.Mount`
in its cache. Every request goes through :meth:`RestoreService.touch`, one ``UPDATE`` that
refreshes ``last_access_at``/``expires_at`` and answers whether the mount is still ``mounted``;
a mount that is not is dropped from the cache.

The cleanup loop, every ``restore_cleanup_interval`` seconds, closes the readers this process
holds for mounts that are no longer mounted, whichever process ended them; in the processes
that run the backup services it first expires the mounts idle longer than
``restore_idle_timeout`` (status ``expired``).

Full restore jobs (:mod:`oma.restore.full`) run in the service's nursery; stopping the service
cancels them (they are marked failed) while the database is still open.

All dissect work runs in worker threads under :attr:`RestoreService.limiter`.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from oma.backups.repositories import RepositorySpec, config_of, root_of
from oma.config import OmaConfig
from oma.restore.full import (
    TARGET_IN_REPOSITORY,
    TargetType,
    accept_job,
    check_restore_root,
    check_target,
    fail_orphaned_jobs,
    job_body,
    run_full_restore,
    written_paths,
)
from oma.restore.mount import Located, LockedReader, Mount
from oma.restore.points import completed_backup, hold_completed
from oma.store.rows import new_id
from oma.workers import new_worker_id
from pyapp.api import ApiError
from pyapp.db import Database, Record
from pyapp.logs import log_context
from pyapp.mover import MoverError

if TYPE_CHECKING:
    from quart_trio import QuartTrio

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE_KEY = "oma.restore"
MOUNT_NOT_FOUND = "MOUNT_NOT_FOUND"
MOUNT_GONE = "MOUNT_GONE"
MOUNT_LIMIT_REACHED = "MOUNT_LIMIT_REACHED"
BACKUP_UNREADABLE = "BACKUP_UNREADABLE"
_CREATE_LOCK_KEY = 0x6F6D615F6D6E7431  # "oma_mnt1": serialises "count mounts, then insert"
SHUTDOWN_TIMEOUT_S = 8.0
MOUNT_COLUMNS = (
    "id, backup_id, status, filesystem_type, volumes, created_by, created_at, last_access_at, expires_at,"
    " unmounted_at"
)


def mount_body(row: Record | dict[str, Any]) -> dict[str, Any]:
    """The API's view of a ``restore_mounts`` row (the seed's fields, then ours).

    The seed's ``mount_path`` and ``nbd_device`` are left out: the point is read in the process
    through dissect, with no kernel mount and no NBD device, so there is no such path or device to
    report (docs/backup.md). ``filesystem_type`` is what dissect detected."""
    return {
        "mount_id": row["id"],
        "backup_id": row["backup_id"],
        "filesystem_type": row["filesystem_type"],
        "status": row["status"],
        "volumes": _decoded(row["volumes"]),
        "created_by": row["created_by"],
        "created_at": row["created_at"],
        "last_access_at": row["last_access_at"],
        "expires_at": row["expires_at"],
        "unmounted_at": row["unmounted_at"],
    }


def _decoded(value: Any) -> Any:
    """A ``jsonb`` column's value (asyncpg hands it over as text)."""
    return json.loads(value) if isinstance(value, str) else value


class RestoreService:
    """See the module doc. One per process, created by :func:`start_restore_service`."""

    def __init__(self, config: OmaConfig, db: Database) -> None:
        self.config = config
        self.db = db
        self.worker_id = new_worker_id()
        self.limiter = trio.CapacityLimiter(8)
        #: Directory archives produced at once (each by its own thread; see oma.restore.archive).
        self.archive_producers = trio.CapacityLimiter(4)
        self._mounts: dict[str, Mount] = {}
        self._opening: dict[str, trio.Lock] = {}
        self._stop = trio.Event()
        self.stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.cleanup_running = False
        self.last_cleanup_at: dt.datetime | None = None
        self.expired_by_this_process = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the cleanup loop and the full restore jobs until :meth:`shutdown`. Every process
        closes its readers of mounts that ended; only those running the backup services expire
        idle mounts (and say ``running`` in the cleanup status)."""
        try:
            try:
                await fail_orphaned_jobs(self.db)
            except Exception:
                log.exception("failing the restores of a stopped OMA process failed")
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._cleanup_loop, self.config.run_backups)
                task_status.started()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self.cleanup_running = False
            for mount_id in list(self._mounts):
                await self._drop(mount_id)
            self.stopped.set()

    async def shutdown(self) -> None:
        """Stop the loop and the jobs and wait for them (bounded)."""
        self._stop.set()
        with trio.move_on_after(SHUTDOWN_TIMEOUT_S):
            await self.stopped.wait()

    def start_job(self, job: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is None:
            raise ApiError(503, "SERVICE_UNAVAILABLE", "the restore service is not running")
        self._nursery.start_soon(job)

    async def start_full_restore(
        self, backup_id: str, target_type: TargetType, target: str, created_by: str
    ) -> dict[str, Any]:
        """Check the target against the restore roots (403 ``TARGET_NOT_ALLOWED``), the point and
        the target, record the job and start it; returns the job."""
        await self.run_sync(check_restore_root, target_type, target, self.config.restore_roots)
        backup = await completed_backup(self.db, backup_id, "restored")
        roots = await self.repository_roots()
        plan = await self.run_sync(check_target, target_type, target, roots)
        await self._refuse_recorded_files(plan.target_type, plan.target)
        row = await accept_job(self.db, backup_id, plan, created_by, self.worker_id)
        source, expected = str(backup["file_path"]), backup["disk_digest"]
        restore_id = str(row["id"])
        self.start_job(lambda: run_full_restore(self.db, restore_id, source, plan, expected, roots))
        return job_body(row)

    async def repository_roots(self) -> list[Path]:
        """The root of every repository, enabled or not, mounted or not: what a restore never
        writes into."""
        rows = await self.db.fetch("SELECT id, type, config FROM backup_repositories")
        return [
            root_of(RepositorySpec(r["id"], r["type"], config_of(r)), self.config.mounts_dir) for r in rows
        ]

    async def _refuse_recorded_files(self, target_type: TargetType, target: str) -> None:
        """422 ``TARGET_IN_REPOSITORY`` when the target (or its manifest), as given or resolved,
        is a file some backup point or copy recorded, wherever it lies."""
        if target_type == "nbd":
            return
        given = written_paths(target_type, target)
        candidates = [*given, *await self.run_sync(lambda: [os.path.realpath(p) for p in given])]
        hit = await self.db.fetchval(
            "SELECT p FROM (SELECT file_path AS p FROM backup_jobs"
            " UNION ALL SELECT manifest_path FROM backup_jobs"
            " UNION ALL SELECT file_path FROM backup_copies"
            " UNION ALL SELECT file_path || '.manifest' FROM backup_copies) f"
            " WHERE p = ANY($1::text[]) LIMIT 1",
            candidates,
        )
        if hit is not None:
            raise ApiError(
                422,
                TARGET_IN_REPOSITORY,
                f"{target} would overwrite {hit}, a file of a backup: a full restore never writes one",
            )

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking (dissect) work in a worker thread under the service's limiter."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.limiter)

    # -- mounts -------------------------------------------------------------------------------

    async def create_mount(self, backup_id: str, volume: str | None, created_by: str) -> dict[str, Any]:
        path = str((await completed_backup(self.db, backup_id, "mounted"))["file_path"])
        mount = await self._open(backup_id, path, [volume] if volume else None)
        volumes = [v.describe() for v in mount.volumes]
        mount_id = new_id("mount")
        try:
            async with self.db.transaction() as conn:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _CREATE_LOCK_KEY)
                await hold_completed(conn, backup_id)
                active = await conn.fetchval("SELECT count(*) FROM restore_mounts WHERE status = 'mounted'")
                if active >= self.config.max_restore_mounts:
                    raise ApiError(
                        503,
                        MOUNT_LIMIT_REACHED,
                        f"all {self.config.max_restore_mounts} restore mount slots are in use;"
                        " unmount one (DELETE /restore/{mount_id}) or wait for idle mounts to expire",
                    )
                row = await conn.fetchrow(
                    "INSERT INTO restore_mounts (id, backup_id, status, filesystem_type, volumes, created_by,"
                    " expires_at) VALUES ($1, $2, 'mounted', $3, $4::jsonb, $5,"
                    " now() + make_interval(secs => $6)) RETURNING " + MOUNT_COLUMNS,
                    mount_id,
                    backup_id,
                    mount.filesystem_type,
                    _dumps(volumes),
                    created_by,
                    self.config.restore_idle_timeout,
                )
        except BaseException:
            mount.close()
            raise
        assert row is not None
        self._mounts[mount_id] = mount
        with log_context(job_id=mount_id, action="restore_mount"):
            log.info(
                "backup mounted", extra={"backup_id": backup_id, "volumes": [v["name"] for v in volumes]}
            )
        return mount_body(row)

    async def touch(self, mount_id: str) -> Mount:
        """The open mount ``mount_id`` (opened in this process if needed), after recording the
        access. 404 ``MOUNT_NOT_FOUND``, 410 ``MOUNT_GONE`` when it was unmounted or expired."""
        row = await self.db.fetchrow(
            "UPDATE restore_mounts SET last_access_at = now(), expires_at = now() + make_interval(secs => $2)"
            " WHERE id = $1 AND status = 'mounted'"
            " RETURNING volumes, (SELECT file_path FROM backup_jobs b WHERE b.id = backup_id) AS file_path",
            mount_id,
            self.config.restore_idle_timeout,
        )
        if row is None:
            await self._drop(mount_id)
            status = await self.db.fetchval("SELECT status FROM restore_mounts WHERE id = $1", mount_id)
            if status is None:
                raise ApiError.not_found(f"restore mount {mount_id!r} not found", MOUNT_NOT_FOUND)
            raise ApiError(410, MOUNT_GONE, f"restore mount {mount_id} is {status}; mount the backup again")
        mount = self._mounts.get(mount_id)
        if mount is not None and not mount.closed:
            return mount
        lock = self._opening.setdefault(mount_id, trio.Lock())
        async with lock:
            mount = self._mounts.get(mount_id)
            if mount is None or mount.closed:
                volumes = _decoded(row["volumes"])
                mount = await self._open(mount_id, str(row["file_path"]), [v["name"] for v in volumes])
                self._mounts[mount_id] = mount
        self._opening.pop(mount_id, None)
        return mount

    async def list_files(
        self, mount_id: str, path: str, *, recursive: bool, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """:meth:`Mount.listdir` of the mount ``mount_id``, after recording the access."""
        mount = await self.touch(mount_id)
        return await self.run_sync(lambda: mount.listdir(path, recursive=recursive, limit=limit))

    async def file_info(self, mount_id: str, path: str) -> dict[str, Any]:
        """:meth:`Mount.stat` of the mount ``mount_id``, after recording the access."""
        mount = await self.touch(mount_id)
        return await self.run_sync(mount.stat, path)

    async def open_file(self, mount_id: str, path: str) -> tuple[LockedReader, dict[str, Any]]:
        """:meth:`Mount.open_file` of the mount ``mount_id``, after recording the access."""
        mount = await self.touch(mount_id)
        return await self.run_sync(mount.open_file, path)

    async def locate_directory(self, mount_id: str, path: str) -> tuple[Mount, Located]:
        """The mount ``mount_id`` and its directory at ``path``, after recording the access."""
        mount = await self.touch(mount_id)
        return mount, await self.run_sync(mount.locate_directory, path)

    async def _open(self, what: str, path: str, volumes: list[str] | None) -> Mount:
        try:
            return await self.run_sync(Mount.open, path, volumes)
        except (OSError, MoverError) as exc:
            raise ApiError(
                409, BACKUP_UNREADABLE, f"the image of {what} cannot be read ({path}): {exc}"
            ) from exc

    async def unmount(self, mount_id: str) -> dict[str, Any]:
        row = await self.db.fetchrow(
            "UPDATE restore_mounts SET status = 'unmounted', unmounted_at = now()"
            " WHERE id = $1 AND status = 'mounted' RETURNING id",
            mount_id,
        )
        await self._drop(mount_id)
        if row is None:
            status = await self.db.fetchval("SELECT status FROM restore_mounts WHERE id = $1", mount_id)
            if status is None:
                raise ApiError.not_found(f"restore mount {mount_id!r} not found", MOUNT_NOT_FOUND)
            raise ApiError(410, MOUNT_GONE, f"restore mount {mount_id} is already {status}")
        with log_context(job_id=mount_id, action="restore_unmount"):
            log.info("backup unmounted")
        return {"message": "backup unmounted successfully", "mount_id": mount_id}

    async def active_mounts(self) -> list[dict[str, Any]]:
        rows = await self.db.fetch(
            f"SELECT {MOUNT_COLUMNS} FROM restore_mounts WHERE status = 'mounted' ORDER BY created_at, id"
        )
        return [mount_body(r) for r in rows]

    async def _drop(self, mount_id: str) -> None:
        mount = self._mounts.pop(mount_id, None)
        if mount is not None:
            with trio.CancelScope(shield=True):
                await self.run_sync(mount.close)

    # -- figures ------------------------------------------------------------------------------

    async def _counts(self) -> tuple[int, int]:
        row = await self.db.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'mounted') AS active,"
            " count(*) FILTER (WHERE status = 'expired') AS expired FROM restore_mounts"
        )
        assert row is not None
        return int(row["active"]), int(row["expired"])

    async def resources(self) -> dict[str, Any]:
        active, _ = await self._counts()
        limit = self.config.max_restore_mounts
        return {
            "active_mounts": active,
            "max_mounts": limit,
            "available_slots": max(0, limit - active),
            "allocated_devices": len(self._mounts),
            "device_utilization": round(100.0 * min(active, limit) / limit, 2),
        }

    async def cleanup_status(self) -> dict[str, Any]:
        active, expired = await self._counts()
        return {
            "running": self.cleanup_running,
            "cleanup_interval": self.config.restore_cleanup_interval,
            "idle_timeout": self.config.restore_idle_timeout,
            "active_mount_count": active,
            "expired_mount_count": expired,
            "last_run_at": self.last_cleanup_at,
            "expired_by_this_process": self.expired_by_this_process,
        }

    # -- cleanup ------------------------------------------------------------------------------

    async def cleanup_once(self, *, expire: bool = True) -> list[str]:
        """Expire idle mounts (when ``expire``); close this process's readers of mounts no longer
        mounted, whoever ended them. Returns the ids expired by this call."""
        expired: list[str] = []
        if expire:
            rows = await self.db.fetch(
                "UPDATE restore_mounts SET status = 'expired', unmounted_at = now() WHERE status = 'mounted'"
                " AND last_access_at < now() - make_interval(secs => $1) RETURNING id",
                self.config.restore_idle_timeout,
            )
            expired = [str(r["id"]) for r in rows]
            self.expired_by_this_process += len(expired)
            self.last_cleanup_at = dt.datetime.now(dt.UTC)
        if self._mounts:
            still = {
                str(r["id"])
                for r in await self.db.fetch(
                    "SELECT id FROM restore_mounts WHERE id = ANY($1::text[]) AND status = 'mounted'",
                    list(self._mounts),
                )
            }
            for mount_id in set(self._mounts) - still:
                await self._drop(mount_id)
        if expired:
            with log_context(action="restore_cleanup"):
                log.info("idle restore mounts expired", extra={"mount_ids": expired})
        return expired

    async def _cleanup_loop(self, expire: bool) -> None:
        self.cleanup_running = expire
        try:
            while True:
                try:
                    await self.cleanup_once(expire=expire)
                except Exception:
                    log.exception("restore mount cleanup failed", extra={"action": "restore_cleanup"})
                await trio.sleep(self.config.restore_cleanup_interval)
        finally:
            self.cleanup_running = False


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def start_restore_service(app: QuartTrio, config: OmaConfig, db: Database) -> RestoreService:
    """Create the process's restore service, publish it to the views and start it in the
    app's nursery (call in ``while_serving``; await :meth:`RestoreService.shutdown` on the way
    out)."""
    service = RestoreService(config, db)
    app.extensions[SERVICE_KEY] = service
    app.add_background_task(service.run)
    return service
