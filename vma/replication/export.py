"""Export jobs (``POST /api/v1/replicate`` with ``"mode": "export"``): the VMA's side of a backup.

A backup pulls: the OMA's mover reads the snapshot's disks and writes the repository's images
itself. So an export job takes the same snapshot, on the same CBT path, as a replication
(:mod:`vma.replication.workflow`), and instead of copying, serves each requested disk of the
snapshot with ``nbdkit`` on a TCP port (``export_listen``, loopback by default: the OMA comes
through the tunnel), read-only, any number of connections. Per VM::

    find the VM, pick the requested disks -> CBT on -> snapshot "vma-<job_id>"
    -> per disk: the plan against the request's previous change ID (full, incremental,
       full-cbt-reset), then nbdkit on a free port
    -> phase "exported": GET /status lists each disk's URI, capacity, mode, change ID, extents
    -> held until POST /api/v1/cleanup (release: completed) or ``export_timeout`` (failed)
    -> nbdkit stopped, then the snapshot removed (shielded from cancellation)

A failure before ``exported`` stops the sources already started and removes the snapshot too; the
job fails with the error. An export job never calls the OMA: the change IDs come in the request
and go out in the status answer, and the OMA decides what becomes a base.

Release is the job's cancellation (cleanup stops a job by cancelling its scope, as for a
replication): cancelled once every disk is served, the job is ``completed``; before that, it
``failed`` (cancelled).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio

from pyapp.logs import log_context
from pyapp.nbd_export import free_tcp_port
from vma.config import VmaConfig
from vma.replication.jobs import DiskProgress, ExportedDisk, Job
from vma.replication.source import SourceError, SourceSpec, TcpListen, prepare_source, serve_source
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
from vma.vsphere.client import DiskInfo, SnapshotRef, VSphere, VSphereError, run

log = logging.getLogger(__name__)

#: A port is free when picked, and may be taken before nbdkit binds it: try another this often.
PORT_ATTEMPTS = 5
ADDRESS_IN_USE = "Address already in use"


@dataclass(frozen=True)
class ExportRequest:
    """What an export job serves (validated by the API)."""

    #: vm_path -> the ``disk-<key>`` ids to export; a VM not listed: all its disks.
    disks: Mapping[str, Sequence[str]]
    #: vm_path -> disk id -> the change ID of the reader's latest point (None or absent: full).
    previous_change_ids: Mapping[str, Mapping[str, str | None]]
    #: Seconds to keep the export when nobody releases it.
    timeout: float

    def previous(self, vm_path: str, disk_id: str) -> str | None:
        return self.previous_change_ids.get(vm_path, {}).get(disk_id)


def select_disks(vm_path: str, disks: list[DiskInfo], wanted: Sequence[str] | None) -> list[DiskInfo]:
    """The VM's disks named in ``wanted`` (None: all of them), in the VM's order."""
    if wanted is None:
        return disks
    by_id = {d.disk_id: d for d in disks}
    unknown = [w for w in wanted if w not in by_id]
    if unknown:
        raise JobFailed(
            f"{vm_path} has no disk {', '.join(unknown)} (its disks: {', '.join(by_id) or 'none'})"
        )
    return [d for d in disks if d.disk_id in wanted]


def export_uri(host: str, port: int) -> str:
    return f"nbd://{host}:{port}/"


class Exporter:
    def __init__(self, config: VmaConfig) -> None:
        self.config = config

    async def run_job(self, job: Job, request: ExportRequest) -> None:
        """Run the export ``job`` to its end: served until released (completed) or until its
        timeout or a failure (failed). Never raises but for the app's shutdown."""
        with log_context(job_id=job.job_id, action="export"):
            job.status, job.phase, job.started_at = "running", "starting", dt.datetime.now(dt.UTC)
            job.current_operation = "Starting export"
            log.info("export started", extra={"vm_paths": job.vm_paths})
            try:
                with trio.CancelScope() as scope:
                    job.cancel_scope = scope
                    if job.cancel_reason is not None:
                        scope.cancel()
                    await self._export(job, request)
                if job.exported_at is None:
                    raise JobFailed(f"cancelled: {job.cancel_reason or 'released before it was exported'}")
            except BaseException as exc:
                error = record_failure(job, exc)
                log.error("export failed: %s", error)
                self._end(job)
                if only_cancelled(exc) or not isinstance(exc, Exception):
                    raise  # the app is shutting down (or the process is interrupted): let it
                return
            job.status, job.phase, job.current_operation = "completed", "completed", "Export released"
            job.finished_at = dt.datetime.now(dt.UTC)
            log.info("export released")
            self._end(job)

    def _end(self, job: Job) -> None:
        job.cancel_scope = None
        job.exports.clear()  # no longer served
        remove_password_file(self.config, job)
        job.done.set()

    async def _export(self, job: Job, request: ExportRequest) -> None:
        """Serve the job's disks and hold them. Ends only by the job's cancellation (the release)
        or by an exception (a failure, or ``request.timeout`` running out); either way the
        sources are stopped and then the snapshots removed."""
        try:
            async with contextlib.AsyncExitStack() as sources:
                await self._serve_all(job, request, sources)
                job.phase, job.exported_at = "exported", dt.datetime.now(dt.UTC)
                job.current_operation = f"Serving {len(job.exports)} disk(s) until released"
                log.info("export ready", extra={"exports": [e.uri for e in job.exports]})
                try:
                    with trio.move_on_after(request.timeout):
                        await trio.sleep_forever()
                finally:
                    # From here on the status no longer lists the exports: they are going away.
                    job.phase, job.current_operation = "releasing", "Releasing the export"
                raise JobFailed(
                    f"the export was not released within {request.timeout:g} s (POST /api/v1/cleanup"
                    " with cleanup_all): the VMA released it itself"
                )
        finally:
            # The sources are stopped (the stack above is closed); only then can the snapshot go.
            with trio.CancelScope(shield=True), trio.move_on_after(SNAPSHOT_REMOVE_TIMEOUT):
                await self._remove_snapshots(job)

    async def _serve_all(self, job: Job, request: ExportRequest, sources: contextlib.AsyncExitStack) -> None:
        job.phase, job.current_operation = "connecting", f"Connecting to vCenter {job.login.host}"
        vs = await run(VSphere.connect, job.login, insecure=self.config.vcenter_insecure)
        try:
            for vm_path in job.vm_paths:
                await self._serve_vm(job, vs, vm_path, request, sources)
        finally:
            # The exports may be held for an hour: the release opens its own session.
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                await run(vs.disconnect)

    async def _serve_vm(
        self,
        job: Job,
        vs: VSphere,
        vm_path: str,
        request: ExportRequest,
        sources: contextlib.AsyncExitStack,
    ) -> None:
        vm, live = await find_vm_disks(vs, vm_path)
        wanted = select_disks(vm_path, live, request.disks.get(vm_path))
        for d in wanted:
            job.disks[(vm_path, d.disk_id)] = DiskProgress(vm_path, d.disk_id, d.capacity)
        snap = await snapshot_with_cbt(job, vs, vm, vm_path, "export")
        snap_disks = await tracked_snapshot_disks(vs, snap, vm_path, {d.key for d in live})
        in_snapshot = {d.key: d for d in snap_disks}
        for d in wanted:
            disk = in_snapshot.get(d.key)
            if disk is None:
                raise JobFailed(f"{vm_path}: disk {d.disk_id} was removed during the job")
            assert disk.change_id is not None  # tracked_snapshot_disks checked it
            progress = job.disks[(vm_path, disk.disk_id)]
            progress.phase = "querying"
            job.phase = "querying"
            job.current_operation = f"Querying changed areas of {vm_path} {disk.disk_id}"
            planned = await plan_pass(vs, snap, vm_path, disk, request.previous(vm_path, disk.disk_id))
            progress.mode, progress.bytes_total = planned.mode, planned.planned_bytes(disk.capacity)
            job.phase, job.current_operation = "exporting", f"Serving {vm_path} {disk.disk_id}"
            try:
                uri = await self._serve_disk(job, snap, disk, sources)
            except SourceError:
                progress.phase = "failed"
                raise
            job.exports.append(
                ExportedDisk(
                    vm_path=vm_path,
                    disk_id=disk.disk_id,
                    uri=uri,
                    capacity=disk.capacity,
                    mode=planned.mode,
                    change_id=disk.change_id,
                    extents=planned.extents,
                )
            )
            progress.phase = "exported"
            log.info(
                "serving %s %s on %s (%s, %d bytes to read)",
                vm_path,
                disk.disk_id,
                uri,
                planned.mode,
                progress.bytes_total,
                extra={"disk_id": disk.disk_id},
            )

    async def _serve_disk(
        self, job: Job, snap: SnapshotRef, disk: DiskInfo, sources: contextlib.AsyncExitStack
    ) -> str:
        """Start nbdkit on a free port for ``disk`` of ``snap`` (stopped when ``sources`` closes);
        returns the URI the OMA reads it at."""
        work = self.config.work_dir / job.job_id
        await trio.Path(work).mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = work / f"{snap.vm_moref}-{disk.disk_id}.log"
        spec = SourceSpec(snap.vm_moref, snap.moref, disk.file_name)
        threads = self.config.mover_connections * self.config.mover_requests
        for attempt in range(1, PORT_ATTEMPTS + 1):
            listen = TcpListen(self.config.export_listen, free_tcp_port(self.config.export_listen))
            argv = await prepare_source(self.config, job.login, spec, work, listen, threads)
            try:
                await sources.enter_async_context(serve_source(argv, log_path))
            except SourceError as e:
                if ADDRESS_IN_USE not in str(e) or attempt == PORT_ATTEMPTS:
                    raise
                log.warning("port %d was taken before nbdkit bound it; trying another", listen.port)
                await trio.Path(log_path).unlink(missing_ok=True)  # the next attempt's errors alone
                continue
            return export_uri(self.config.export_uri_host, listen.port)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _remove_snapshots(self, job: Job) -> None:
        """Remove the snapshots the job still holds, in a session of its own (the job's may be an
        hour old). What cannot be removed stays in ``job.snapshots`` for cleanup."""
        if not job.snapshots:
            return
        try:
            vs = await run(VSphere.connect, job.login, insecure=self.config.vcenter_insecure)
        except VSphereError as e:
            log.error("the snapshots of the export could not be removed: %s", e)
            return
        try:
            for snap in list(job.snapshots):
                await remove_snapshot(job, vs, snap)
        finally:
            await run(vs.disconnect)
