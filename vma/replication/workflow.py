"""The steps a replication (:mod:`vma.replication.replicate`) and an export
(:mod:`vma.replication.export`) share, so both modes read a VM the same way:

    find the VM and its disks -> CBT on (``VSphere.ensure_cbt``) -> snapshot ``vma-<job_id>``
    -> the snapshot's disks, each with a change ID -> per disk, the pass's plan (:func:`plan_pass`)
    -> ... (copy, or serve) ... -> remove the snapshot (by the managed object id the job made)

and end a job the same way (:func:`record_failure`, the password file, the work directory).

The plan of a disk's pass depends only on the previous change ID (the OMA's stored one for a
replication, the request's for an export) and the snapshot:

- none: ``full``, the allocated areas (``QueryChangedDiskAreas`` with ``*``);
- same CBT epoch as the snapshot disk's change ID: ``incremental``, the areas changed since;
- another epoch, or vCenter refuses it (``FileFault``: CBT was reset): ``full-cbt-reset``, no
  list of areas: the reader takes the whole disk's allocation map, because the base it holds is
  from before the reset and cannot be trusted.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import trio

from pyapp import mover
from vma.config import VmaConfig
from vma.oma_client.client import OmaError
from vma.replication.jobs import Job
from vma.replication.source import SourceError
from vma.vsphere.client import (
    CbtResetError,
    DiskInfo,
    SnapshotRef,
    VSphere,
    VSphereError,
    run,
    same_cbt_epoch,
)

log = logging.getLogger(__name__)

PassMode = Literal["full", "incremental", "full-cbt-reset"]

#: How long removing a snapshot may take on a failure or release path (shielded from cancellation).
SNAPSHOT_REMOVE_TIMEOUT = 300.0


class JobFailed(Exception):
    """A step of a job failed; the message is what the operator reads in status and progress."""


def only_cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is trio's cancellation (alone or as a group of them): an outer scope's
    (the app's shutdown), since the job's own cancel scope has caught its own by then."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split(trio.Cancelled)[1]
        return rest is None
    return False


def describe_error(exc: BaseException) -> str:
    """One readable line for a (possibly grouped) failure."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [describe_error(e) for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        return "; ".join(dict.fromkeys(leaves)) or "cancelled"
    if isinstance(exc, JobFailed | VSphereError | SourceError | OmaError):
        return str(exc)
    if isinstance(exc, mover.MoverError):
        return f"copy failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, trio.Cancelled):
        return "cancelled"
    return f"{type(exc).__name__}: {exc}"


def record_failure(job: Job, exc: BaseException) -> str:
    """Mark ``job`` failed with a readable error for ``exc``; returns that error. When ``exc`` is
    the app's shutdown (:func:`only_cancelled`), the caller re-raises it after its cleanup."""
    error = "the VMA shut down during the job" if only_cancelled(exc) else describe_error(exc)
    job.status, job.phase, job.error = "failed", "failed", error
    job.current_operation = f"Failed: {error}"
    job.finished_at = dt.datetime.now(dt.UTC)
    return error


# -- the VM and its snapshot ---------------------------------------------------------------------


async def find_vm_disks(vs: VSphere, vm_path: str) -> tuple[Any, list[DiskInfo]]:
    """The VM at ``vm_path`` and its disks as they are now (before the snapshot)."""
    vm = await run(vs.find_vm, vm_path)
    live = await run(vs.live_disks, vm)
    if not live:
        raise JobFailed(f"{vm_path} has no disk")
    return vm, live


async def snapshot_with_cbt(job: Job, vs: VSphere, vm: Any, vm_path: str, purpose: str) -> SnapshotRef:
    """CBT on for the VM and each disk (stunning a running VM so tracking starts), then the job's
    snapshot ``vma-<job_id>``, recorded in ``job.snapshots`` at once so every path removes it."""
    job.phase, job.current_operation = "enabling_cbt", f"Checking change tracking of {vm_path}"
    await run(vs.ensure_cbt, vm, stun_name=f"vma-{job.job_id}-cbt-stun")
    job.phase, job.current_operation = "snapshot", f"Creating snapshot of {vm_path}"
    snap = await run(
        vs.create_snapshot, vm, f"vma-{job.job_id}", f"VMA {purpose} {job.job_id}; removed by the VMA"
    )
    job.snapshots.append(snap)
    return snap


async def tracked_snapshot_disks(
    vs: VSphere, snap: SnapshotRef, vm_path: str, known: Collection[int]
) -> list[DiskInfo]:
    """The snapshot's disks, each with its change ID. ``known``: the keys of the disks the job
    planned for; a disk outside them was added during the job."""
    disks = await run(vs.snapshot_disks, snap)
    for d in disks:
        if d.key not in known:
            raise JobFailed(f"{vm_path}: disk {d.disk_id} appeared during the job")
        if d.change_id is None:
            raise JobFailed(f"{vm_path} {d.disk_id}: CBT is not active in the snapshot")
    return disks


async def remove_snapshot(job: Job, vs: VSphere, snap: SnapshotRef) -> None:
    """Remove the job's snapshot; on failure it stays in ``job.snapshots`` for cleanup."""
    try:
        await run(vs.remove_snapshot, snap)
    except (VSphereError, OSError) as e:
        log.error("snapshot %s could not be removed: %s", snap.moref, e, extra={"action": "snapshot_remove"})
        return
    if snap in job.snapshots:
        job.snapshots.remove(snap)


# -- the plan of one disk's pass -------------------------------------------------------------------


@dataclass(frozen=True)
class DiskPass:
    """What a pass reads of one snapshot disk. ``extents`` is None for ``full-cbt-reset``: the
    whole disk's allocated data, as its reader finds it (NBD block status)."""

    mode: PassMode
    extents: list[tuple[int, int]] | None

    def planned_bytes(self, capacity: int) -> int:
        return capacity if self.extents is None else sum(n for _, n in self.extents)


async def plan_pass(
    vs: VSphere, snap: SnapshotRef, vm_path: str, disk: DiskInfo, previous: str | None
) -> DiskPass:
    """The pass of ``disk`` (a disk of ``snap``) against the previous change ID (None: none)."""
    if previous is None:
        return DiskPass("full", await run(vs.changed_areas, snap, disk, "*"))
    if same_cbt_epoch(previous, disk.change_id):
        try:
            return DiskPass("incremental", await run(vs.changed_areas, snap, disk, previous))
        except CbtResetError as e:
            log.warning("%s: full pass", e)
    log.warning(
        "CBT was reset for %s %s (previous %s, snapshot %s): full pass",
        vm_path,
        disk.disk_id,
        previous,
        disk.change_id,
    )
    return DiskPass("full-cbt-reset", None)


# -- what a job leaves on the VMA ----------------------------------------------------------------------


def remove_password_file(config: VmaConfig, job: Job) -> None:
    """The vCenter password file lives only as long as the job's sources."""
    (config.work_dir / job.job_id / "vcenter.pass").unlink(missing_ok=True)


def remove_artifacts(config: VmaConfig, job: Job) -> bool:
    """Remove the job's work directory (password file, sockets, nbdkit logs). False: none was there."""
    work = config.work_dir / job.job_id
    if not work.exists():
        return False
    shutil.rmtree(work)
    return True
