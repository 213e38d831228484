"""The failover endpoints against the lab CloudStack, for VMs that are not ready: readiness names
every check that fails, a job whose ``validate`` step fails ends ``failed`` with its error and a
``rollback`` step and gives the VM back, and bad requests get clear errors in the envelope. (The
failover that boots: tests/e2e/test_failover.py.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cloudstack_lab import (
    CUSTOM_DISK,
    MEDIUM_SO,
    OMA_VM_MAC,
    TEST_NET,
    ZONE1,
    LabCloudStack,
    run_cloudstack_lab,
)
from oma_harness import Oma, make_config, run_oma
from vma_double import VmaDouble

from pyapp.db import open_database


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[LabCloudStack]:
    async with run_cloudstack_lab(tmp_path / "cloudstack") as started:
        yield started


@pytest.fixture
async def oma(tmp_path: Path, oma_dsn: str, vma: VmaDouble, lab: LabCloudStack) -> AsyncIterator[Oma]:
    """An OMA that finds its VM in the lab CloudStack (as for the network mappings' tests)."""
    async with run_oma(make_config(tmp_path, oma_dsn, vma.base_url, oma_vm_macs=(OMA_VM_MAC,))) as handle:
        yield handle


async def configure(oma: Oma, lab: LabCloudStack) -> None:
    body = {**lab.login(), "zone_id": ZONE1, "disk_offering_id": CUSTOM_DISK}
    body["service_offering_id"] = MEDIUM_SO
    r = await oma.post("/ossea/config-streamlined", json=body)
    assert r.status_code == 200, r.text


async def manage(oma: Oma) -> None:
    """A managed VM of 1 CPU, 512 MB and one NIC, never replicated."""
    async with open_database(oma.config.database_url or "", min_size=1, max_size=1) as db:
        await db.execute(
            "INSERT INTO vm_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host,"
            " current_status)"
            " VALUES ('ctx-fo', 'fo1', 'vm-77', '/DC/vm/fo1', 'vc.lab', 'discovered')"
        )
        nics = [{"key": 4000, "network": "VM Network", "mac_address": "00:50:56:00:00:01"}]
        await db.execute(
            "INSERT INTO vms (id, name, path, vcenter_host, num_cpu, memory_mb, networks)"
            " VALUES ('vm-77', 'fo1', '/DC/vm/fo1', 'vc.lab', 1, 512, $1::jsonb)",
            json.dumps(nics),
        )


def checks(body: dict[str, Any]) -> dict[str, bool]:
    return {c["name"]: c["passed"] for c in body["checks"]}


async def test_readiness_names_what_is_missing(oma: Oma, lab: LabCloudStack) -> None:
    r = await oma.get("/failover/fo1/readiness")
    assert r.status_code == 404, r.text  # no such VM
    await manage(oma)
    r = await oma.get("/failover/fo1/readiness")
    assert r.status_code == 409 and r.json()["code"] == "CLOUDSTACK_NOT_CONFIGURED", r.text
    await configure(oma, lab)
    r = await oma.get("/failover/vm-77/readiness")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ready"] is False
    assert checks(body) == {
        "replication": False,
        "volumes": False,
        "networks": False,
        "service_offering": True,
        "cloudstack_settings": False,  # no template chosen
        "no_active_job": True,
    }
    assert body["service_offering"]["id"] == MEDIUM_SO  # the settings' offering fits 1 CPU, 512 MB
    r = await oma.post(
        "/network-mappings",
        json={"vm_id": "fo1", "source_network_name": "VM Network", "destination_network_id": TEST_NET,
              "is_test_network": True},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    body = (await oma.get("/failover/ctx-fo/readiness")).json()
    assert checks(body)["networks"] is True and body["network_ids"] == [TEST_NET]


async def test_a_job_that_fails_validation_ends_failed_and_gives_the_vm_back(
    oma: Oma, lab: LabCloudStack
) -> None:
    await manage(oma)
    await configure(oma, lab)
    r = await oma.post("/failover/test", json={"vm_name": "fo1"})
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    with trio.fail_after(20):
        while (job := (await oma.get(f"/failover/{job_id}/status")).json())["status"] not in ("failed",):
            assert job["status"] in ("running", "rolling_back"), job
            await trio.sleep(0.05)
    assert [(s["name"], s["status"]) for s in job["steps"]] == [
        ("validate", "failed"),
        ("rollback", "completed"),
    ]
    assert job["error_message"].startswith("validate: the VM is not ready to fail over: replication:")
    assert job["steps"][0]["error_message"] and job["steps"][0]["ended_at"] and job["current_step"] is None
    context = (await oma.get("/vm-contexts/fo1")).json()["context"]
    assert context["current_status"] == "discovered"
    listed = (await oma.get("/failover/jobs", params={"vm_name": "fo1"})).json()
    assert [j["id"] for j in listed["jobs"]] == [job_id] and listed["jobs"][0]["failover_type"] == "test"
    r = await oma.delete(f"/failover/test/{job_id}")
    assert r.status_code == 409, r.text  # only a running test ends


async def test_bad_requests(oma: Oma) -> None:
    r = await oma.post("/failover/test", json={})
    assert r.status_code == 422, r.text
    r = await oma.post("/failover/test", json={"vm_name": "a", "vm_id": "b"})
    assert r.status_code == 422, r.text
    r = await oma.post("/failover/test", json={"vm_name": "nobody"})
    assert r.status_code == 404, r.text
    r = await oma.get("/failover/fo-nothing/status")
    assert r.status_code == 404, r.text
    r = await oma.delete("/failover/test/fo-nothing")
    assert r.status_code == 404, r.text
    r = await oma.get("/failover/jobs", params={"limit": "0"})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST", r.text
