"""The replication workflow: one job, its VMs concurrently, each VM's disks concurrently, under
one bound for the whole VMA (``max_parallel_disks``).

Per VM::

    find the VM (and check it is the one the job was made for: ``vm_ids``) -> resolve each disk's
    NBD target -> CBT on (VM, each disk's ctkEnabled, stun) -> snapshot "vma-<job_id>"
    -> per disk: the base change ID (the request's ``base_change_id`` for that target when given,
       null meaning a full pass; else, as in the seed, the OMA's ``GET /replications/changeid``),
       QueryChangedDiskAreas over the whole disk (``*`` on a full pass), nbdkit source on the
       snapshot, mover copy of those extents into the target (the mover flushes the target
       before it returns)
    -> every disk copied: store each disk's new change ID (read from the snapshot's disk backing)
    -> remove the snapshot (also on every failure path, shielded from cancellation)

A change ID is stored only after all disks of its VM are copied and flushed, so a failed job
never advances the base of the next incremental pass; a target that cannot flush (the mover's
``durable`` false) fails the pass unless ``allow_non_durable_targets`` is set. A stored change ID
from another CBT epoch (CBT was reset) makes a full pass: the whole disk's allocated areas, with
zeros written for the rest, because the target already holds older data. The snapshot and plan
steps are shared with the export jobs (:mod:`vma.replication.workflow`).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from pyapp import mover
from pyapp.logs import log_context
from vma.config import VmaConfig
from vma.oma_client.client import OmaClient, OmaError
from vma.replication.jobs import DiskProgress, Job
from vma.replication.source import SourceError, SourceSpec, prepare_source, serve_source, socket_path
from vma.replication.workflow import (
    SNAPSHOT_REMOVE_TIMEOUT,
    JobFailed,
    find_vm_disks,
    only_cancelled,
    plan_pass,
    record_failure,
    remove_password_file,
    remove_snapshot,
    snapshot_with_cbt,
    tracked_snapshot_disks,
)
from vma.vsphere.client import DiskInfo, SnapshotRef, VSphere, run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A disk's target: its NBD URI and, when the request gave one, the change ID the target
    holds (``base_given``; ``base`` None: the target holds no complete pass, copy everything)."""

    uri: str
    base_given: bool = False
    base: str | None = None


#: vm_path -> disk (``disk-2000``, ``2000`` or the disk's index ``0``) -> its target.
Targets = Mapping[str, Mapping[str, Target]]


@dataclass
class Plan:
    disk: DiskInfo
    target: Target
    mode: str = ""
    extents: list[tuple[int, int]] | None = None
    copied: bool = False


def resolve_targets(
    vm_path: str, disks: list[DiskInfo], targets: Targets, config: VmaConfig
) -> dict[int, Target]:
    """Each disk's target: from the request's ``targets``, else for a VM with a single disk the
    export that ``PUT /api/v1/config`` set (``nbd_host``/``nbd_port``/``export_name``)."""
    per_vm = targets.get(vm_path)
    out: dict[int, Target] = {}
    if per_vm:
        for i, d in enumerate(disks):
            target = per_vm.get(d.disk_id) or per_vm.get(str(d.key)) or per_vm.get(str(i))
            if not target:
                raise JobFailed(f"no target for {vm_path} {d.disk_id} in the request's targets")
            out[d.key] = target
        return out
    if len(disks) == 1 and config.nbd_port and config.export_name:
        return {disks[0].key: Target(f"nbd://{config.nbd_host}:{config.nbd_port}/{config.export_name}")}
    raise JobFailed(
        f"no target for {vm_path}: give targets[vm_path][disk_id] in the request"
        " (or, for a single-disk VM, nbd_port and export_name through PUT /api/v1/config)"
    )


class Replicator:
    def __init__(self, config: VmaConfig, oma_for: Callable[[str], OmaClient]) -> None:
        self.config = config
        self.oma_for = oma_for
        self.disk_limiter = trio.CapacityLimiter(max(1, config.max_parallel_disks))
        self._socket_dir: Path | None = None
        self._own_socket_dir = False

    async def socket_dir(self) -> Path:
        """The directory of the sources' sockets (made on first use, private)."""
        if self._socket_dir is None:
            if self.config.socket_dir is not None:
                await trio.Path(self.config.socket_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
                self._socket_dir = self.config.socket_dir
            else:
                made = await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="vma-"))
                self._socket_dir, self._own_socket_dir = Path(made), True
        return self._socket_dir

    def close(self) -> None:
        """Remove the temporary socket directory (at shutdown, when no source runs)."""
        if self._own_socket_dir and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    async def run_job(self, job: Job, targets: Targets, vm_ids: Mapping[str, str] | None = None) -> None:
        """Run ``job`` to its end (completed or failed); never raises but for the app's shutdown.
        ``vm_ids``: vm_path -> the managed object id the job was made for."""
        with log_context(job_id=job.job_id, action="replicate"):
            oma = self.oma_for(job.oma_url)
            job.status, job.phase, job.started_at = "running", "starting", dt.datetime.now(dt.UTC)
            job.current_operation = "Starting replication"
            log.info("replication started", extra={"vm_paths": job.vm_paths})
            try:
                with trio.CancelScope() as scope:
                    job.cancel_scope = scope
                    if job.cancel_reason is not None:
                        scope.cancel()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._report_loop, job, oma)
                        await oma.update_replication(
                            job.job_id, status="replicating", current_operation="Starting replication"
                        )
                        await self._run_vms(job, targets, vm_ids or {}, oma)
                        nursery.cancel_scope.cancel()
                if scope.cancelled_caught:
                    raise JobFailed(job.cancel_reason or "cancelled")
            except BaseException as exc:
                error = record_failure(job, exc)
                log.error("replication failed: %s", error)
                with trio.CancelScope(shield=True), trio.move_on_after(self.config.final_report_timeout):
                    await self._tell_oma(
                        oma,
                        job,
                        status="failed",
                        error_message=error[:4000],
                        current_operation="Replication failed",
                    )
                job.cancel_scope = None
                remove_password_file(self.config, job)
                job.done.set()
                if only_cancelled(exc) or not isinstance(exc, Exception):
                    raise  # the app is shutting down (or the process is interrupted): let it
                return
            job.status, job.phase, job.current_operation = "completed", "completed", "Replication completed"
            job.finished_at = dt.datetime.now(dt.UTC)
            job.cancel_scope = None
            log.info("replication completed", extra={"bytes": job.bytes_done()})
            await self._tell_oma(
                oma,
                job,
                status="completed",
                progress_percent=100.0,
                bytes_transferred=job.bytes_done(),
                total_bytes=job.bytes_total(),
                current_operation="Replication completed",
            )
            remove_password_file(self.config, job)
            job.done.set()

    async def _tell_oma(self, oma: OmaClient, job: Job, **fields: Any) -> None:
        try:
            await oma.update_replication(job.job_id, **fields)
        except OmaError as e:
            log.warning("OMA replication update failed: %s", e, extra={"action": "oma_update"})

    async def _report_loop(self, job: Job, oma: OmaClient) -> None:
        while True:
            await trio.sleep(self.config.progress_report_interval)
            await self._tell_oma(
                oma,
                job,
                progress_percent=job.percent(),
                bytes_transferred=job.bytes_done(),
                total_bytes=job.bytes_total(),
                current_operation=job.current_operation[:4000],
            )

    async def _run_vms(self, job: Job, targets: Targets, vm_ids: Mapping[str, str], oma: OmaClient) -> None:
        job.phase, job.current_operation = "connecting", f"Connecting to vCenter {job.login.host}"
        vs = await run(VSphere.connect, job.login, insecure=self.config.vcenter_insecure)
        try:
            async with trio.open_nursery() as nursery:
                for vm_path in job.vm_paths:
                    nursery.start_soon(
                        self._replicate_vm, job, vs, vm_path, targets, vm_ids.get(vm_path), oma
                    )
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                await run(vs.disconnect)

    async def _replicate_vm(
        self, job: Job, vs: VSphere, vm_path: str, targets: Targets, vm_id: str | None, oma: OmaClient
    ) -> None:
        vm, live = await find_vm_disks(vs, vm_path)
        if vm_id is not None and vm._moId != vm_id:
            # Another VM took the path (renamed, moved, re-created): its disks must not go into
            # the volumes of the VM the job was made for.
            raise JobFailed(f"{vm_path} is VM {vm._moId}, not {vm_id}, the VM this job replicates")
        disk_targets = resolve_targets(vm_path, live, targets, self.config)
        for d in live:
            job.disks[(vm_path, d.disk_id)] = DiskProgress(vm_path, d.disk_id, d.capacity)

        snap = await snapshot_with_cbt(job, vs, vm, vm_path, "replication")
        try:
            snap_disks = await tracked_snapshot_disks(vs, snap, vm_path, disk_targets)
            plans = [Plan(d, disk_targets[d.key]) for d in snap_disks]
            async with trio.open_nursery() as nursery:
                for plan in plans:
                    nursery.start_soon(self._copy_disk, job, vs, snap, vm_path, plan, oma)
            # Every disk of the VM is copied and flushed: only now do the new change IDs become bases.
            job.phase, job.current_operation = "storing_change_ids", f"Storing change IDs of {vm_path}"
            for plan in plans:
                assert plan.copied and plan.disk.change_id is not None
                await oma.store_change_id(job.job_id, vm_path, plan.disk.disk_id, plan.disk.change_id)
                job.disks[(vm_path, plan.disk.disk_id)].change_id = plan.disk.change_id
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(SNAPSHOT_REMOVE_TIMEOUT):
                await remove_snapshot(job, vs, snap)

    async def _copy_disk(
        self, job: Job, vs: VSphere, snap: SnapshotRef, vm_path: str, plan: Plan, oma: OmaClient
    ) -> None:
        disk = plan.disk
        progress = job.disks[(vm_path, disk.disk_id)]
        with log_context(action="copy_disk"):
            async with self.disk_limiter:
                progress.phase = "querying"
                if plan.target.base_given:  # the OMA said what its target volume holds
                    previous = plan.target.base
                else:
                    previous = await oma.previous_change_id(vm_path, disk.disk_id)
                planned = await plan_pass(vs, snap, vm_path, disk, previous)
                plan.mode, plan.extents = planned.mode, planned.extents
                # full-cbt-reset: the whole disk's allocated data, and zeros for the rest.
                allocated_only = planned.extents is None
                progress.mode = plan.mode
                progress.bytes_total = planned.planned_bytes(disk.capacity)
                log.info(
                    "copying %s %s (%s, %d bytes planned)",
                    vm_path,
                    disk.disk_id,
                    plan.mode,
                    progress.bytes_total,
                    extra={"disk_id": disk.disk_id},
                )
                if not allocated_only and not plan.extents:
                    progress.phase, plan.copied = "copied", True
                    return
                progress.phase = "copying"
                job.phase = "copying"
                job.current_operation = f"Copying {vm_path} {disk.disk_id}"
                await self._copy(job, snap, plan, progress, allocated_only)
                progress.phase, plan.copied = "copied", True

    async def _copy(
        self, job: Job, snap: SnapshotRef, plan: Plan, progress: DiskProgress, allocated_only: bool
    ) -> None:
        work = self.config.work_dir / job.job_id
        await trio.Path(work).mkdir(parents=True, exist_ok=True, mode=0o700)
        connections = self.config.mover_connections
        name = f"{snap.vm_moref}-{plan.disk.disk_id}"
        sock = socket_path(await self.socket_dir(), job.job_id, name)
        argv = await prepare_source(
            self.config,
            job.login,
            SourceSpec(snap.vm_moref, snap.moref, plan.disk.file_name),
            work,
            sock,
            threads=connections * self.config.mover_requests,
        )

        def on_progress(p: mover.CopyProgress) -> None:
            if p.bytes_planned > 0:
                progress.bytes_total = p.bytes_planned
            progress.bytes_done = int(progress.bytes_total * p.percent / 100.0)
            progress.bytes_written, progress.bytes_zeroed = p.bytes_written, p.bytes_zeroed
            progress.throughput = p.throughput_bytes_per_s

        try:
            async with serve_source(argv, work / f"{name}.log") as source_uri:
                result = await mover.copy(
                    source_uri,
                    plan.target.uri,
                    extents=None if allocated_only else plan.extents,
                    allocated_only=allocated_only,
                    # A full pass lists every allocated area ('*'): zero the rest, so a volume
                    # that holds anything else (an earlier, failed pass) cannot keep stale bytes.
                    zero_unlisted=plan.mode == "full",
                    connections=connections,
                    requests=self.config.mover_requests,
                    request_size=self.config.mover_request_size,
                    reconnect_timeout=self.config.reconnect_timeout,
                    on_progress=on_progress,
                )
        except mover.MoverError as e:
            progress.phase = "failed"
            raise JobFailed(
                f"copy of {progress.vm_path} {progress.disk_id} failed: {type(e).__name__}: {e}"
            ) from e
        except SourceError:
            progress.phase = "failed"
            raise
        on_progress(result)
        progress.throughput = 0.0
        if not result.durable:
            # The target's NBD server cannot flush: the bytes may still sit in its cache, so the
            # pass must not become the base of the next one (its change ID is never stored).
            if not self.config.allow_non_durable_targets:
                progress.phase = "failed"
                raise JobFailed(
                    f"copy of {progress.vm_path} {progress.disk_id} cannot be made durable: the target"
                    f" {plan.target.uri} does not support flush, so the change ID is not stored"
                    " (set allow_non_durable_targets to accept such targets)"
                )
            log.warning(
                "target of %s %s cannot be made durable (no flush); its change ID is stored because"
                " allow_non_durable_targets is set",
                progress.vm_path,
                progress.disk_id,
                extra={"disk_id": progress.disk_id},
            )
        log.info(
            "copied %s %s: %d bytes written, %d zeroed in %.1f s",
            progress.vm_path,
            progress.disk_id,
            result.bytes_written,
            result.bytes_zeroed,
            result.seconds,
            extra={"disk_id": progress.disk_id, "mode": plan.mode},
        )
