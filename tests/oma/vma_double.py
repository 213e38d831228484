"""A TEST DOUBLE of the VMA API — not the VMA.

The OMA tests talk to this double over real HTTP (quart-trio on hypercorn, loopback, free port);
the real VMA is tested against the OMA in tests/e2e. It speaks the VMA seed's JSON exactly for the
calls the OMA makes:

- ``GET /api/v1/health`` -> ``{"status", "timestamp", "uptime"}``;
- ``POST /api/v1/discover`` with ``{"vcenter", "username", "password", "datacenter", "filter"}`` ->
  ``{"vcenter": {"host", "datacenter"}, "vms": [{"id", "name", "path", "power_state", "guest_os",
  "memory_mb", "num_cpu"}]}`` — plus, per VM, the optional ``disks`` list the OMA documents as its
  one extension of that answer (docs/oma.md); ``filter`` is a case-insensitive substring of the
  VM name.
  A login other than the configured one answers 500 ``{"error", "code": "OPERATION_FAILED",
  "timestamp"}`` as the VMA does when vCenter refuses;
- ``GET /api/v1/progress/{job_id}`` -> the progress the test set for that job (fields documented
  in docs/oma.md), or 404 ``JOB_NOT_FOUND``;
- the **export job** of docs/backup.md ("The VMA's export job"): ``POST /api/v1/replicate`` with
  ``"mode": "export"``, ``GET /api/v1/status/{job_id}`` with ``phase`` and ``exports``, and
  ``POST /api/v1/cleanup`` (``cleanup_all`` releases the export);
- the **replication job** as the engine starts it (docs/vma.md): ``PUT /api/v1/config`` and
  ``POST /api/v1/replicate`` whose ``targets`` give every disk as ``{"uri", "base_change_id"}``
  (a plain URI or a missing ``base_change_id`` is refused: the OMA must say what each target
  holds) and optional ``vm_ids``. The double copies nothing: the job stays ``running`` (the test
  plays the VMA's reports to the OMA) until ``POST /api/v1/cleanup`` stops it; the bodies are in
  :attr:`VmaDouble.replications`.

The export job serves real bytes: each disk the test registers (:meth:`VmaDouble.add_export_disk`)
is a raw image the test writes through :meth:`ExportDisk.write`, which also records the written
areas the way vCenter's changed block tracking does. An export "snapshots" the image (a sparse
copy), serves the copy with a real ``nbdkit file`` (read-only, loopback TCP) and plans the pass
from the change ID the OMA sent: none -> ``full`` with the written areas; one of the current CBT
epoch -> ``incremental`` with the areas written since; one of an older epoch
(:meth:`ExportDisk.reset_cbt`) -> ``full-cbt-reset`` without extents. Knobs for failure tests:
``export_delay`` (seconds in the snapshot phase), ``read_delay`` (nbdkit's delay filter on each
read: ``"2"`` seconds, ``"50ms"``), ``read_rate`` (nbdkit's rate filter, bits per second:
``"16M"``), ``fail_next_export`` and :meth:`VmaDouble.kill_export` (the
serving nbdkit dies; the job fails).

Every request body is recorded so tests can check what the OMA sent.

As the real VMA, the double answers only the OMA it is "enrolled" with: every request but
``/health`` must carry the OMA's signature made with :attr:`VmaDouble.secret` (pyapp/vma_auth.py),
or it gets 401 ``UNAUTHORIZED``. The OMA's test configuration (tests/oma/oma_harness.py) points
``vma_secret_file`` at :func:`double_secret_file`, which holds the double's default secret.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import secrets
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import jsonify, request
from quart_trio import QuartTrio

from pyapp.nbd_export import free_tcp_port
from pyapp.vma_auth import AuthFailed, Verifier

#: The secret the double's OMA signs with: one per test process (kept in the environment so that
#: this module imported under two names — ``vma_double``, ``tests.oma.vma_double`` — agrees).
DOUBLE_SECRET = os.environ.setdefault("VMA_DOUBLE_TEST_SECRET", secrets.token_urlsafe(32))


@functools.cache
def double_secret_file() -> Path:
    """A file holding :data:`DOUBLE_SECRET`, for the OMA's ``vma_secret_file``."""
    path = Path(tempfile.mkdtemp(prefix="vma-double-secret-")) / "vma.secret"
    path.write_text(DOUBLE_SECRET + "\n")
    path.chmod(0o600)
    return path


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def coalesce(areas: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged ``(offset, length)`` areas."""
    out: list[tuple[int, int]] = []
    for offset, length in sorted(a for a in areas if a[1] > 0):
        if out and offset <= out[-1][0] + out[-1][1]:
            last = out[-1]
            out[-1] = (last[0], max(last[0] + last[1], offset + length) - last[0])
        else:
            out.append((offset, length))
    return out


@dataclass
class ExportDisk:
    """A VM disk the double exports: a raw image, and changed block tracking over its writes.

    Writes land in the current *generation*; an export's snapshot closes it (its change ID names
    it) and opens the next one, so the areas changed since a change ID are the writes of every
    later generation. ``reset_cbt`` starts a new epoch: earlier change IDs mean nothing any more.
    """

    vm_path: str
    disk_id: str
    image: Path
    epoch: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    generation: int = 0
    changes: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    written: list[tuple[int, int]] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.image.stat().st_size

    def write(self, offset: int, data: bytes) -> None:
        with self.image.open("r+b") as f:
            f.seek(offset)
            f.write(data)
        self.changes.setdefault(self.generation, []).append((offset, len(data)))
        self.written.append((offset, len(data)))

    def reset_cbt(self) -> None:
        self.epoch = uuid.uuid4().hex[:12]
        self.changes.clear()

    def snapshot_plan(self, previous: str | None) -> tuple[str, str, list[tuple[int, int]] | None]:
        """Take the snapshot: (mode, change ID of the snapshot, extents) for ``previous``."""
        change_id = f"52 {self.epoch}/{self.generation}"
        mode: str
        extents: list[tuple[int, int]] | None
        if previous is None:
            mode, extents = "full", coalesce(self.written)
        else:
            epoch, _, gen = previous.removeprefix("52 ").partition("/")
            if epoch == self.epoch and gen.isdigit() and int(gen) <= self.generation:
                since = [a for g, areas in self.changes.items() if g > int(gen) for a in areas]
                mode, extents = "incremental", coalesce(since)
            else:
                mode, extents = "full-cbt-reset", None
        self.generation += 1
        return mode, change_id, extents


@dataclass
class ExportJob:
    job_id: str
    vm_path: str
    disk_ids: list[str]
    previous: dict[str, str | None]
    status: str = "running"
    phase: str = "snapshot"
    current_operation: str = "Creating snapshot"
    error: str | None = None
    exports: list[dict[str, Any]] = field(default_factory=list)
    servers: list[trio.Process] = field(default_factory=list)
    snapshots: list[Path] = field(default_factory=list)

    def status_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "job_id": self.job_id,
            "status": self.status,
            "progress_percent": 100.0 if self.phase == "exported" else 0.0,
            "current_operation": self.current_operation,
            "phase": self.phase,
        }
        if self.phase == "exported" and self.status == "running":
            body["exports"] = self.exports
        if self.error:
            body["error"] = self.error
        return body


async def _serve_nbdkit(
    image: Path, read_delay: str | None, read_rate: str | None
) -> tuple[trio.Process, int]:
    """``nbdkit file`` over ``image``: read-only, loopback TCP, ready when it accepts; slowed by
    the delay filter (each read) or the rate filter (the whole server's bandwidth)."""
    for _ in range(5):
        port = free_tcp_port()
        argv = [
            "nbdkit",
            "--exit-with-parent",
            "--foreground",
            "--readonly",
            "--ipaddr",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "16",
        ]
        if read_delay:
            argv += ["--filter=delay"]
        if read_rate:
            argv += ["--filter=rate"]
        argv += ["file", f"file={image}"]
        if read_delay:
            argv += [f"rdelay={read_delay}"]
        if read_rate:
            argv += [f"rate={read_rate}", "burstiness=0.2"]  # no initial burst: slow from the start
        process = await trio.lowlevel.open_process(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with trio.move_on_after(10):
            while process.poll() is None:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.aclose()
                return process, port
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    raise RuntimeError(f"nbdkit did not serve {image}")


@dataclass
class VmaDouble:
    vcenter_host: str = "vcsim.lab.local"
    datacenter: str = "LabDC"
    username: str = "administrator@vsphere.local"
    password: str = "vcenter-pass"
    vms: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    base_url: str = ""
    export_disks: dict[tuple[str, str], ExportDisk] = field(default_factory=dict)
    export_jobs: dict[str, ExportJob] = field(default_factory=dict)
    #: Job ids released through ``POST /cleanup``, in order.
    releases: list[str] = field(default_factory=list)
    #: Replication jobs started (``POST /replicate`` in replicate mode): job id -> body, status.
    replications: dict[str, dict[str, Any]] = field(default_factory=dict)
    export_delay: float = 0.0
    read_delay: str | None = None
    read_rate: str | None = None
    fail_next_export: str | None = None
    work_dir: Path | None = None
    nursery: trio.Nursery | None = None
    #: The enrollment secret the OMA must sign with; requests refused with 401, in order.
    secret: str = DOUBLE_SECRET
    refused: list[tuple[str, str]] = field(default_factory=list)

    def add_export_disk(self, vm: dict[str, Any], image: Path, disk_id: str = "disk-2000") -> ExportDisk:
        """Back ``disk_id`` of ``vm`` (from :meth:`add_vm`) with the raw ``image`` for export jobs."""
        disk = ExportDisk(vm["path"], disk_id, image)
        self.export_disks[(vm["path"], disk_id)] = disk
        return disk

    async def _run_export(self, job: ExportJob) -> None:
        await trio.sleep(self.export_delay)
        if job.status != "running":
            return
        if self.fail_next_export is not None:
            job.status, job.error, self.fail_next_export = "failed", self.fail_next_export, None
            job.current_operation = "Export failed"
            return
        assert self.work_dir is not None
        for disk_id in job.disk_ids:
            disk = self.export_disks.get((job.vm_path, disk_id))
            if disk is None:
                job.status, job.error = "failed", f"{job.vm_path} has no disk {disk_id}"
                return
            mode, change_id, extents = disk.snapshot_plan(job.previous.get(disk_id))
            snapshot = self.work_dir / f"{job.job_id}-{disk_id}.raw"
            await trio.run_process(["cp", "--sparse=always", str(disk.image), str(snapshot)])
            job.snapshots.append(snapshot)
            process, port = await _serve_nbdkit(snapshot, self.read_delay, self.read_rate)
            job.servers.append(process)
            job.exports.append(
                {
                    "vm_path": job.vm_path,
                    "disk_id": disk_id,
                    "uri": f"nbd://127.0.0.1:{port}/",
                    "capacity": disk.capacity,
                    "mode": mode,
                    "change_id": change_id,
                    "extents": None if extents is None else [list(e) for e in extents],
                }
            )
        if job.status == "running":
            job.phase, job.current_operation = "exported", "Serving the snapshot's disks"

    async def _release(self, job: ExportJob) -> bool:
        """Stop the job's sources and remove its snapshots; True when it was still running."""
        running = job.status == "running"
        for process in job.servers:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        job.servers.clear()
        for snapshot in job.snapshots:
            snapshot.unlink(missing_ok=True)
        if running:
            if job.phase == "exported":
                job.status, job.current_operation = "completed", "Export released"
            else:
                job.status, job.error, job.current_operation = "failed", "cancelled", "Cancelled"
        return running

    async def kill_export(self, job_id: str) -> None:
        """The nbdkit serving the job dies (as a crash would): the job fails."""
        job = self.export_jobs[job_id]
        for process in job.servers:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        job.status, job.error = "failed", "nbdkit serving the disk exited"

    def add_vm(
        self, vm_id: str, name: str, *, power_state: str = "poweredOn", disks: int = 1
    ) -> dict[str, Any]:
        vm = {
            "id": vm_id,
            "name": name,
            "path": f"/{self.datacenter}/vm/{name}",
            "power_state": power_state,
            "guest_os": "debian12_64Guest",
            "memory_mb": 2048,
            "num_cpu": 2,
            "disks": [
                {"id": f"disk-{2000 + i}", "path": f"[ds1] {name}/{name}_{i}.vmdk", "capacity_bytes": 1 << 30}
                for i in range(disks)
            ],
        }
        self.vms.append(vm)
        return vm

    def app(self) -> QuartTrio:
        app = QuartTrio("vma_double")

        def error(status: int, code: str, message: str) -> Any:
            response = jsonify({"error": message, "code": code, "timestamp": _now()})
            response.status_code = status
            return response

        verifier = Verifier()

        @app.before_request
        async def authenticate() -> Any:
            if request.path == "/api/v1/health":
                return None
            body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
            try:
                verifier.verify(
                    self.secret,
                    request.headers.get("Authorization"),
                    request.method,
                    request.path,
                    request.query_string.decode("latin-1"),
                    body,
                )
            except AuthFailed as e:
                self.refused.append((request.method, request.path))
                return error(401, "UNAUTHORIZED", str(e))
            return None

        @app.get("/api/v1/health")
        async def health() -> Any:
            return {"status": "healthy", "timestamp": _now(), "uptime": "1s"}

        @app.post("/api/v1/discover")
        async def discover() -> Any:
            body = await request.get_json()
            self.requests.append(("POST", "/api/v1/discover", body))
            if not isinstance(body, dict) or not body.get("vcenter"):
                return error(400, "INVALID_REQUEST", "vcenter, username and password are required")
            if body.get("username") != self.username or body.get("password") != self.password:
                return error(500, "OPERATION_FAILED", f"vCenter {body['vcenter']} refused the login")
            wanted = str(body.get("filter") or "").lower()
            return {
                "vcenter": {"host": body["vcenter"], "datacenter": body.get("datacenter") or self.datacenter},
                "vms": [vm for vm in self.vms if wanted in vm["name"].lower()],
            }

        def replication(body: dict[str, Any]) -> Any:
            if body.get("username") != self.username or body.get("password") != self.password:
                return error(500, "OPERATION_FAILED", f"vCenter {body.get('vcenter')} refused the login")
            job_id, vm_paths, targets = body.get("job_id"), body.get("vm_paths"), body.get("targets")
            if not isinstance(job_id, str) or job_id in self.replications:
                return error(409, "CONFLICT", f"job {job_id} exists")
            if (
                not isinstance(vm_paths, list)
                or not isinstance(targets, dict)
                or set(targets) != set(vm_paths)
            ):
                return error(400, "INVALID_REQUEST", "targets must name every vm_path")
            for vm_path, disks in targets.items():
                for disk_id, target in (disks or {}).items():
                    if not isinstance(target, dict) or set(target) != {"uri", "base_change_id"}:
                        return error(
                            400,
                            "INVALID_REQUEST",
                            f"targets[{vm_path}][{disk_id}] must be {{uri, base_change_id}}",
                        )
            self.replications[job_id] = {"body": body, "status": "running"}
            return {"job_id": job_id, "status": "started", "vm_count": len(vm_paths), "started_at": _now()}

        @app.put("/api/v1/config")
        async def put_config() -> Any:
            body = await request.get_json()
            self.requests.append(("PUT", "/api/v1/config", body))
            return {"status": "updated", **(body if isinstance(body, dict) else {})}

        @app.post("/api/v1/replicate")
        async def replicate() -> Any:
            body = await request.get_json()
            self.requests.append(("POST", "/api/v1/replicate", body))
            if isinstance(body, dict) and body.get("mode") in (None, "replicate"):
                return replication(body)
            if not isinstance(body, dict) or body.get("mode") != "export":
                return error(400, "INVALID_REQUEST", "mode must be 'replicate' or 'export'")
            if body.get("username") != self.username or body.get("password") != self.password:
                return error(500, "OPERATION_FAILED", f"vCenter {body.get('vcenter')} refused the login")
            job_id, vm_paths, disks = body.get("job_id"), body.get("vm_paths"), body.get("disks")
            if not isinstance(vm_paths, list) or len(vm_paths) != 1 or not isinstance(disks, dict):
                return error(400, "INVALID_REQUEST", "one vm_path and its disks are required")
            if not isinstance(job_id, str) or job_id in self.export_jobs:
                return error(409, "CONFLICT", f"job {job_id} exists")
            vm_path = vm_paths[0]
            previous = (body.get("previous_change_ids") or {}).get(vm_path) or {}
            job = ExportJob(job_id, vm_path, list(disks.get(vm_path) or []), dict(previous))
            self.export_jobs[job_id] = job
            assert self.nursery is not None
            self.nursery.start_soon(self._run_export, job)
            return {"job_id": job_id, "status": "started", "vm_count": 1, "started_at": _now()}

        @app.get("/api/v1/status/<job_id>")
        async def status(job_id: str) -> Any:
            if job_id in self.replications:
                return {"job_id": job_id, "status": self.replications[job_id]["status"]}
            job = self.export_jobs.get(job_id)
            if job is None:
                return error(404, "JOB_NOT_FOUND", f"job {job_id} not found")
            return job.status_body()

        @app.post("/api/v1/cleanup")
        async def cleanup() -> Any:
            body = await request.get_json()
            self.requests.append(("POST", "/api/v1/cleanup", body))
            replication = self.replications.get(body.get("job_id") if isinstance(body, dict) else "")
            if replication is not None:
                stopped = replication["status"] == "running"
                replication["status"] = "failed" if stopped else replication["status"]
                return {
                    "job_id": body["job_id"],
                    "action": body.get("action"),
                    "status": "success",
                    "job_stopped": stopped,
                    "snapshots_removed": [],
                    "artifacts_removed": True,
                }
            job = self.export_jobs.get(body.get("job_id") if isinstance(body, dict) else None)
            if job is None:
                return error(404, "JOB_NOT_FOUND", f"job {body.get('job_id')} not found")
            self.releases.append(job.job_id)
            snapshots = [s.name for s in job.snapshots]
            stopped = await self._release(job)
            return {
                "job_id": job.job_id,
                "action": body.get("action"),
                "status": "success",
                "job_stopped": stopped,
                "snapshots_removed": snapshots,
                "artifacts_removed": True,
            }

        @app.get("/api/v1/progress/<job_id>")
        async def progress(job_id: str) -> Any:
            self.requests.append(("GET", f"/api/v1/progress/{job_id}", None))
            if job_id not in self.progress:
                return error(404, "JOB_NOT_FOUND", f"job {job_id} not found")
            return self.progress[job_id]

        return app


@asynccontextmanager
async def run_vma_double(double: VmaDouble | None = None) -> AsyncIterator[VmaDouble]:
    double = double or VmaDouble()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    with tempfile.TemporaryDirectory(prefix="vma-double-") as work:
        double.work_dir = Path(work)
        async with trio.open_nursery() as nursery:
            double.nursery = nursery

            async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
                await serve(double.app(), config, shutdown_trigger=stop.wait, task_status=task_status)

            binds: list[str] = await nursery.start(run)
            double.base_url = binds[0]
            try:
                yield double
            finally:
                stop.set()
                with trio.CancelScope(shield=True):
                    for job in double.export_jobs.values():
                        await double._release(job)
                nursery.cancel_scope.cancel()  # exports still in their snapshot phase
