"""What jobs of a previous run (or a failed removal) left behind, found and removed.

The VMA may be killed in the middle of a job: its nbdkit sources die with it
(``--exit-with-parent``), but its snapshot ``vma-<job_id>`` stays in vCenter and its work
directory (password file, logs) on disk. Every job is journalled before it starts
(:class:`vma.replication.jobs.Journal`), so at start — and every ``recovery_interval`` seconds
after — each journalled job that this process does not run has its snapshots removed by name
(only those the VMA names ``vma-<job_id>``/``vma-<job_id>-cbt-stun``, on the job's VMs), its work
directory removed, and then its record. A vCenter that cannot be reached keeps the record for the
next pass. At start, work directories of jobs that are neither running nor journalled are removed
too.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import trio

from pyapp.logs import log_context
from vma.config import VmaConfig
from vma.replication.jobs import JobTracker, JournalRecord, snapshot_names
from vma.vsphere.client import VSphere, VSphereError, run

log = logging.getLogger(__name__)


def remove_job_snapshots(record: JournalRecord, insecure: bool) -> list[str]:
    """Remove the snapshots ``record``'s job may have left; returns their managed object ids
    (blocking: call through :func:`vma.vsphere.client.run`, which bounds it)."""
    vs = VSphere.connect(record.login, insecure=insecure)
    removed: list[str] = []
    try:
        for path in record.vm_paths:
            try:
                vm = vs.find_vm(path)
            except VSphereError:
                continue  # the VM is gone, and its snapshots with it
            for name in snapshot_names(record.job_id):
                for snap in vs.snapshots_named(vm, name):
                    if vs.remove_snapshot(snap):
                        removed.append(snap.moref)
    finally:
        vs.disconnect()
    return removed


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


async def recover_once(config: VmaConfig, tracker: JobTracker, *, at_start: bool = False) -> list[str]:
    """One pass (see the module doc); returns the ids of the jobs cleaned up."""
    journal = tracker.journal
    if journal is None:
        return []
    cleaned: list[str] = []
    for record in await trio.to_thread.run_sync(journal.records):
        if tracker.running(record.job_id):
            continue
        with log_context(job_id=record.job_id, action="recover"):
            try:
                removed = await run(remove_job_snapshots, record, config.vcenter_insecure)
            except (VSphereError, OSError) as e:
                log.warning("snapshots of an ended job not removed yet: %s", e)
                continue
            await trio.to_thread.run_sync(remove_tree, config.work_dir / record.job_id)
            await trio.to_thread.run_sync(journal.forget, record.job_id)
            if removed:
                log.warning("snapshots left by an ended job removed", extra={"snapshots_removed": removed})
            cleaned.append(record.job_id)
    if at_start:
        await trio.to_thread.run_sync(journal.remove_stale_temporaries)
        journalled = {r.job_id for r in await trio.to_thread.run_sync(journal.records)}
        for entry in await trio.Path(config.work_dir).iterdir():
            name = entry.name
            if name == journal.dir.name or name in journalled or tracker.running(name):
                continue
            if config.socket_dir is not None and Path(str(entry)) == config.socket_dir:
                continue  # the sources' sockets, if configured inside the work directory
            if await entry.is_dir():
                log.warning("work directory of an ended job removed", extra={"job_id": name})
                await trio.to_thread.run_sync(remove_tree, Path(str(entry)))
    return cleaned


async def recovery_loop(config: VmaConfig, tracker: JobTracker, stop: trio.Event) -> None:
    """:func:`recover_once` at start, then every ``recovery_interval`` seconds until ``stop``."""
    at_start = True
    while not stop.is_set():
        try:
            await recover_once(config, tracker, at_start=at_start)
        except Exception:
            log.exception("recovering what ended jobs left failed", extra={"action": "recover"})
        at_start = False
        with trio.move_on_after(config.recovery_interval):
            await stop.wait()
