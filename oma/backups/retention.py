"""Retention: every ``OMA_RETENTION_INTERVAL`` s, the points of each enabled policy that are
older than its ``retention_days`` leave their chains.

This module decides *what* is looked at and *when*; how points leave is
:func:`oma.backups.chains.apply_retention`'s business (merge the expired points into the oldest
kept one in the primary and in every copy repository, crash-safe; an older chain that has wholly
expired goes; the newest point of a disk always stays; immutability locks, open mounts, restores
and copies in progress postpone a chain to a later run).

One run: for each enabled policy, its stored points (``completed``, and ``deleting`` ones a crash
left half-removed, which the run finishes) are grouped by VM disk and repository
(``vm_key, disk_id, repository_id``: the VM's identity, never its name), oldest first, and each
group goes to ``apply_retention`` with one ``now`` for the whole run. A failure in one group is
recorded and the run goes on.

Each run first brings the files' immutability locks in line (:func:`oma.backups.immutability.sweep`
over every stored point and copy of every enabled repository): locks whose own record has ended
are released (the immutable attribute cleared: their points may now leave), points the
database locks but that have no lock record yet are locked. The record beside the files, not
the database, decides when a lock ends.

Only one OMA process runs retention at a time (a PostgreSQL advisory lock held for the run); a
process that finds it taken skips its turn. Each run's figures — when, chains examined, points
removed, new fulls, chains postponed and failed with their reasons — are logged and recorded in
``retention_runs``, so ``GET /api/v1/policies/retention-status`` shows the last run to every
OMA process, whichever made it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import trio

from oma.backups import immutability
from oma.backups.chains import apply_retention, locked_until
from oma.backups.repositories import ensure_ready
from oma.config import OmaConfig
from oma.crypto import SecretBox
from oma.workers import new_worker_id
from pyapp.api import ApiError
from pyapp.db import Database

log = logging.getLogger(__name__)

#: Where the running service is kept in ``app.extensions``.
RETENTION_KEY = "oma.retention"
#: Advisory lock (class, key) held by the process running retention.
_RUN_LOCK = (0x0BAE, 1)


@dataclass
class RetentionRun:
    """What one retention run looked at and did."""

    started_at: dt.datetime
    now: dt.datetime
    finished_at: dt.datetime | None = None
    skipped: str | None = None
    policies: int = 0
    disks: int = 0
    chains_examined: int = 0
    points_removed: list[str] = field(default_factory=list)
    new_fulls: list[str] = field(default_factory=list)
    postponed: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    locks_set: list[str] = field(default_factory=list)
    locks_released: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The run as JSON-ready data (counts beside the lists, times in ISO 8601)."""
        body = {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in asdict(self).items()}
        body["points_removed_count"] = len(self.points_removed)
        body["postponed_count"] = len(self.postponed)
        body["failed_count"] = len(self.failed)
        return body


class RetentionService:
    """Runs retention at start and then every ``interval`` seconds; :meth:`run_once` is one run."""

    def __init__(
        self, config: OmaConfig, db: Database, box: SecretBox, *, interval: float | None = None
    ) -> None:
        self.config = config
        self.db = db
        self.box = box
        self.interval = config.retention_interval if interval is None else interval
        self.worker_id = new_worker_id()
        self.last_run: RetentionRun | None = None
        self.next_run_at: dt.datetime | None = None
        self.running = False
        self.stopped = trio.Event()
        self._stop = trio.Event()
        self._lock = trio.Lock()  # the loop and a direct caller of run_once never overlap

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.running = True
        task_status.started()
        log.info("retention service started", extra={"action": "retention", "interval_s": self.interval})
        try:
            while not self._stop.is_set():
                try:
                    await self.run_once()
                except Exception:
                    log.exception("retention run failed", extra={"action": "retention"})
                self.next_run_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.interval)
                with trio.move_on_after(self.interval):
                    await self._stop.wait()
        finally:
            self.running = False
            self.next_run_at = None
            self.stopped.set()
            log.info("retention service stopped", extra={"action": "retention"})

    async def run_once(self, now: dt.datetime | None = None) -> RetentionRun:
        """One retention run over every enabled policy, as of ``now`` (default: the present)."""
        async with self._lock:
            started = dt.datetime.now(dt.UTC)
            run = RetentionRun(started_at=started, now=now or started)
            async with self.db.connection() as conn:
                got = await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", *_RUN_LOCK)
                try:
                    if got:
                        await self._run(run)
                    else:
                        run.skipped = "another OMA process is running retention"
                finally:
                    if got:
                        with trio.CancelScope(shield=True):
                            await conn.execute("SELECT pg_advisory_unlock($1, $2)", *_RUN_LOCK)
            run.finished_at = dt.datetime.now(dt.UTC)
            self.last_run = run
            if run.skipped is None:
                with trio.CancelScope(shield=True):
                    await self._record(run)
            log.info(
                "retention run finished",
                extra={
                    "action": "retention",
                    "skipped": run.skipped,
                    "policies": run.policies,
                    "chains_examined": run.chains_examined,
                    "points_removed": len(run.points_removed),
                    "new_fulls": len(run.new_fulls),
                    "postponed": run.postponed,
                    "failed": run.failed,
                },
            )
            return run

    async def _run(self, run: RetentionRun) -> None:
        await self._sweep_locks(run)
        policies = await self.db.fetch(
            "SELECT id, retention_days FROM backup_policies WHERE enabled ORDER BY name"
        )
        for policy in policies:
            run.policies += 1
            points = await self.db.fetch(
                "SELECT id, vm_name, vm_key, disk_id, repository_id FROM backup_jobs"
                " WHERE policy_id = $1 AND status IN ('completed', 'deleting')"
                " ORDER BY vm_key, disk_id, repository_id, created_at, id",
                policy["id"],
            )
            for key, group in groupby(points, key=lambda p: (p["vm_key"], p["disk_id"], p["repository_id"])):
                run.disks += 1
                await self._apply(run, policy["id"], policy["retention_days"], key, [p["id"] for p in group])

    async def _sweep_locks(self, run: RetentionRun) -> None:
        """Release ended file locks and set missing ones, repository by repository (each made
        ready first; one that cannot be is skipped this run and recorded)."""
        rows = await self.db.fetch(
            "SELECT b.id AS backup_id, b.file_path, b.created_at, b.repository_id, r.immutable,"
            " r.immutable_days FROM backup_jobs b JOIN backup_repositories r ON r.id = b.repository_id"
            " WHERE r.enabled AND b.status = 'completed' AND b.file_path IS NOT NULL"
            " UNION ALL SELECT c.backup_id, c.file_path, c.created_at, c.repository_id, r.immutable,"
            " r.immutable_days FROM backup_copies c JOIN backup_repositories r ON r.id = c.repository_id"
            " WHERE r.enabled AND c.status = 'completed' AND c.file_path IS NOT NULL"
            " ORDER BY repository_id"
        )
        for repository_id, group in groupby(rows, key=lambda r: r["repository_id"]):
            points = [
                immutability.StoredPoint(
                    Path(r["file_path"]),
                    r["backup_id"],
                    r["created_at"],
                    locked_until(r["immutable"], r["immutable_days"], r["created_at"]),
                )
                for r in group
            ]
            try:
                await ensure_ready(self.db, self.box, self.config.mounts_dir, repository_id)
            except ApiError as e:
                run.failed.append(
                    {"repository_id": repository_id, "error": f"locks not checked: {e.message}"}
                )
                continue
            result = await trio.to_thread.run_sync(immutability.sweep, points, run.now)
            run.locks_set.extend(result.locked)
            run.locks_released.extend(result.released)
            run.failed.extend({"repository_id": repository_id, **f} for f in result.failed)

    async def _apply(
        self,
        run: RetentionRun,
        policy_id: str,
        retention_days: int,
        key: tuple[str, str, str],
        ids: list[str],
    ) -> None:
        key_of_vm, disk_id, repository_id = key
        where = {
            "policy_id": policy_id,
            "vm_key": key_of_vm,
            "disk_id": disk_id,
            "repository_id": repository_id,
        }
        try:
            result = await apply_retention(
                self.db, self.box, self.config.mounts_dir, ids, retention_days, run.now
            )
        except Exception as e:  # one disk's trouble must not stop the others' retention
            log.exception("retention of %s %s in %s failed", key_of_vm, disk_id, repository_id)
            run.failed.append({**where, "error": f"{type(e).__name__}: {e}"})
            return
        run.chains_examined += result.chains
        run.points_removed.extend(result.removed)
        run.new_fulls.extend(result.new_fulls)
        run.postponed.extend({**where, **p} for p in result.postponed)
        run.failed.extend({**where, **f} for f in result.failed)
        for p in result.postponed:
            log.info("retention postponed: %s", p.get("reason"), extra={"action": "retention", **where})

    async def _record(self, run: RetentionRun) -> None:
        try:
            await self.db.execute(
                "WITH pruned AS (DELETE FROM retention_runs WHERE finished_at < now() - interval '30 days')"
                " INSERT INTO retention_runs (ran_by, finished_at, summary) VALUES ($1, $2, $3::jsonb)",
                self.worker_id,
                run.finished_at,
                json.dumps(run.summary()),
            )
        except Exception:
            log.exception("recording the retention run failed", extra={"action": "retention"})


async def retention_status(db: Database, service: RetentionService | None) -> dict[str, Any]:
    """``GET /policies/retention-status``: this process's service (running, interval, next run)
    and the last run any OMA process recorded."""
    row = await db.fetchrow(
        "SELECT ran_by, summary FROM retention_runs ORDER BY finished_at DESC, id DESC LIMIT 1"
    )
    last: dict[str, Any] | None = None
    if row is not None:
        summary = row["summary"]
        last = {**(json.loads(summary) if isinstance(summary, str) else summary), "ran_by": row["ran_by"]}
    return {
        "running": service.running if service else False,
        "interval_seconds": service.interval if service else None,
        "last_run_at": last["finished_at"] if last else None,
        "next_run_at": service.next_run_at if service else None,
        "last_run": last,
    }
