"""After a real replication (the lab's vCenter, the VMA, the OMA's engine), the scrapes show it:
the OMA's pass bytes and result counters, the VMA's copy bytes."""

from __future__ import annotations

import httpx
import pytest

from lab import LabVM
from tests.e2e.conftest import Product
from tests.test_metrics import sample

pytestmark = pytest.mark.e2e


async def scrape(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{url}/metrics")
    assert r.status_code == 200, r.text
    return r.text


async def test_a_replication_moves_the_metrics(product: Product, vm1: LabVM) -> None:
    r = await product.oma.post("/discovery/add-vms", json={"vm_names": ["vm1"]})
    assert r.status_code == 200, r.text
    before = await scrape(product.oma.base_url)
    vma_before = await scrape(product.vma_url)

    job = await product.wait((await product.replicate(vm1))["id"])
    assert job["status"] == "completed", job["error_message"]

    after = await scrape(product.oma.base_url)
    moved = (sample(after, "mover_bytes_moved_total", kind="replication") or 0) - (
        sample(before, "mover_bytes_moved_total", kind="replication") or 0
    )
    sent = sum(d["bytes_written"] or 0 for d in job["disks"])
    assert moved == sent > 0, (moved, job["disks"])
    completed = (sample(after, "mover_job_results_total", kind="replication", status="completed") or 0) - (
        sample(before, "mover_job_results_total", kind="replication", status="completed") or 0
    )
    assert completed == 1
    passes = sample(after, "mover_pass_seconds_count", kind="replication") or 0
    assert passes - (sample(before, "mover_pass_seconds_count", kind="replication") or 0) == 1
    assert sample(after, "mover_active_jobs", kind="replication") == 0

    vma_after = await scrape(product.vma_url)
    copied = (sample(vma_after, "mover_copy_bytes_total", how="data") or 0) - (
        sample(vma_before, "mover_copy_bytes_total", how="data") or 0
    )
    assert copied >= sent  # the VMA's copies (this test runs both services in one process)
