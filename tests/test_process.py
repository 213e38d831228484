"""Processes known by PID and start time (never a bare PID), and the qemu-nbd exports a killed
service leaves behind, found through their durable records and stopped."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

from oma.workers import claimant_gone
from pyapp.nbd_export import NbdExport, reap_orphaned_exports
from pyapp.process import ProcessRef


def test_a_reused_pid_is_another_process() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        ref = ProcessRef.of(proc.pid)
        assert ref is not None and ref.alive()
        assert ProcessRef.parse(str(ref)) == ref
        # The same PID with another start time: what a record of a dead process whose PID was
        # reused would name. It is not alive, and it is never signalled.
        other = ProcessRef(proc.pid, ref.start_time + 1)
        assert not other.alive()
        assert not other.signal(signal.SIGKILL)
        assert not other.terminate()
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert not ref.alive()
    assert not ref.terminate()


def test_terminate_stops_a_process_that_is_not_our_child() -> None:
    # sh starts sleep in the background and exits: sleep is re-parented, not our child
    out = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, check=True)
    ref = ProcessRef.of(int(out.stdout))
    assert ref is not None and ref.alive()
    assert ref.terminate(timeout=5)
    assert not ref.alive()


def test_reaping_stops_exports_of_dead_owners_only(tmp_path: Path) -> None:
    records = tmp_path / "exports"
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 65536)
    mine = NbdExport(image, name="mine", socket_path=tmp_path / "mine.sock", record_dir=records).start()
    orphan = NbdExport(image, name="orphan", socket_path=tmp_path / "orphan.sock", record_dir=records).start()
    try:
        assert orphan.process is not None and mine.process is not None
        orphan_ref = ProcessRef.of(orphan.process.pid)
        assert orphan_ref is not None
        # The orphan's owner is a process that is gone (a PID with a start time that never was).
        path = next(p for p in records.glob("*.json") if "--export-name=orphan" in p.read_text())
        data = json.loads(path.read_text())
        data["owner"] = str(ProcessRef(1, 0))
        path.write_text(json.dumps(data))

        stopped = reap_orphaned_exports(records)

        assert stopped == [str(image)]
        assert not orphan_ref.alive()
        assert mine.process.poll() is None  # the live owner's export runs on
        assert not path.exists() and len(list(records.glob("*.json"))) == 1
    finally:
        mine.stop()
        orphan.stop()  # already stopped by the reaper: only reaped here
    assert list(records.glob("*")) == []


def test_a_worker_whose_pid_was_reused_is_gone() -> None:
    """A claim names its worker by PID and start time: a live process that got the dead worker's
    PID does not keep the dead worker's jobs claimed."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        ref = ProcessRef.of(proc.pid)
        assert ref is not None
        host = socket.gethostname()
        assert not claimant_gone(f"{host}:{ref}:0123abcd")  # that very process: alive
        assert claimant_gone(f"{host}:{proc.pid}@{ref.start_time - 1}:0123abcd")  # its PID, reused
        assert not claimant_gone(f"elsewhere:{proc.pid}@1:0123abcd")  # other hosts: their leases
    finally:
        proc.kill()
        proc.wait()
