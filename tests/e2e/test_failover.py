"""Test failover end to end: the real OMA and VMA with the vSphere lab and the lab CloudStack
(its own process; its user VMs run under qemu). A boot VM of the vSphere lab is replicated into
CloudStack volumes on the OMA VM; the test failover boots it in CloudStack from the replicated
disk — the lab guest's boot line read on the VM's serial console carries the digest of the data
file it read from that disk, equal to the source's. Ending the test gives the volumes back to the
OMA VM as they were, and the next replication is incremental and exact. A CloudStack fault in a
step ends the job rolled back with nothing leaked, and a retry succeeds."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import trio

from lab import Lab, LabVM
from lab.bootdisk import find_marker, read_data, rewrite_data
from tests.e2e.conftest import Product
from tests.e2e.test_cloudstack_replication import assert_targets_equal, replica_volumes
from tests.e2e.test_cloudstack_replication import configure as configure_replication
from tests.oma.cloudstack_lab import (
    OMA_VM,
    TEMPLATE,
    TEST_NET,
    LabCloudStack,
)

pytestmark = pytest.mark.e2e

DEVICE_WAIT_S = 2.0
#: A start includes the double's KVM probe boot (about 4 s, once) and qemu coming up.
JOB_TIMEOUT_S = 60.0
#: Under TCG on a shared 2-core machine the lab guest boots in 6-8 s; room for a busy machine.
BOOT_TIMEOUT_S = 90.0


@pytest.fixture
def oma_overrides(tmp_path: Path) -> dict[str, Any]:
    return {
        "device_root": tmp_path / "cloudstack" / "dev",
        "device_wait_timeout": DEVICE_WAIT_S,
        "cloudstack_job_timeout": JOB_TIMEOUT_S,
        "failover_guest_check": "lab-console",
        "failover_boot_timeout": BOOT_TIMEOUT_S,
    }


@pytest.fixture
def boot_vm(lab: Lab) -> LabVM:
    return lab.create_boot_vm("fo-guest", data=b"the source's data file\n" * 2000)


async def configure(product: Product, cloud: LabCloudStack, vm: LabVM) -> None:
    """As for replication (a template to deploy from too), and the VM's network mapped for test
    failovers."""
    await configure_replication(product, cloud, vm, template_id=TEMPLATE)
    r = await product.oma.post(
        "/network-mappings",
        json={
            "vm_id": vm.moref,
            "source_network_name": vm.nics[0].network,
            "destination_network_id": TEST_NET,
            "is_test_network": True,
        },
    )
    assert r.status_code == 201, r.text


async def replicated(product: Product, cloud: LabCloudStack, vm: LabVM) -> tuple[dict[str, Any], list[str]]:
    """``vm`` configured and replicated once: the job, and its CloudStack volume ids in disk order."""
    assert vm.boot is not None
    await configure(product, cloud, vm)
    first = await replicate(product, vm)
    return first, [d["cloudstack_volume_id"] for d in first["disks"]]


async def replicate(product: Product, vm: LabVM) -> dict[str, Any]:
    job = await product.wait((await product.replicate(vm))["id"])
    assert job["status"] == "completed", job["error_message"]
    assert_targets_equal(job, vm)
    return job


async def wait_job(product: Product, job_id: str, *statuses: str, within: float = 150.0) -> dict[str, Any]:
    with trio.fail_after(within):
        while True:
            r = await product.oma.get(f"/failover/{job_id}/status")
            assert r.status_code == 200, r.text
            job: dict[str, Any] = r.json()
            if job["status"] in statuses:
                return job
            await trio.sleep(0.2)


async def assert_back_on_the_oma_vm(cloud: LabCloudStack, volume_ids: list[str]) -> None:
    """The replica volumes attached to the OMA VM with their device links, and no user VM,
    snapshot or other volume left in CloudStack."""
    state = await cloud.state()
    volumes = {v["id"]: v for v in state["volumes"]}
    for volume_id in volume_ids:
        assert volumes[volume_id]["virtualmachineid"] == OMA_VM, volumes[volume_id]
        assert cloud.link(volume_id).name in state["device_links"]
    assert [vm for vm in state["vms"] if vm["id"] != OMA_VM] == [], state["vms"]
    assert state["snapshots"] == [], state["snapshots"]
    assert sorted(v["id"] for v in state["volumes"] if v["virtualmachineid"] != OMA_VM) == [], state[
        "volumes"
    ]
    assert state["guests"] == {}, state["guests"]
    assert state["pending_jobs"] == [], state["pending_jobs"]


async def test_a_test_failover_boots_the_replica_and_ending_it_lets_replication_go_on(
    product: Product, cloud: LabCloudStack, boot_vm: LabVM
) -> None:
    _, volume_ids = await replicated(product, cloud, boot_vm)
    assert boot_vm.boot is not None

    r = await product.oma.get(f"/failover/{boot_vm.moref}/readiness")
    assert r.status_code == 200, r.text
    assert r.json()["ready"], r.json()["checks"]

    r = await product.oma.post("/failover/test", json={"vm_name": boot_vm.name})
    assert r.status_code == 201, r.text
    job_id = r.json()["job_id"]
    r = await product.oma.post("/failover/test", json={"vm_name": boot_vm.name})
    assert r.status_code == 409, r.text  # one failover at a time holds a VM
    job = await wait_job(product, job_id, "failed_over", "failed", "cleanup_required")
    assert job["status"] == "failed_over", job
    steps = {s["name"]: s for s in job["steps"]}
    assert list(steps) == ["validate", "snapshot", "prepare", "deploy", "start"]
    assert all(s["status"] == "completed" and s["ended_at"] for s in steps.values()), job["steps"]
    assert steps["prepare"]["result"]["virtio_drivers"] is True
    assert any("virtio_blk" in e for e in steps["prepare"]["result"]["evidence"])

    # the VM really booted in CloudStack from the replicated disk
    vm_id = job["target_vm_id"]
    marker = find_marker(steps["start"]["result"]["marker"])
    assert marker is not None and marker.vm == boot_vm.name
    assert marker.sha256 == boot_vm.boot.data_sha256
    console = await cloud.http.get(f"{cloud.base}/lab/vms/{vm_id}/console")
    seen = find_marker(console.text)
    assert seen is not None and seen.sha256 == hashlib.sha256(read_data(boot_vm.boot)).hexdigest()
    state = await cloud.state()
    guest = state["guests"][vm_id]
    assert guest["disks"][0].endswith(volume_ids[0])  # the replica is its ROOT disk
    deployed = next(v for v in state["vms"] if v["id"] == vm_id)
    assert deployed["nics"][0]["networkid"] == TEST_NET
    assert deployed["nics"][0]["macaddress"] not in {n.mac for n in boot_vm.nics}  # a new MAC
    assert len(state["snapshots"]) == len(volume_ids)
    r = await product.oma.get("/vm-contexts/" + boot_vm.name)
    assert r.json()["context"]["current_status"] == "failed_over_test", r.text

    # end the test: the VM goes, the volumes are reverted and back on the OMA VM
    r = await product.oma.delete(f"/failover/test/{job_id}")
    assert r.status_code == 200, r.text
    job = await wait_job(product, job_id, "ended", "cleanup_required")
    assert job["status"] == "ended", job
    await assert_back_on_the_oma_vm(cloud, volume_ids)
    r = await product.oma.get("/vm-contexts/" + boot_vm.name)
    assert r.json()["context"]["current_status"] == "ready_for_failover", r.text
    r = await product.oma.get("/failover/jobs")
    assert [j["id"] for j in r.json()["jobs"]] == [job_id]

    # the guest writes; the next pass is incremental into the same volumes, and exact
    await trio.to_thread.run_sync(
        rewrite_data, boot_vm.disks[0].guest, boot_vm.boot, b"written after the test\n" * 1500
    )
    second = await replicate(product, boot_vm)
    assert second["replication_type"] == "incremental"
    assert {d["copy_mode"] for d in second["disks"]} == {"incremental"}
    assert [d["cloudstack_volume_id"] for d in second["disks"]] == volume_ids


async def test_a_failed_deploy_rolls_the_job_back_and_a_retry_succeeds(
    product: Product, cloud: LabCloudStack, boot_vm: LabVM
) -> None:
    before, volume_ids = await replicated(product, cloud, boot_vm)
    await cloud.fault(
        command="deployVirtualMachine", mode="job_failure", errorcode=533, errortext="no capacity"
    )

    r = await product.oma.post("/failover/test", json={"vm_id": boot_vm.moref})
    assert r.status_code == 201, r.text
    job = await wait_job(product, r.json()["job_id"], "failed", "cleanup_required")
    assert job["status"] == "failed", job
    assert "deploy" in job["error_message"] and "no capacity" in job["error_message"], job["error_message"]
    names = [(s["name"], s["status"]) for s in job["steps"]]
    assert names == [
        ("validate", "completed"),
        ("snapshot", "completed"),
        ("prepare", "completed"),
        ("deploy", "failed"),
        ("rollback", "completed"),
    ]
    await assert_back_on_the_oma_vm(cloud, volume_ids)
    assert_targets_equal(before, boot_vm)  # reverted: the replicas hold what they held

    r = await product.oma.post("/failover/test", json={"vm_id": boot_vm.moref})
    assert r.status_code == 201, r.text
    retry = await wait_job(product, r.json()["job_id"], "failed_over", "failed", "cleanup_required")
    assert retry["status"] == "failed_over", retry
    r = await product.oma.delete(f"/failover/test/{retry['id']}")
    assert r.status_code == 200, r.text
    assert (await wait_job(product, retry["id"], "ended", "cleanup_required"))["status"] == "ended"
    await assert_back_on_the_oma_vm(cloud, volume_ids)
    assert len(await replica_volumes(cloud)) == len(volume_ids)
