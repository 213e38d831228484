"""Replica volumes as CloudStack volumes, end to end: the real OMA and VMA with the vSphere lab and
the lab CloudStack (its own process, whose OMA VM has this host's MAC address and whose device
links appear in the OMA's device root, a temporary directory here). CloudStack is configured and
a network mapped through the OMA's API; a full pass then an incremental one go into CloudStack
data volumes attached to the OMA VM, which equal the source disks byte for byte and stay
attached between passes; deleting the replication with its volumes detaches and deletes them.
Every injected CloudStack fault ends the job cleanly — failed, with a clear error, no volume left
in CloudStack, no device link left — and the next replication succeeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from lab import LabVM, MiB
from tests.e2e.conftest import Product
from tests.oma.cloudstack_lab import (
    CUSTOM_DISK,
    ISOLATED,
    MEDIUM_SO,
    OMA_VM,
    ZONE1,
    LabCloudStack,
)
from tests.vma.conftest import images_equal

pytestmark = pytest.mark.e2e

#: How long the OMA waits for a volume's device, and for a CloudStack job, in these tests.
DEVICE_WAIT_S = 2.0
JOB_TIMEOUT_S = 4.0


@pytest.fixture
def oma_overrides(tmp_path: Path) -> dict[str, Any]:
    # The lab CloudStack makes the OMA VM's device links under <its data dir>/dev (below).
    return {
        "device_root": tmp_path / "cloudstack" / "dev",
        "device_wait_timeout": DEVICE_WAIT_S,
        "cloudstack_job_timeout": JOB_TIMEOUT_S,
    }


async def configure(product: Product, cloud: LabCloudStack, vm: LabVM, **settings: str) -> None:
    """CloudStack's settings through the OMA's API (the OMA VM found by this host's MAC; more
    resources in ``settings``), the VM added from vCenter and its network mapped."""
    oma = product.oma
    r = await oma.post(
        "/ossea/config-streamlined",
        json={
            "base_url": cloud.base,
            "api_key": cloud.api_key,
            "secret_key": cloud.secret_key,
            "zone_id": ZONE1,
            "disk_offering_id": CUSTOM_DISK,
            "service_offering_id": MEDIUM_SO,
            "network_id": ISOLATED,
            **settings,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["config"]["oma_vm_id"] == OMA_VM
    r = await oma.post("/discovery/add-vms", json={"vm_names": [vm.name]})
    assert r.status_code == 200, r.text
    r = await oma.post(
        "/network-mappings",
        json={"vm_id": vm.moref, "source_network_name": "VM Network", "destination_network_id": ISOLATED},
    )
    assert r.status_code == 201, r.text


async def replica_volumes(cloud: LabCloudStack) -> list[dict[str, Any]]:
    """The replica volumes CloudStack has (the OMA names them ``oma-vol-…``)."""
    return [v for v in (await cloud.state())["volumes"] if v["name"].startswith("oma-vol-")]


async def replica_links(cloud: LabCloudStack) -> list[str]:
    """The device links of the replica volumes on the OMA VM."""
    ids = [v["id"] for v in await replica_volumes(cloud)]
    links = (await cloud.state())["device_links"]
    return sorted(name for name in links if any(cloud.link(i).name == name for i in ids))


def assert_targets_equal(job: dict[str, Any], vm: LabVM) -> None:
    """Each disk's target is its CloudStack volume's device, equal to the source (the volume is
    whole GiB: what lies beyond the disk reads as zeroes)."""
    by_id = {f"disk-{d.key}": d for d in vm.disks}
    assert sorted(d["disk_id"] for d in job["disks"]) == sorted(by_id)
    for d in job["disks"]:
        device = Path(d["volume_path"])
        assert d["cloudstack_volume_id"], d
        assert device.name == f"virtio-{d['cloudstack_volume_id'].replace('-', '')[:20]}"
        assert device.resolve().stat().st_size >= by_id[d["disk_id"]].capacity
        assert images_equal(device, by_id[d["disk_id"]].image), d["disk_id"]


async def assert_nothing_left(cloud: LabCloudStack) -> None:
    state = await cloud.state()
    assert [v for v in state["volumes"] if v["name"].startswith("oma-vol-")] == [], state["volumes"]
    # only the OMA VM's own disks have a device link; every volume file left is one of a volume
    volumes = [v for v in state["volumes"] if v["virtualmachineid"] == OMA_VM]
    assert sorted(state["device_links"]) == sorted(cloud.link(v["id"]).name for v in volumes)
    assert len(state["files"]["primary"]) == len([v for v in state["volumes"] if v["path"]]), state
    assert state["pending_jobs"] == [], state["pending_jobs"]


async def test_full_then_incremental_into_cloudstack_volumes(
    product: Product, cloud: LabCloudStack, vm1: LabVM
) -> None:
    await configure(product, cloud, vm1)

    job = await product.wait((await product.replicate(vm1))["id"])
    assert job["status"] == "completed", job["error_message"]
    assert {d["copy_mode"] for d in job["disks"]} == {"full"}
    assert_targets_equal(job, vm1)
    volumes = {d["disk_id"]: d["cloudstack_volume_id"] for d in job["disks"]}
    in_cloud = {v["id"]: v for v in await replica_volumes(cloud)}
    assert sorted(in_cloud) == sorted(volumes.values())
    for v in in_cloud.values():  # custom offering, whole GiB, attached to the OMA VM (kept attached)
        assert v["diskofferingid"] == CUSTOM_DISK and v["size"] == 1 << 30
        assert v["virtualmachineid"] == OMA_VM and v["type"] == "DATADISK"
    assert await replica_links(cloud) == sorted(cloud.link(v).name for v in volumes.values())

    # the guest writes; the incremental pass reuses the same volumes, still attached
    await trio.to_thread.run_sync(
        lambda: vm1.disks[0].guest.rewrite_random_chunks(5, chunk=64 * 1024, seed=7)
    )
    await trio.to_thread.run_sync(vm1.disks[1].guest.write, 5 * MiB, b"\xa5" * 4096)
    second = await product.replicate(vm1)
    assert second["replication_type"] == "incremental"
    job = await product.wait(second["id"])
    assert job["status"] == "completed", job["error_message"]
    assert {d["copy_mode"] for d in job["disks"]} == {"incremental"}
    assert job["bytes_transferred"] < 1 * MiB
    assert {d["disk_id"]: d["cloudstack_volume_id"] for d in job["disks"]} == volumes
    assert_targets_equal(job, vm1)
    assert sorted(v["id"] for v in await replica_volumes(cloud)) == sorted(volumes.values())

    # deleting the replication with its volumes: detached and deleted in CloudStack
    r = await product.oma.delete(f"/replications/{second['id']}", params={"delete_volumes": "true"})
    assert r.status_code == 200, r.text
    deleted = r.json()["volumes_deleted"]
    assert sorted(d["cloudstack_volume_id"] for d in deleted) == sorted(volumes.values())
    await assert_nothing_left(cloud)
    # and the next pass is a full one into new volumes
    job = await product.wait((await product.replicate(vm1))["id"])
    assert job["status"] == "completed", job["error_message"]
    assert {d["copy_mode"] for d in job["disks"]} == {"full"}
    assert not set(volumes.values()) & {d["cloudstack_volume_id"] for d in job["disks"]}
    assert_targets_equal(job, vm1)


FAULTS = {
    "create_refused": ({"command": "createVolume", "mode": "error", "errorcode": 530}, "createVolume"),
    "create_job_failed": ({"command": "createVolume", "mode": "job_failure"}, "createVolume"),
    "attach_job_failed": ({"command": "attachVolume", "mode": "job_failure"}, "attachVolume"),
    "device_never_appears": ({"command": "attachVolume", "mode": "drop_device_link"}, "did not appear"),
    "attach_beyond_deadline": (
        {"command": "attachVolume", "mode": "delay", "seconds": JOB_TIMEOUT_S + 2},
        "attachVolume",
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_a_cloudstack_fault_ends_the_job_cleanly_and_a_retry_succeeds(
    product: Product, cloud: LabCloudStack, vm1: LabVM, fault: str
) -> None:
    injected, says = FAULTS[fault]
    await configure(product, cloud, vm1)
    await cloud.fault(**injected)

    job = await product.wait((await product.replicate(vm1))["id"], within=90)
    assert job["status"] == "failed"
    assert says in (job["error_message"] or ""), job["error_message"]
    assert await cloud.pending_faults() == []
    if injected["mode"] == "delay":  # CloudStack's late job ends (the volume is gone by then)
        with trio.fail_after(JOB_TIMEOUT_S + 5):
            while (await cloud.state())["pending_jobs"]:
                await trio.sleep(0.1)
    await assert_nothing_left(cloud)
    rows = (
        await product.oma.extra["app"]
        .extensions["oma"]
        .db.fetch("SELECT state, cloudstack_volume_id, error_message FROM replica_volumes")
    )
    assert rows and all(r["state"] == "failed" and r["cloudstack_volume_id"] is None for r in rows), rows

    retry = await product.replicate(vm1)
    assert retry["replication_type"] == "initial"
    job = await product.wait(retry["id"])
    assert job["status"] == "completed", job["error_message"]
    assert_targets_equal(job, vm1)
    assert len(await replica_volumes(cloud)) == 2
