"""Snapshots in the lab CloudStack: real copies of the volume file, CloudStack's KVM rule for
volumes of running VMs, revert only while the VM is stopped."""

from __future__ import annotations

from pathlib import Path

import trio

from .cloudstack_fixtures import (
    OMA_VM,
    CloudStackLab,
    cloudstack_fixture,  # noqa: F401 -- the cloudstack fixture
    read_at,
    seed_with,
    start_lab,
    write_at,
)

KVM_REFUSAL = (
    "KVM Snapshot is not supported for Running VMs. It is disabled by default due to a possible volume"
    " corruption in certain cases. To enable it set global settings kvm.snapshot.enabled to True. See the"
    " documentation for more details."
)


async def test_snapshot_of_a_running_vms_volume_is_refused_by_default(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    await cloudstack.ok("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    response = await cloudstack.call("createSnapshot", volumeid=volume["id"])
    assert response.status_code == 530
    assert response.json() == {
        "createsnapshotresponse": {
            "uuidList": [],
            "errorcode": 530,
            "cserrorcode": 4250,
            "errortext": KVM_REFUSAL,
        }
    }
    assert await cloudstack.api("listSnapshots") == {}


async def test_snapshot_of_an_allocated_volume_is_refused(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    response = await cloudstack.call("createSnapshot", volumeid=volume["id"])
    assert response.status_code == 431
    assert response.json()["createsnapshotresponse"]["errortext"] == (
        f"VolumeId: {volume['id']} is not in Ready state but Allocated. Cannot take snapshot."
    )


async def test_snapshot_copies_and_revert_restores(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    await cloudstack.ok("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    write_at(cloudstack.link(volume["id"]), 1 << 20, b"before the snapshot")
    await cloudstack.ok("detachVolume", id=volume["id"])  # a detached volume: no KVM restriction
    accepted = await cloudstack.api("createSnapshot", volumeid=volume["id"], name="first")
    assert set(accepted) == {"id", "jobid"}
    snapshot = (await cloudstack.job(accepted["jobid"]))["jobresult"]["snapshot"]
    assert (
        snapshot["id"] == accepted["id"] and snapshot["state"] == "BackedUp" and snapshot["name"] == "first"
    )
    assert snapshot["volumeid"] == volume["id"] and snapshot["virtualsize"] == volume["size"]
    copy = cloudstack.data_dir / "secondary" / "snapshots" / snapshot["id"]
    assert read_at(copy, 1 << 20, 19) == b"before the snapshot"
    assert copy.stat().st_blocks * 512 < 1 << 20 < copy.stat().st_size  # holes kept
    write_at(cloudstack.volume_file(volume["id"]), 1 << 20, b"after the snapshot!")
    reverted = await cloudstack.ok("revertSnapshot", id=snapshot["id"])
    assert reverted["snapshot"]["id"] == snapshot["id"]
    assert read_at(cloudstack.volume_file(volume["id"]), 1 << 20, 19) == b"before the snapshot"
    listed = await cloudstack.api("listSnapshots", volumeid=volume["id"])
    assert listed["count"] == 1 and listed["snapshot"][0]["snapshottype"] == "MANUAL"
    assert await cloudstack.ok("deleteSnapshot", id=snapshot["id"]) == {"success": True}
    assert not copy.exists()
    assert await cloudstack.api("listSnapshots") == {}
    again = await cloudstack.run("deleteSnapshot", id=snapshot["id"])
    assert again["jobstatus"] == 2 and again["jobresultcode"] == 431


async def test_revert_is_refused_while_the_vm_runs(tmp_path: Path, nursery: trio.Nursery) -> None:
    lab = await start_lab(
        nursery, tmp_path / "cs", seed=seed_with(configuration={"kvm.snapshot.enabled": True})
    )
    assert (await lab.api("listCapabilities"))["capability"]["kvmsnapshotenabled"] is True
    vm = await lab.new_vm()
    volume = await lab.new_volume()
    await lab.ok("attachVolume", id=volume["id"], virtualmachineid=vm["id"])
    snapshot = (await lab.ok("createSnapshot", volumeid=volume["id"]))["snapshot"]  # allowed by the setting
    assert snapshot["name"].startswith(f"{vm['displayname']}_{volume['name']}_")
    refused = await lab.run("revertSnapshot", id=snapshot["id"])
    assert refused["jobstatus"] == 2
    assert refused["jobresult"] == {
        "errorcode": 431,
        "errortext": "The VM the specified disk is attached to is not in the shutdown state.",
    }
    await lab.ok("stopVirtualMachine", id=vm["id"])
    assert (await lab.run("revertSnapshot", id=snapshot["id"]))["jobstatus"] == 1
    await lab.http.aclose()


async def test_a_volume_being_snapshotted_cannot_be_deleted(cloudstack: CloudStackLab) -> None:
    volume = await cloudstack.new_volume()
    await cloudstack.ok("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    await cloudstack.ok("detachVolume", id=volume["id"])
    assert (await cloudstack.fault(command="createSnapshot", mode="delay", seconds=2.0)).status_code == 201
    pending = await cloudstack.api("createSnapshot", volumeid=volume["id"])
    refused = await cloudstack.call("deleteVolume", id=volume["id"])
    assert refused.status_code == 431
    assert "snapshot operations in progress" in refused.json()["deletevolumeresponse"]["errortext"]
    assert (await cloudstack.job(pending["jobid"]))["jobstatus"] == 1
    assert await cloudstack.api("deleteVolume", id=volume["id"]) == {"success": True}
    snapshot = (await cloudstack.api("listSnapshots", id=pending["id"]))["snapshot"][0]
    assert snapshot["state"] == "BackedUp"  # a snapshot outlives its volume, as on secondary storage
