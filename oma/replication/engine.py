"""The replication engine: what turns a ``pending`` replication job into a copy.

One engine runs in each OMA process (a background task of the app, stopped before the database
and the VMA client close). It claims pending jobs with ``SELECT … FOR UPDATE SKIP LOCKED`` (so
several OMA processes on one database never drive the same job) and, per job:

1. allocates each disk's target volume (:func:`oma.replication.volumes.allocate_volumes`): the
   volume that received the job's base (``base_change_id``) while it is still that generation on
   this node, else a new volume generation and a full pass, recorded in ``replica_volumes``
   *before* its file is made; a base's volume whose file is gone fails the job, which then says
   to run an initial replication;
2. serves each volume with ``qemu-nbd --shared=8`` on a free loopback port (the tunnel forwards
   it to the VMA) and records volume and export on the job's disks;
3. tells the VMA: ``PUT /api/v1/config`` (the seed's dynamic allocation, for a single-disk job)
   and ``POST /api/v1/replicate`` with the decrypted vCenter login (the job's credential, else the
   VM context's, else the default one), ``targets`` naming every disk's export and its
   ``base_change_id`` (null: a full pass that also zeroes what it does not list) and ``vm_ids``
   (the VM the job was made for: the VMA refuses another VM found at the path);
4. tracks the job: the VMA reports progress and the end itself (``PUT /replications/{id}``, change
   IDs through ``POST /replications/{id}/changeid``); the engine also polls the VMA's
   ``/status/{job_id}``, so a VMA that lost the job (restart), stays silent past
   ``vma_lost_timeout`` or finished without being able to report still ends the job;
5. at the end — success, failure, operator cancellation, OMA shutdown — stops the VMA's job if it
   still runs (``POST /cleanup`` ``cleanup_all``: the copy stops, the snapshot goes), closes the
   exports, stores the VMA's per-disk figures, and marks the job ``failed`` when nobody else ended
   it. A failed job never records a change ID (the API refuses it), so the next pass starts from
   the last complete one and repairs whatever the failed pass left half-written.

Every status change is one transaction with the row locked (``FOR UPDATE``, after its VM
context: :func:`oma.replication.jobs.lock_job`); a terminal state releases the job's disks in the
same transaction. A job that ends other than ``completed`` marks the volume generations it made
and did not complete ``failed`` (with the reason; the file stays where the row says).

A volume lives on one node (:func:`oma.replication.volumes.node_id`); the engine claims only jobs
whose disks' volumes are on its node or do not exist yet.

When the app hands the engine the cloud's volumes (:class:`~oma.replication.volumes.CloudVolumes`,
CloudStack's) and CloudStack is configured, step 1 records cloud volume generations; each new one
is created with the disk's size and every target is attached to the OMA VM (kept attached between
passes) and its device exported instead of a file. A job that ends other than ``completed``
deletes the cloud volumes it created (:func:`~oma.replication.volumes.undo_unfinished`); so does
the take-over of a dead worker's job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from oma.config import OmaConfig
from oma.replication.events import JobChange, JobEvents
from oma.replication.jobs import TERMINAL, JobError, finish_job
from oma.replication.volumes import (
    CLOUDSTACK,
    CloudVolumes,
    DiskTarget,
    Writer,
    allocate_volumes,
    make_cloud_volume,
    mark_unfinished,
    node_id,
    prepare_volume,
    safe_name,
    start_export,
    undo_unfinished,
)
from oma.vcenter_login import ResolveLogin
from oma.vma_client import VmaClient, VmaError, VmaJobNotFound
from oma.workers import FINISH_TIMEOUT, VmaJobEngine, claimant_gone
from pyapp import metrics
from pyapp.api import ApiError
from pyapp.db import Database
from pyapp.logs import log_context
from pyapp.nbd_export import reap_orphaned_exports

log = logging.getLogger(__name__)

#: How long the VMA's own final report may lag behind its ``/status`` before the engine ends the job.
REPORT_GRACE = 5.0


@dataclass
class RunningJob:
    job_id: str
    vm_path: str
    targets: list[DiskTarget] = field(default_factory=list)
    started_on_vma: bool = False
    #: Bytes the VMA sent as data in this pass (its per-disk figures), once known.
    data_bytes: int | None = None
    started: float = field(default_factory=time.monotonic)


class ReplicationEngine(VmaJobEngine):
    kind = "replication engine"
    action = "replication_engine"
    lease_table = "replication_jobs"
    active_statuses = ("pending", "replicating")

    def __init__(
        self,
        config: OmaConfig,
        db: Database,
        vma: VmaClient,
        resolve_login: ResolveLogin,
        events: JobEvents,
        cloud: CloudVolumes | None = None,
    ) -> None:
        super().__init__(config, db, vma, resolve_login, max_active=config.max_active_jobs)
        #: Where the jobs this engine ends are published.
        self.events = events
        #: The cloud's volumes (CloudStack's), when the app wires them: replica volumes there
        #: whenever the cloud is configured.
        self.cloud = cloud
        #: Jobs this process drives now, by id (their volumes and exports).
        self.jobs: dict[str, RunningJob] = {}
        self._node_id: str | None = None

    async def node_id(self) -> str:
        """The node this engine's volumes are on (:func:`node_id`)."""
        if self._node_id is None:
            self._node_id = await trio.to_thread.run_sync(node_id, self.config.volumes_dir)
        return self._node_id

    def job_changed(self, change: JobChange) -> None:
        """A listener of the app's :class:`~oma.replication.events.JobEvents`: a job created by
        this process is claimed at once instead of at the next poll."""
        if change.old is None:
            self.wake()

    def active_count(self) -> int:
        return len(self.jobs)

    def start(self, nursery: trio.Nursery, row: Any) -> None:
        job = RunningJob(row["id"], row["vm_path"])
        self.jobs[job.job_id] = job
        metrics.ACTIVE_JOBS.labels("replication").inc()
        nursery.start_soon(self._drive, job, dict(row))

    def driven_ids(self) -> list[str]:
        return list(self.jobs)

    async def recover_orphans(self) -> None:
        """What a dead OMA process left: first the ``qemu-nbd`` exports recorded in this data
        directory whose process is gone, then its jobs (lease expired, or claimed on this host by a
        process that is gone: :meth:`~oma.workers.ClaimWorker.take_over_expired`)."""
        stopped = await trio.to_thread.run_sync(reap_orphaned_exports, self.config.export_records_dir)
        if stopped:
            log.warning("exports of a stopped OMA process closed", extra={"volumes": stopped})
        await self.take_over_expired()

    async def take_over(self, row: Any) -> None:
        """A job whose worker stopped renewing its lease: the VMA is asked to stop it (its
        snapshot goes), exports of a dead process on this host are closed, and the job fails with
        the reason; the next pass starts from the last complete one."""
        try:
            await self.vma.cleanup(row["id"], "cleanup_all", wait_s=FINISH_TIMEOUT)
        except VmaError as e:
            log.info("the VMA did not stop the orphaned job: %s", e.message)
        gone = claimant_gone(row["previous"])
        if gone:
            await trio.to_thread.run_sync(reap_orphaned_exports, self.config.export_records_dir)
        reason = "its process is gone" if gone else "its lease expired"
        error = f"the OMA worker driving the job ({row['previous']}) stopped: {reason}"
        if await finish_job(self.db, self.events, row["id"], "failed", error):
            log.warning("job of a stopped OMA worker failed", extra={"claimed_by": row["previous"]})
        await undo_unfinished(self.db, self.cloud, row["id"], error)

    async def claim(self, limit: int) -> list[Any]:
        # A job never runs where its volume is not: only jobs whose disks' volumes are on this node
        # (or unknown, pre-006; or not made yet).
        return await self.db.fetch(
            "UPDATE replication_jobs j SET claimed_by = $1, claimed_at = now(),"
            " current_operation = 'Preparing target volumes', updated_at = now()"
            " WHERE j.id IN (SELECT r.id FROM replication_jobs r WHERE r.status = 'pending'"
            " AND r.claimed_by IS NULL"
            "  AND NOT EXISTS (SELECT 1 FROM replication_job_disks d JOIN replica_volumes v"
            "   ON v.vcenter_host = d.vcenter_host AND v.vm_id = d.vm_id AND v.disk_id = d.disk_id"
            "   WHERE d.job_id = r.id AND v.node_id <> $3)"
            "  ORDER BY r.created_at FOR UPDATE OF r SKIP LOCKED LIMIT"
            " $2)"
            " RETURNING j.id, j.vm_id, j.vm_name, j.vm_path, j.replication_type,"
            " j.vm_context_id, j.credential_id",
            self.engine_id,
            limit,
            await self.node_id(),
        )

    # -- one job -----------------------------------------------------------------------------------

    async def _drive(self, job: RunningJob, row: dict[str, Any]) -> None:
        with log_context(job_id=job.job_id, action="replication_engine"):
            error: str | None = None
            shutdown = False
            try:
                await self._start(job, row)
                final = await self._track(job)
                log.info("replication job ended: %s", final)
            except JobError as e:
                error = str(e)
            except VmaError as e:
                error = e.message
            except ApiError as e:
                error = e.message
            except trio.Cancelled:
                shutdown = True
                error = "the OMA shut down during the job"
                raise
            except Exception as e:
                log.exception("replication engine failure")
                error = f"{type(e).__name__}: {e}"
            finally:
                with trio.CancelScope(shield=True):  # each step of _finish bounds itself
                    await self._finish(job, error, shutdown=shutdown)
                    await self._count(job)
                self.jobs.pop(job.job_id, None)
                metrics.ACTIVE_JOBS.labels("replication").dec()
                self.wake()

    async def _note(self, job_id: str, operation: str) -> None:
        await self.db.execute(
            "UPDATE replication_jobs SET current_operation = $2, updated_at = now()"
            " WHERE id = $1 AND status IN ('pending', 'replicating')",
            job_id,
            operation,
        )

    async def _start(self, job: RunningJob, row: dict[str, Any]) -> None:
        disks = await self.db.fetch(
            "SELECT disk_id, capacity_bytes, base_change_id, volume_id, volume_generation,"
            " vcenter_host, vm_id"
            " FROM replication_job_disks WHERE job_id = $1 ORDER BY disk_id",
            job.job_id,
        )
        unknown = [d["disk_id"] for d in disks if not d["capacity_bytes"]]
        if unknown:
            raise JobError(f"capacity of disks {unknown} is unknown: the target volume cannot be sized")
        credential_id = row["credential_id"] or await self.db.fetchval(
            "SELECT credential_id FROM vm_contexts WHERE context_id = $1", row["vm_context_id"]
        )
        login = await self.resolve_login(credential_id)
        writer = Writer(job.job_id, row["vm_name"], job.vm_path, await self.node_id())
        targets = await allocate_volumes(self.db, self.config, writer, [dict(d) for d in disks], self.cloud)
        if targets is None:
            return  # cancelled while pending
        job.targets.extend(targets)
        if any(t.backend == CLOUDSTACK for t in targets):
            await self._note(job.job_id, "Preparing CloudStack volumes")
        for target in job.targets:
            if target.backend == CLOUDSTACK:
                if self.cloud is None:
                    raise JobError(
                        f"the volume of {target.disk_id} is a CloudStack volume: CloudStack is not wired"
                    )
                await make_cloud_volume(self.db, self.cloud, job.job_id, target)
            else:
                await trio.to_thread.run_sync(
                    partial(prepare_volume, target.volume, target.capacity, fresh=target.fresh)
                )
            target.export = await trio.to_thread.run_sync(
                start_export,
                target,
                safe_name(target.disk_id),
                self.config.export_records_dir,
                self.config.nbd_ports,
            )
            port = target.export.port
            target.uri = f"nbd://{self.config.nbd_host}:{port}/{target.export.name}"
        with trio.CancelScope(shield=True):  # one atomic statement, not cut in the middle
            await self.db.executemany(
                "UPDATE replication_job_disks SET nbd_uri = $3 WHERE job_id = $1 AND disk_id = $2",
                [(job.job_id, t.disk_id, t.uri) for t in job.targets],
            )
        log.info(
            "target volumes exported",
            extra={
                "volumes": {t.disk_id: f"{t.volume} (generation {t.generation})" for t in job.targets},
                "fresh": [t.disk_id for t in job.targets if t.fresh],
            },
        )
        status = await self.db.fetchval("SELECT status FROM replication_jobs WHERE id = $1", job.job_id)
        if status in TERMINAL:  # cancelled while the volumes were prepared
            return
        if len(job.targets) == 1 and job.targets[0].export is not None:
            only = job.targets[0]
            assert only.export is not None and only.export.port is not None
            await self.vma.put_config(
                nbd_port=only.export.port, export_name=only.export.name, target_device=str(only.volume)
            )
        await self._note(job.job_id, "Starting the copy on the VMA")
        vm_id = row["vm_id"] or ""
        await self.vma.replicate(
            job_id=job.job_id,
            vcenter=login.vcenter,
            username=login.username,
            password=login.password,
            tls_mode=login.tls_mode,
            tls_thumbprint=login.tls_thumbprint,
            vm_paths=[job.vm_path],
            targets={job.vm_path: {t.disk_id: t.uri for t in job.targets}},
            bases={job.vm_path: {t.disk_id: t.base for t in job.targets}},
            vm_ids={} if not vm_id or vm_id.startswith("path:") else {job.vm_path: vm_id},
        )
        job.started_on_vma = True
        log.info(
            "replication started on the VMA",
            extra={
                "targets": {t.disk_id: t.uri for t in job.targets},
                "bases": {t.disk_id: t.base for t in job.targets},
            },
        )

    async def _status(self, job_id: str) -> str | None:
        status: str | None = await self.db.fetchval(
            "SELECT status FROM replication_jobs WHERE id = $1", job_id
        )
        return status

    async def _track(self, job: RunningJob) -> str:
        """Wait for the job's terminal state; returns it. Raises :class:`JobError` when the VMA lost
        the job or stayed silent too long."""
        interval = min(0.5, self.config.engine_poll_interval)
        lost_since: float | None = None
        vma_ended_at: float | None = None
        last_vma_poll = 0.0
        while True:
            status = await self._status(job.job_id)
            if status is None or status in TERMINAL:
                return status or "deleted"
            if not job.started_on_vma:
                return status
            now = time.monotonic()
            if now - last_vma_poll >= self.config.engine_poll_interval:
                last_vma_poll = now
                try:
                    answer = await self.vma.status(job.job_id)
                except VmaJobNotFound as e:
                    raise JobError("the VMA no longer knows the job (was it restarted?)") from e
                except VmaError as e:
                    lost_since = lost_since or now
                    if now - lost_since > self.config.vma_lost_timeout:
                        raise JobError(
                            f"no answer from the VMA for {now - lost_since:.0f} s: {e.message}"
                        ) from e
                else:
                    lost_since = None
                    if answer.get("status") in ("completed", "failed"):
                        vma_ended_at = vma_ended_at or now
                        if now - vma_ended_at > REPORT_GRACE:
                            # The VMA ended but its own report did not arrive: end the job from its answer.
                            if answer["status"] == "completed":
                                await finish_job(self.db, self.events, job.job_id, "completed", None)
                                return "completed"
                            raise JobError(f"the VMA reports: {answer.get('error') or 'failed'}")
            await trio.sleep(interval)

    async def _finish(self, job: RunningJob, error: str | None, *, shutdown: bool) -> None:
        """Stop the VMA's copy if it still runs, close the exports, keep the figures, end the job.

        Runs shielded: the VMA and database steps have their own deadlines; closing the exports has
        none here (``NbdExport.stop`` waits 10 s at most, then kills), so no ``qemu-nbd`` outlives
        its job."""
        with trio.move_on_after(FINISH_TIMEOUT):
            try:
                status = await self._status(job.job_id)
                if job.started_on_vma and (status not in TERMINAL or status == "cancelled" or error):
                    try:
                        answer = await self.vma.status(job.job_id)
                        running = answer.get("status") not in ("completed", "failed")
                    except VmaError:
                        running = not shutdown
                    if running or status == "cancelled":
                        await self._stop_on_vma(job.job_id)
            except Exception:
                log.exception("stopping the job on the VMA failed")
        for target in job.targets:
            if target.export is not None:
                export, target.export = target.export, None
                await trio.to_thread.run_sync(export.stop)
        if job.targets:
            log.info("target exports closed")
        with trio.move_on_after(FINISH_TIMEOUT):
            try:
                if job.started_on_vma:
                    await self._store_figures(job.job_id)
                if error is not None and await finish_job(self.db, self.events, job.job_id, "failed", error):
                    log.error("replication job failed: %s", error)
                await self._mark_unfinished_volumes(job, error)
            except Exception:
                log.exception("recording the end of the job failed")

    async def _count(self, job: RunningJob) -> None:
        """The job's end in the metrics: its status, and for a completed pass its bytes and time."""
        with trio.move_on_after(FINISH_TIMEOUT):
            try:
                status = await self._status(job.job_id) or "deleted"
            except Exception:
                log.exception("reading the job's end for the metrics failed")
                return
            metrics.job_ended("replication", status)
            if status == "completed":
                metrics.pass_completed("replication", job.data_bytes or 0, time.monotonic() - job.started)

    async def _mark_unfinished_volumes(self, job: RunningJob, error: str | None) -> None:
        """The volume generations this job made and did not complete are marked ``failed``, with
        the reason (:func:`~oma.replication.volumes.mark_unfinished`); its cloud volumes are
        deleted first (:func:`~oma.replication.volumes.undo_unfinished`)."""
        if not any(t.fresh for t in job.targets):
            return
        status = await self._status(job.job_id)
        reason = (
            error or f"the replication job {job.job_id} ended {status or 'deleted'} before its pass completed"
        )
        if any(t.fresh and t.backend == CLOUDSTACK for t in job.targets):
            await undo_unfinished(self.db, self.cloud, job.job_id, reason)
        await mark_unfinished(self.db, job.job_id, job.targets, reason)

    async def _stop_on_vma(self, job_id: str) -> None:
        try:
            answer = await self.vma.cleanup(job_id, "cleanup_all", wait_s=FINISH_TIMEOUT)
        except VmaError as e:
            log.warning("the VMA could not stop the job: %s", e.message)
            return
        log.info("job stopped on the VMA", extra={"snapshots_removed": answer.get("snapshots_removed")})

    async def _store_figures(self, job_id: str) -> None:
        """The VMA's per-disk figures of the pass (mode, bytes sent as data, bytes zeroed)."""
        try:
            progress = await self.vma.progress(job_id)
        except VmaError as e:
            log.warning("no per-disk figures from the VMA: %s", e.message)
            return
        rows = [
            (job_id, d["disk_id"], d.get("mode") or None, d.get("bytes_written"), d.get("bytes_zeroed"))
            for d in progress.get("disks") or []
            if isinstance(d, dict) and d.get("disk_id")
        ]
        job = self.jobs.get(job_id)
        if job is not None:
            job.data_bytes = sum(r[3] or 0 for r in rows if isinstance(r[3], int))
        if rows:
            await self.db.executemany(
                "UPDATE replication_job_disks SET copy_mode = $3, bytes_written = $4, bytes_zeroed = $5"
                " WHERE job_id = $1 AND disk_id = $2",
                rows,
            )
