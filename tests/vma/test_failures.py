"""Failure paths of a replication: the target export dies mid-copy, cleanup stops a running job.
The target is ``nbdkit file`` under the ``delay`` filter (each write takes ``wdelay``), so a copy
lasts long enough to be hit."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from lab import Lab, LabVM, MiB
from pyapp.nbd_export import NbdExport
from tests.vma.conftest import (
    VM_PATH,
    StartVma,
    Vma,
    new_target,
    replicate_body,
    signed_client,
    slow_export,
    snapshot_names,
    vma_config,
)
from tests.vma.oma_double import OmaDouble
from vma.replication.workflow import only_cancelled
from vma.server import serve_vma


@pytest.fixture
async def vma(start_vma: StartVma) -> Vma:
    """Few small requests in flight, so a cancelled copy drains quickly through the slow target;
    a failed job gives up telling a stopped OMA after 2 s."""
    return await start_vma(mover_requests=2, mover_request_size=256 * 1024, final_report_timeout=2.0)


def body(lab: Lab, job_id: str, oma: OmaDouble, uris: list[str], vm: LabVM) -> dict[str, Any]:
    targets = {VM_PATH: {f"disk-{d.key}": u for d, u in zip(vm.disks, uris, strict=True)}}
    return replicate_body(lab, job_id, targets=targets)


async def wait_bytes(vma: Vma, job_id: str) -> dict[str, Any]:
    """Wait until the copy has moved some bytes (and is not done)."""
    with trio.fail_after(30):
        while True:
            p: dict[str, Any] = (await vma.get(f"/api/v1/progress/{job_id}")).json()
            assert p["status"] == "running", p
            if p["phase"] == "copying" and p["bytes_transferred"] > 0:
                return p
            await trio.sleep(0.02)


async def test_export_killed_mid_copy(tmp_path: Path, vma: Vma, lab: Lab, vm1: LabVM, oma: OmaDouble) -> None:
    vm1.disks[0].guest.rewrite_random_chunks(12, chunk=MiB, seed=5)  # 12 MiB in 256 KiB writes, 8 at a time
    t0 = new_target(tmp_path / "t0.raw", vm1.disks[0].capacity)
    t1 = new_target(tmp_path / "t1.raw", vm1.disks[1].capacity)
    with slow_export(t0) as (uri0, proc0), NbdExport(t1, name="d1", shared=8) as e1:
        r = await vma.post("/api/v1/replicate", body(lab, "repl-kill", oma, [uri0, e1.uri], vm1))
        assert r.status_code == 200, r.text
        p = await wait_bytes(vma, "repl-kill")
        assert p["current_disk"] is not None and p["throughput_bps"] >= 0
        assert [n for n, _ in await trio.to_thread.run_sync(snapshot_names, lab, "vm1")] == ["vma-repl-kill"]
        proc0.kill()  # the OMA's export dies in the middle of the copy
        final = await vma.wait_job("repl-kill", within=60)
    assert final["status"] == "failed"
    assert "copy of /DC0/vm/vm1 disk-" in final["error"]
    assert await trio.to_thread.run_sync(snapshot_names, lab, "vm1") == []  # snapshot removed
    assert final["snapshots"] == []
    assert oma.change_id_posts == []  # the change ID did not advance
    assert oma.replications["repl-kill"]["status"] == "failed"
    assert "copy of" in oma.replications["repl-kill"]["error_message"]
    status = (await vma.get("/api/v1/status/repl-kill")).json()
    assert status["status"] == "failed" and status["error"] == final["error"]


async def test_cleanup_stops_a_running_job_and_removes_its_snapshot(
    tmp_path: Path, vma: Vma, lab: Lab, vm1: LabVM, oma: OmaDouble
) -> None:
    vm1.disks[0].guest.rewrite_random_chunks(12, chunk=MiB, seed=6)
    t0 = new_target(tmp_path / "t0.raw", vm1.disks[0].capacity)
    t1 = new_target(tmp_path / "t1.raw", vm1.disks[1].capacity)
    with slow_export(t0) as (uri0, _), NbdExport(t1, name="d1", shared=8) as e1:
        r = await vma.post("/api/v1/replicate", body(lab, "repl-clean", oma, [uri0, e1.uri], vm1))
        assert r.status_code == 200
        await wait_bytes(vma, "repl-clean")
        with trio.fail_after(20):
            while True:  # the live figures the OMA's proxy forwards
                p = (await vma.get("/api/v1/progress/repl-clean")).json()
                if p["eta_seconds"] is not None:
                    break
                await trio.sleep(0.05)
        assert p["phase"] == "copying" and p["throughput_bps"] > 0
        assert 0 < p["bytes_transferred"] < p["total_bytes"] and 0 < p["progress_percent"] < 100
        assert p["current_disk"]["disk_id"] == f"disk-{vm1.disks[0].key}"
        assert p["current_disk"]["mode"] == "full"
        snaps = await trio.to_thread.run_sync(snapshot_names, lab, "vm1")
        assert [n for n, _ in snaps] == ["vma-repl-clean"]
        r = await vma.post("/api/v1/cleanup", {"job_id": "repl-clean", "action": "delete_snapshot"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["job_id"] == "repl-clean" and answer["action"] == "delete_snapshot"
        assert answer["status"] == "success"
        assert answer["job_stopped"] is True
        assert answer["snapshots_removed"] == [snaps[0][1]]
    assert await trio.to_thread.run_sync(snapshot_names, lab, "vm1") == []
    status = (await vma.get("/api/v1/status/repl-clean")).json()
    assert status["status"] == "failed" and "stopped by cleanup" in status["error"]
    assert oma.change_id_posts == []
    work = vma.config.work_dir / "repl-clean"
    assert work.exists() and not (work / "vcenter.pass").exists()
    # cleanup_all: nothing left in vCenter; the job's work directory (nbdkit logs) goes.
    r = await vma.post("/api/v1/cleanup", {"job_id": "repl-clean", "action": "cleanup_all"})
    assert r.status_code == 200, r.text
    assert r.json()["snapshots_removed"] == [] and r.json()["artifacts_removed"] is True
    assert not work.exists()
    # Idempotent: a second delete_snapshot has nothing to do, and says so.
    r = await vma.post("/api/v1/cleanup", {"job_id": "repl-clean", "action": "delete_snapshot"})
    assert r.json() == {**r.json(), "status": "success", "snapshots_removed": [], "job_stopped": False}


async def test_cleanup_removes_a_snapshot_the_job_could_not(
    tmp_path: Path, vma: Vma, lab: Lab, vm1: LabVM, oma: OmaDouble
) -> None:
    """The job stalls after its snapshot (the OMA is down, the client backs off); cleanup stops it
    and the snapshot is gone."""
    t0 = new_target(tmp_path / "t0.raw", vm1.disks[0].capacity)
    t1 = new_target(tmp_path / "t1.raw", vm1.disks[1].capacity)
    with NbdExport(t0, name="d0", shared=8) as e0, NbdExport(t1, name="d1", shared=8) as e1:
        # The job has told the OMA it started; once it is at its snapshot, the OMA goes away.
        r = await vma.post("/api/v1/replicate", body(lab, "repl-stall", oma, [e0.uri, e1.uri], vm1))
        assert r.status_code == 200
        await vma.wait_phase("repl-stall", "snapshot")
        await oma.stop()
        with trio.fail_after(20):
            while True:
                if await trio.to_thread.run_sync(snapshot_names, lab, "vm1"):
                    break
                await trio.sleep(0.05)
        await trio.sleep(0.5)  # the job is backing off towards the OMA
        assert (await vma.get("/api/v1/status/repl-stall")).json()["status"] == "running"
        r = await vma.post("/api/v1/cleanup", {"job_id": "repl-stall", "action": "cleanup_all"})
        assert r.status_code == 200, r.text
        assert len(r.json()["snapshots_removed"]) == 1
    assert await trio.to_thread.run_sync(snapshot_names, lab, "vm1") == []
    assert (await vma.get("/api/v1/status/repl-stall")).json()["status"] == "failed"


async def test_vcenter_refusal_fails_the_job_and_cleanup_reports_it(
    tmp_path: Path, vma: Vma, lab: Lab, vm1: LabVM, oma: OmaDouble
) -> None:
    b = body(lab, "repl-badpass", oma, ["nbd://127.0.0.1:1/a", "nbd://127.0.0.1:1/b"], vm1)
    b["password"] = "wrong"
    assert (await vma.post("/api/v1/replicate", b)).status_code == 200
    final = await vma.wait_job("repl-badpass")
    assert final["status"] == "failed" and "refused the login" in final["error"]
    assert oma.replications["repl-badpass"]["status"] == "failed"
    assert oma.change_id_posts == []
    # Cleanup needs vCenter too: its failure is the seed's error answer, never "not implemented".
    r = await vma.post("/api/v1/cleanup", {"job_id": "repl-badpass", "action": "delete_snapshot"})
    assert r.status_code == 502
    answer = r.json()
    assert answer["code"] == "OPERATION_FAILED" and answer["status"] == "error"
    assert answer["job_id"] == "repl-badpass" and answer["action"] == "delete_snapshot"
    assert "refused the login" in answer["message"] and "not implemented" not in answer["message"]
    # The same job id can be started again once the first attempt is over.
    b["password"] = lab.password
    b["targets"] = {}
    r = await vma.post("/api/v1/replicate", b)
    assert r.status_code == 400  # no targets and no PUT /config: refused up front


async def test_vma_shutdown_mid_copy_removes_the_snapshot(
    tmp_path: Path, lab: Lab, vm1: LabVM, oma: OmaDouble
) -> None:
    vm1.disks[0].guest.rewrite_random_chunks(12, chunk=MiB, seed=9)
    config = vma_config(tmp_path, lab, oma)
    config.mover_requests, config.mover_request_size, config.final_report_timeout = 2, 256 * 1024, 5.0
    t0 = new_target(tmp_path / "t0.raw", vm1.disks[0].capacity)
    t1 = new_target(tmp_path / "t1.raw", vm1.disks[1].capacity)
    with slow_export(t0) as (uri0, _), NbdExport(t1, name="d1", shared=8) as e1:
        async with signed_client(config, timeout=30) as http, trio.open_nursery() as service:
            url: str = await service.start(
                lambda task_status: serve_vma(config, handle_signals=False, task_status=task_status)
            )
            vma = Vma(url, config, http)
            assert (
                await vma.post("/api/v1/replicate", body(lab, "repl-down", oma, [uri0, e1.uri], vm1))
            ).status_code == 200
            await wait_bytes(vma, "repl-down")
            service.cancel_scope.cancel()  # the VMA goes down in the middle of the copy
    assert await trio.to_thread.run_sync(snapshot_names, lab, "vm1") == []
    assert oma.replications["repl-down"]["status"] == "failed"
    assert "shut down" in oma.replications["repl-down"]["error_message"]
    assert oma.change_id_posts == []


def test_only_cancelled() -> None:
    cancelled = trio.Cancelled._create()  # the instance trio raises; not constructible otherwise
    assert only_cancelled(cancelled)
    assert only_cancelled(BaseExceptionGroup("g", [cancelled]))
    assert not only_cancelled(BaseExceptionGroup("g", [cancelled, ValueError("x")]))
    assert not only_cancelled(ValueError("x"))


async def test_a_vcenter_that_stops_answering_fails_the_job_within_the_deadline(
    tmp_path: Path, start_vma: StartVma, lab: Lab, vm1: LabVM, oma: OmaDouble
) -> None:
    """vcsim stopped (SIGSTOP) as the job starts: every vSphere call has a deadline, so the job
    fails with a clear reason within it; once vCenter answers again, the VMA's recovery removes
    whatever snapshot the job could not remove itself, and its journal record."""
    vma = await start_vma(vsphere_call_timeout=2.0, vsphere_task_timeout=3.0, recovery_interval=0.5)
    t0 = new_target(tmp_path / "t0.raw", vm1.disks[0].capacity)
    t1 = new_target(tmp_path / "t1.raw", vm1.disks[1].capacity)
    assert lab._proc is not None  # the vcsim process
    pid = lab._proc.pid
    with NbdExport(t0, name="d0", shared=8) as e0, NbdExport(t1, name="d1", shared=8) as e1:
        r = await vma.post("/api/v1/replicate", body(lab, "repl-silent", oma, [e0.uri, e1.uri], vm1))
        assert r.status_code == 200, r.text
        os.kill(pid, signal.SIGSTOP)
        try:
            start = trio.current_time()
            final = await vma.wait_job("repl-silent", within=40)
            took = trio.current_time() - start
        finally:
            os.kill(pid, signal.SIGCONT)
    assert final["status"] == "failed"
    assert "vCenter did not answer within" in final["error"], final["error"]
    # each step is bounded: connect or a call (2 s), a task (2 + 3 s), the snapshot removal (5 s)
    assert took < 2 * (2.0 + 3.0) + 5.0, took
    with trio.fail_after(30):
        while await trio.to_thread.run_sync(snapshot_names, lab, "vm1") or any(
            (vma.config.work_dir / "journal").iterdir()
        ):
            await trio.sleep(0.2)
    assert oma.change_id_posts == []
