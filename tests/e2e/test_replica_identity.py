"""Two VMs never share a target volume, a change ID, a context or a job lock: replicas are keyed by
the VM's identity (its vCenter and managed object id), never its name. Two variants, each with two
lab VMs replicated at the same time: names that fold to the same file name (``c2 vm``, ``c2_vm``)
and one name in two folders (``/DC0/vm/dupa``, ``/DC0/vm/f2/dupa``). Every target volume is
compared byte for byte with its own VM's disk after a full and after an incremental pass."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from lab import DiskSpec, LabVM, MiB, Partition
from tests.e2e.conftest import Product
from tests.e2e.test_replication_flow import assert_targets_equal, no_snapshots

pytestmark = pytest.mark.e2e


def spec(tag: str) -> list[DiskSpec]:
    files = {"etc/hostname": f"{tag}\n".encode(), "srv/data.bin": os.urandom(512 * 1024)}
    return [DiskSpec(24 * MiB, [Partition(12 * MiB, "ext4", "root", files)])]


async def create(product: Product, name: str, **kwargs: Any) -> LabVM:
    vm: LabVM = await trio.to_thread.run_sync(lambda: product.lab.create_vm(name, spec(name), **kwargs))
    return vm


async def replicate_at_once(product: Product, vms: list[tuple[LabVM, str]]) -> list[dict[str, Any]]:
    """One job per (VM, inventory path), all created before any ends; waits for all."""
    ids = []
    for vm, path in vms:
        body = {"source_vm": {"name": vm.name, "path": path, "id": vm.moref}}
        r = await product.oma.post("/replications", json=body)
        assert r.status_code == 201, r.text  # never "already has an active job": another VM's lock
        ids.append(r.json()["id"])
    return [await product.wait(job_id) for job_id in ids]


async def two_passes(product: Product, vms: list[tuple[LabVM, str]]) -> None:
    first = await replicate_at_once(product, vms)
    for job, (vm, _) in zip(first, vms, strict=True):
        assert job["status"] == "completed", job["error_message"]
        assert {d["copy_mode"] for d in job["disks"]} == {"full"}
        assert_targets_equal(job, vm)
        assert await no_snapshots(product, vm) == []
    volumes = [d["volume_path"] for job in first for d in job["disks"]]
    assert len(set(volumes)) == len(volumes), volumes  # one volume per VM disk
    assert first[1]["started_at"] < first[0]["completed_at"]  # they ran side by side

    for i, (vm, _) in enumerate(vms):  # each guest writes something else
        rewrite = partial(vm.disks[0].guest.rewrite_random_chunks, 4, chunk=64 * 1024, seed=40 + i)
        await trio.to_thread.run_sync(rewrite)
    second = await replicate_at_once(product, vms)
    for job, (vm, _) in zip(second, vms, strict=True):
        assert job["status"] == "completed", job["error_message"]
        assert {d["copy_mode"] for d in job["disks"]} == {"incremental"}
        assert_targets_equal(job, vm)
    assert [d["volume_path"] for job in second for d in job["disks"]] == volumes


async def test_vms_whose_names_fold_together_keep_their_own_volumes(product: Product) -> None:
    a = await create(product, "c2 vm", directory="c2-vm-a")
    b = await create(product, "c2_vm", directory="c2-vm-b")
    r = await product.oma.post("/discovery/add-vms", json={"vm_names": ["c2 vm", "c2_vm"]})
    assert r.json()["added_count"] == 2, r.text
    await two_passes(product, [(a, "/DC0/vm/c2 vm"), (b, "/DC0/vm/c2_vm")])
    contexts = (await product.oma.get("/vm-contexts", params={"search": "c2"})).json()["vm_contexts"]
    assert sorted(c["vmware_vm_id"] for c in contexts) == sorted([a.moref, b.moref])
    for vm in (a, b):  # each volume lives under its VM's identity, not its name
        assert {Path(p).parent.name for p in await volume_paths(product, vm)} == {vm.moref}


async def volume_paths(product: Product, vm: LabVM) -> list[str]:
    jobs = (await product.oma.get("/replications", params={"vm_name": vm.name})).json()["replications"]
    job = await product.job(jobs[0]["id"])
    return [d["volume_path"] for d in job["disks"]]


async def test_vms_of_one_name_in_two_folders_keep_their_own_volumes(product: Product) -> None:
    a = await create(product, "dupa", directory="dupa-a")
    b = await create(product, "dupa", folder="f2", directory="dupa-b")
    r = await product.oma.post("/discovery/add-vms", json={"vm_names": ["dupa"]})
    await two_passes(product, [(a, "/DC0/vm/dupa"), (b, "/DC0/vm/f2/dupa")])
    assert r.json()["added_count"] == 2, r.text  # one name, two VMs: two contexts
    r = await product.oma.get("/vm-contexts/dupa")
    assert r.status_code == 409 and "context id" in r.json()["error"], r.text  # the name is ambiguous
    contexts = (await product.oma.get("/vm-contexts", params={"search": "dupa"})).json()["vm_contexts"]
    assert sorted(c["vm_path"] for c in contexts) == ["/DC0/vm/dupa", "/DC0/vm/f2/dupa"]
    for c in contexts:
        ctx = (await product.oma.get(f"/vm-contexts/{c['context_id']}")).json()
        assert ctx["context"]["current_status"] == "replicated" and len(ctx["job_history"]) == 2
