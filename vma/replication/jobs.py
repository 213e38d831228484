"""The job tracker: in-memory state of every replication and export this VMA process runs or ran.

A job is what ``POST /api/v1/replicate`` started: one or more VMs, each with its disks, either
copied into the OMA's targets (``mode`` ``replicate``) or served for the OMA to read
(``export``: then the job records its :class:`ExportedDisk` list until it is released). The tracker
owns the figures ``GET /api/v1/status/{job_id}`` and ``GET /api/v1/progress/{job_id}`` answer
with, the snapshots a job made (so cleanup can remove them, and only them), and the job's cancel
scope (so ``cleanup_all`` can stop it). Jobs are not resumed after a restart: the VMA knows no
job then, and the OMA fails the ones it was running.

What a job may leave outside the process is journalled before it is made: :meth:`JobTracker.add`
writes ``<work_dir>/journal/<job_id>.json`` (mode 0600, fsynced) before the job's task starts, so
before its snapshot ``vma-<job_id>`` is created. The record names the vCenter and its login (the
vddk source keeps the same password in the job's work directory already), the VMs and the
snapshot names. :mod:`vma.replication.recovery` reads the journal at start (and every
``recovery_interval``): for every job this process does not run, it removes the job's snapshots
by name, its work directory, then the record.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from vma.vsphere.client import SnapshotRef, VCenterLogin

JobStatus = Literal["pending", "running", "completed", "failed"]
JobMode = Literal["replicate", "export"]


class JobConflict(Exception):
    """A job with this id is already tracked and not finished (the API answers 400)."""


class JobNotFound(LookupError):
    """No job with this id is tracked (the API answers 404 ``JOB_NOT_FOUND``)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


def iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class DiskProgress:
    vm_path: str
    disk_id: str
    capacity: int
    phase: str = "pending"  # pending | querying | copying | copied | failed
    mode: str = ""  # full | incremental | full-cbt-reset
    bytes_total: int = 0  # bytes planned for this pass
    bytes_done: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    throughput: float = 0.0
    change_id: str | None = None  # the snapshot's change ID, stored once the VM's copy is complete

    def as_dict(self) -> dict[str, Any]:
        return {
            "vm_path": self.vm_path,
            "disk_id": self.disk_id,
            "capacity_bytes": self.capacity,
            "phase": self.phase,
            "mode": self.mode,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "bytes_written": self.bytes_written,
            "bytes_zeroed": self.bytes_zeroed,
            "percent": _percent(self.bytes_done, self.bytes_total, self.phase == "copied"),
            "throughput_bps": round(self.throughput, 1),
        }


@dataclass(frozen=True)
class ExportedDisk:
    """One disk of an export job's snapshot, served read-only on ``uri`` until the job ends."""

    vm_path: str
    disk_id: str
    uri: str
    capacity: int
    mode: str  # full | incremental | full-cbt-reset
    change_id: str  # the snapshot disk's change ID: the base of the next incremental pass
    #: What to read: the allocated areas (full), the changed ones (incremental); None
    #: (full-cbt-reset): the whole disk's allocation map, as the reader finds it.
    extents: list[tuple[int, int]] | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "vm_path": self.vm_path,
            "disk_id": self.disk_id,
            "uri": self.uri,
            "capacity": self.capacity,
            "mode": self.mode,
            "change_id": self.change_id,
            "extents": None if self.extents is None else [[o, n] for o, n in self.extents],
        }


def _percent(done: int, total: int, finished: bool) -> float:
    if total <= 0:
        return 100.0 if finished else 0.0
    return round(min(100.0, 100.0 * done / total), 2)


@dataclass
class Job:
    job_id: str
    vm_paths: list[str]
    login: VCenterLogin
    oma_url: str
    work_dir: Path
    status: JobStatus = "pending"
    phase: str = "pending"
    current_operation: str = "Queued"
    error: str | None = None
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    started_mono: float = field(default_factory=time.monotonic)
    disks: dict[tuple[str, str], DiskProgress] = field(default_factory=dict)
    #: Snapshots this job created and has not removed yet.
    snapshots: list[SnapshotRef] = field(default_factory=list)
    #: Set while the job runs: cancelling it stops the job (its cleanup paths still run).
    cancel_scope: trio.CancelScope | None = None
    done: trio.Event = field(default_factory=trio.Event)
    cancel_reason: str | None = None
    mode: JobMode = "replicate"
    #: An export job's served disks (while its phase is ``exported``).
    exports: list[ExportedDisk] = field(default_factory=list)
    #: When an export job began serving every disk: from then on, a release completes it.
    exported_at: dt.datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    def bytes_done(self) -> int:
        return sum(d.bytes_done for d in self.disks.values())

    def bytes_total(self) -> int:
        return sum(d.bytes_total for d in self.disks.values())

    def throughput(self) -> float:
        return sum(d.throughput for d in self.disks.values() if d.phase == "copying")

    def percent(self) -> float:
        if self.status == "completed":
            return 100.0
        return _percent(self.bytes_done(), self.bytes_total(), False)

    def eta_seconds(self) -> float | None:
        rate = self.throughput()
        left = self.bytes_total() - self.bytes_done()
        if self.finished:
            return 0.0
        if rate <= 0 or self.phase != "copying":
            return None
        return round(max(0, left) / rate, 1)

    def current_disk(self) -> dict[str, Any] | None:
        copying = [d for d in self.disks.values() if d.phase == "copying"]
        return copying[0].as_dict() if copying else None

    def status_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "job_id": self.job_id,
            "status": self.status,
            "progress_percent": self.percent(),
            "current_operation": self.current_operation,
        }
        if self.error:
            body["error"] = self.error
        if self.mode == "export":
            body["phase"] = self.phase
            if self.phase == "exported":
                body["exports"] = [e.as_dict() for e in self.exports]
        return body

    def progress_body(self) -> dict[str, Any]:
        elapsed = (
            ((self.finished_at or dt.datetime.now(dt.UTC)) - self.started_at).total_seconds()
            if self.started_at
            else 0.0
        )
        return {
            "job_id": self.job_id,
            "status": self.status,
            "phase": self.phase,
            "current_operation": self.current_operation,
            "current_disk": self.current_disk(),
            "bytes_transferred": self.bytes_done(),
            "total_bytes": self.bytes_total(),
            "progress_percent": self.percent(),
            "throughput_bps": round(self.throughput(), 1),
            "eta_seconds": self.eta_seconds(),
            "elapsed_seconds": round(elapsed, 1),
            "vm_paths": self.vm_paths,
            "disks": [d.as_dict() for d in self.disks.values()],
            "snapshots": [s.moref for s in self.snapshots],
            "error": self.error,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


def snapshot_names(job_id: str) -> tuple[str, str]:
    """The names of the snapshots a job may create: its own, and the CBT stun's."""
    return f"vma-{job_id}", f"vma-{job_id}-cbt-stun"


@dataclass(frozen=True)
class JournalRecord:
    """What a job (perhaps of a previous run) may have left in vCenter: see the module doc."""

    job_id: str
    login: VCenterLogin
    vm_paths: list[str]


class Journal:
    """The durable journal of jobs in ``<work_dir>/journal`` (one JSON file per job)."""

    def __init__(self, work_dir: Path) -> None:
        self.dir = work_dir / "journal"

    def path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def record(self, job: Job) -> None:
        """Write the job's record durably (temporary file, fsync, rename, directory fsync)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {
            "job_id": job.job_id,
            "vcenter": job.login.host,
            "username": job.login.username,
            "password": job.login.password,
            "tls_mode": job.login.tls_mode,
            "tls_thumbprint": job.login.tls_thumbprint,
            "vm_paths": job.vm_paths,
            "snapshots": list(snapshot_names(job.job_id)),
        }
        tmp = self.dir / f".{job.job_id}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path(job.job_id))
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def forget(self, job_id: str) -> None:
        self.path(job_id).unlink(missing_ok=True)

    def records(self) -> list[JournalRecord]:
        """Every readable record (an unreadable one is removed; a temporary, being written or left
        by a crash, is skipped: :meth:`remove_stale_temporaries`)."""
        out: list[JournalRecord] = []
        if not self.dir.is_dir():
            return out
        for path in sorted(self.dir.iterdir()):
            if path.name.endswith(".tmp"):
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                login = VCenterLogin(
                    str(data["vcenter"]),
                    str(data["username"]),
                    str(data["password"]),
                    tls_mode=data.get("tls_mode", "verify"),
                    tls_thumbprint=str(data.get("tls_thumbprint", "")),
                )
                out.append(JournalRecord(str(data["job_id"]), login, [str(p) for p in data["vm_paths"]]))
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
        return out

    def remove_stale_temporaries(self, older_than: float = 60.0) -> None:
        """Remove the temporaries a crash left mid-write (older than ``older_than`` seconds: a
        younger one may be a record being written now)."""
        if not self.dir.is_dir():
            return
        now = time.time()
        for path in self.dir.glob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > older_than:
                    path.unlink(missing_ok=True)


class JobTracker:
    def __init__(self, journal: Journal | None = None) -> None:
        self._jobs: dict[str, Job] = {}
        self.journal = journal

    def add(self, job: Job) -> None:
        """Track ``job``; journalled first (see the module doc), so call it before starting it."""
        existing = self._jobs.get(job.job_id)
        if existing is not None and not existing.finished:
            raise JobConflict(f"job {job.job_id} is already {existing.status}")
        if self.journal is not None:
            self.journal.record(job)
        self._jobs[job.job_id] = job

    def running(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is not None and not job.finished

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def all(self) -> list[Job]:
        return list(self._jobs.values())
