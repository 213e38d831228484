"""Every end of a job closes its exports and leaves no snapshot: an operator's cancellation and
the OMA's shutdown in the middle of a copy; an incremental pass whose volume is gone."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from lab import LabVM
from pyapp.db import open_database
from tests.e2e.conftest import Product, hold_copy, vma_progress
from tests.e2e.test_replication_flow import accepts, no_snapshots

pytestmark = pytest.mark.e2e


async def full_pass(product: Product, vm: LabVM) -> dict[str, str | None]:
    await product.oma.post("/discovery/add-vms", json={"vm_names": [vm.name]})
    job = await product.wait((await product.replicate(vm))["id"])
    assert job["status"] == "completed", job["error_message"]
    return {d["disk_id"]: d["change_id"] for d in job["disks"]}


async def test_cancel_mid_copy_stops_the_vma_and_closes_the_exports(product: Product, vm1: LabVM) -> None:
    bases = await full_pass(product, vm1)
    await trio.to_thread.run_sync(
        lambda: vm1.disks[0].guest.rewrite_random_chunks(8, chunk=256 * 1024, seed=5)
    )
    job_id = (await product.replicate(vm1))["id"]
    process = await hold_copy(product, job_id)
    r = await product.oma.put(f"/replications/{job_id}", json={"status": "cancelled"})
    assert r.status_code == 200, r.text
    os.kill(process.pid, signal.SIGCONT)

    job = await product.wait(job_id)
    assert job["status"] == "cancelled"
    assert not any(accepts(d["nbd_uri"]) for d in job["disks"])
    with trio.fail_after(30):  # the VMA's job stops and removes its snapshot
        while (await vma_progress(product, job_id))["status"] not in ("completed", "failed"):
            await trio.sleep(0.05)
    assert await no_snapshots(product, vm1) == []
    assert {d: await product.change_id(vm1, d) for d in bases} == bases  # no base advanced


@pytest.mark.slow  # ~30 s: the VMA keeps trying to report to the OMA that went away
async def test_oma_shutdown_mid_copy_fails_the_job_and_closes_the_exports(
    product: Product, vm1: LabVM, oma_dsn: str
) -> None:
    await full_pass(product, vm1)
    await trio.to_thread.run_sync(
        lambda: vm1.disks[0].guest.rewrite_random_chunks(8, chunk=256 * 1024, seed=6)
    )
    job_id = (await product.replicate(vm1))["id"]
    process = await hold_copy(product, job_id)
    uris = [t.uri for t in product.engine.jobs[job_id].targets]
    engine = product.engine

    product.oma.extra["stop"].set()  # the OMA shuts down (SIGTERM does the same)
    await trio.sleep(0.2)
    os.kill(process.pid, signal.SIGCONT)
    with trio.fail_after(40):
        await engine.stopped.wait()
    assert not any(accepts(u) for u in uris)
    async with open_database(oma_dsn, min_size=1, max_size=1) as db:
        row = await db.fetchrow("SELECT status, error_message FROM replication_jobs WHERE id = $1", job_id)
    assert row is not None and row["status"] == "failed" and "shut down" in row["error_message"]
    with trio.fail_after(30):
        while await no_snapshots(product, vm1):
            await trio.sleep(0.1)


async def test_incremental_without_its_volume_fails_without_touching_vcenter(
    product: Product, vm1: LabVM
) -> None:
    await full_pass(product, vm1)
    job = await product.job((await product.oma.get("/replications")).json()["replications"][0]["id"])
    Path(job["disks"][0]["volume_path"]).unlink()
    job = await product.wait((await product.replicate(vm1))["id"])
    assert job["status"] == "failed" and "missing" in job["error_message"]
    assert await no_snapshots(product, vm1) == []
