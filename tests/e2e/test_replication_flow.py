"""The product's main flow end to end: discovery through the OMA, a full pass, guest writes, an
incremental pass that moves only the changed extents, target volumes equal to the source byte for
byte, no snapshot left in the lab; a target export killed mid-copy; two VMs at once; a new volume
always gets a full pass (an explicit initial pass after earlier ones; after a lost volume file,
which fails the automatic pass with what to do); a disk grown between passes."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from lab import DiskSpec, LabVM, MiB, Partition
from tests.e2e.conftest import Product, hold_copy
from tests.vma.conftest import images_equal, snapshot_names

pytestmark = pytest.mark.e2e


def accepts(uri: str) -> bool:
    host, port = uri.removeprefix("nbd://").split("/")[0].rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


async def no_snapshots(product: Product, vm: LabVM) -> list[tuple[str, str]]:
    return await trio.to_thread.run_sync(snapshot_names, product.lab, vm.name)


def assert_targets_equal(job: dict[str, Any], vm: LabVM) -> None:
    by_id = {f"disk-{d.key}": d for d in vm.disks}
    assert sorted(d["disk_id"] for d in job["disks"]) == sorted(by_id)
    for d in job["disks"]:
        volume = Path(d["volume_path"])
        assert volume.stat().st_size == by_id[d["disk_id"]].capacity
        assert images_equal(volume, by_id[d["disk_id"]].image), d["disk_id"]


async def test_discover_full_then_incremental(product: Product, vm1: LabVM) -> None:
    r = await product.oma.post("/discovery/add-vms", json={"vm_names": ["vm1"]})
    assert r.status_code == 200, r.text
    assert [a["vm_name"] for a in r.json()["added"]] == ["vm1"]
    inventory = (await product.oma.get(f"/vms/{vm1.moref}")).json()
    assert len(inventory["disks"]) == 2  # a VM with two disks, known from discovery

    # full pass into new zeroed volumes
    first = await product.replicate(vm1)
    assert first["replication_type"] == "initial" and first["status"] == "pending"
    job = await product.wait(first["id"])
    assert job["status"] == "completed", job["error_message"]
    assert_targets_equal(job, vm1)
    assert {d["copy_mode"] for d in job["disks"]} == {"full"}
    full_bytes, volumes = job["bytes_transferred"], {d["volume_path"] for d in job["disks"]}
    assert 0 < full_bytes <= sum(d.capacity for d in vm1.disks)
    assert await no_snapshots(product, vm1) == []
    assert not any(accepts(d["nbd_uri"]) for d in job["disks"])  # exports closed
    bases = {d["disk_id"]: d["change_id"] for d in job["disks"]}
    assert all(bases.values())
    assert (await product.oma.get(f"/vm-contexts/{vm1.name}")).json()["context"][
        "current_status"
    ] == "replicated"

    # the guest writes: 5 chunks of 64 KiB on the first disk, one 4 KiB block on the second
    changed = await trio.to_thread.run_sync(
        lambda: vm1.disks[0].guest.rewrite_random_chunks(5, chunk=64 * 1024, seed=7)
    )
    await trio.to_thread.run_sync(vm1.disks[1].guest.write, 5 * MiB, os.urandom(4096))
    changed_bytes = sum(n for _, n in changed) + 4096

    second = await product.replicate(vm1)
    assert second["replication_type"] == "incremental"
    job = await product.wait(second["id"])
    assert job["status"] == "completed", job["error_message"]
    assert {d["copy_mode"] for d in job["disks"]} == {"incremental"}
    # only the changed extents moved (CBT rounds to 512-byte blocks), not the disks
    assert changed_bytes <= job["bytes_transferred"] <= changed_bytes + 2 * 4096, job
    assert job["bytes_transferred"] < min(full_bytes, sum(d.capacity for d in vm1.disks)) / 5
    assert_targets_equal(job, vm1)
    assert {d["volume_path"] for d in job["disks"]} == volumes  # the same volumes, written in place
    assert all(d["change_id"] and d["change_id"] != bases[d["disk_id"]] for d in job["disks"])
    assert await no_snapshots(product, vm1) == []
    progress = (await product.oma.get(f"/replications/{second['id']}/progress")).json()
    assert progress["status"] == "completed" and progress["bytes_transferred"] == job["bytes_transferred"]


async def test_export_killed_mid_copy_fails_cleanly_and_next_run_repairs(
    product: Product, vm1: LabVM
) -> None:
    await product.oma.post("/discovery/add-vms", json={"vm_names": ["vm1"]})
    base = await product.wait((await product.replicate(vm1))["id"])
    assert base["status"] == "completed"
    before = {d["disk_id"]: await product.change_id(vm1, d["disk_id"]) for d in base["disks"]}

    await trio.to_thread.run_sync(
        lambda: vm1.disks[0].guest.rewrite_random_chunks(24, chunk=256 * 1024, seed=3)
    )
    job_id = (await product.replicate(vm1))["id"]
    # Freeze the first disk's qemu-nbd once the engine has started it, so that the copy cannot
    # finish before the kill; kill it once the VMA's mover is copying into it.
    process = await hold_copy(product, job_id)
    os.kill(process.pid, signal.SIGKILL)

    job = await product.wait(job_id)
    assert job["status"] == "failed"
    assert job["error_message"] and "copy" in job["error_message"], job["error_message"]
    assert await no_snapshots(product, vm1) == []  # the VMA removed its snapshot
    after = {d["disk_id"]: await product.change_id(vm1, d["disk_id"]) for d in base["disks"]}
    assert after == before  # the change IDs did not advance
    assert not any(d["active"] for d in job["disks"])
    assert not any(accepts(d["nbd_uri"]) for d in job["disks"])

    repair = await product.replicate(vm1)
    assert repair["replication_type"] == "incremental"
    job = await product.wait(repair["id"])
    assert job["status"] == "completed", job["error_message"]
    assert_targets_equal(job, vm1)
    assert await no_snapshots(product, vm1) == []


async def test_two_vms_at_once(product: Product, vm1: LabVM) -> None:
    vm2 = await trio.to_thread.run_sync(
        lambda: product.lab.create_vm(
            "vm2", [DiskSpec(24 * MiB, [Partition(12 * MiB, "ext4", "root", {"etc/hostname": b"vm2\n"})])]
        )
    )
    r = await product.oma.post("/discovery/add-vms", json={"vm_names": ["vm1", "vm2"]})
    assert r.json()["added_count"] == 2
    jobs = [await product.replicate(vm1), await product.replicate(vm2)]
    done = [await product.wait(j["id"]) for j in jobs]
    for job, vm in zip(done, (vm1, vm2), strict=True):
        assert job["status"] == "completed", job["error_message"]
        assert_targets_equal(job, vm)
        assert await no_snapshots(product, vm) == []
    # both ran side by side: the second started before the first completed
    assert done[1]["started_at"] < done[0]["completed_at"]


async def guest_writes(vm: LabVM, seed: int) -> None:
    await trio.to_thread.run_sync(
        lambda: vm.disks[0].guest.rewrite_random_chunks(6, chunk=64 * 1024, seed=seed)
    )
    await trio.to_thread.run_sync(vm.disks[1].guest.write, 3 * MiB + seed * 4096, os.urandom(4096))


async def test_an_initial_replication_after_earlier_passes_is_a_full_pass(
    product: Product, vm1: LabVM
) -> None:
    await product.oma.post("/discovery/add-vms", json={"vm_names": ["vm1"]})
    first = await product.wait((await product.replicate(vm1))["id"])
    assert first["status"] == "completed", first["error_message"]
    await guest_writes(vm1, 11)

    # The operator asks for an initial replication: a new zeroed volume generation, so the pass
    # must copy everything — never the areas changed since a change ID the new volume never got.
    again = await product.replicate(vm1, replication_type="initial")
    assert again["replication_type"] == "initial"
    job = await product.wait(again["id"])
    assert job["status"] == "completed", job["error_message"]
    assert {d["copy_mode"] for d in job["disks"]} == {"full"}
    assert all(d["base_change_id"] is None for d in job["disks"])
    assert {d["volume_generation"] for d in job["disks"]} == {2}
    assert_targets_equal(job, vm1)

    # The next automatic pass builds on the new generation.
    await guest_writes(vm1, 12)
    job = await product.wait((await product.replicate(vm1))["id"])
    assert job["status"] == "completed", job["error_message"]
    assert job["replication_type"] == "incremental"
    assert {d["copy_mode"] for d in job["disks"]} == {"incremental"}
    assert_targets_equal(job, vm1)


async def test_a_lost_volume_file_is_refused_and_an_initial_replication_copies_everything(
    product: Product, vm1: LabVM
) -> None:
    await product.oma.post("/discovery/add-vms", json={"vm_names": ["vm1"]})
    first = await product.wait((await product.replicate(vm1))["id"])
    assert first["status"] == "completed", first["error_message"]
    await guest_writes(vm1, 21)
    for d in first["disks"]:
        Path(d["volume_path"]).unlink()

    # The automatic job builds on a base whose volume is gone: it fails and says what to do.
    auto = await product.wait((await product.replicate(vm1))["id"])
    assert auto["status"] == "failed" and "run an initial replication" in auto["error_message"]
    assert await no_snapshots(product, vm1) == []

    # Doing exactly that: a new volume generation and a full pass, never an incremental one.
    job = await product.wait((await product.replicate(vm1, replication_type="initial"))["id"])
    assert job["status"] == "completed", job["error_message"]
    assert {d["copy_mode"] for d in job["disks"]} == {"full"}
    assert all(d["base_change_id"] is None for d in job["disks"])
    assert job["bytes_transferred"] > 0
    assert_targets_equal(job, vm1)

    # and the next automatic pass builds on it
    await guest_writes(vm1, 22)
    job = await product.wait((await product.replicate(vm1))["id"])
    assert job["status"] == "completed", job["error_message"]
    assert {d["copy_mode"] for d in job["disks"]} == {"incremental"}
    assert_targets_equal(job, vm1)


async def test_a_disk_grown_between_passes(product: Product, vm1: LabVM) -> None:
    await product.oma.post("/discovery/add-vms", json={"vm_names": ["vm1"]})
    first = await product.wait((await product.replicate(vm1))["id"])
    assert first["status"] == "completed", first["error_message"]

    grown = await trio.to_thread.run_sync(product.lab.grow_disk, vm1, 0, 48 * MiB)
    await trio.to_thread.run_sync(grown.disks[0].guest.write, 40 * MiB, os.urandom(64 * 1024))  # new area
    await guest_writes(grown, 31)
    r = await product.oma.post("/discovery/add-vms", json={"vm_names": ["vm1"]})  # the inventory learns it
    assert r.status_code == 200, r.text
    inventory = (await product.oma.get(f"/vms/{vm1.moref}")).json()
    assert {d["id"]: d["capacity_bytes"] for d in inventory["disks"]}[f"disk-{vm1.disks[0].key}"] == 48 * MiB

    job = await product.wait((await product.replicate(grown))["id"])
    assert job["status"] == "completed", job["error_message"]
    assert {d["copy_mode"] for d in job["disks"]} == {"incremental"}
    assert {d["volume_path"] for d in job["disks"]} == {d["volume_path"] for d in first["disks"]}
    assert_targets_equal(job, grown)
