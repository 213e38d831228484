"""Backups end to end: the real OMA (backup engine on), the real VMA (export jobs) and the vSphere
lab. A full then incremental backups of a lab disk with guest writes between them, each point
read through its chain equal to the disk as it was; a CBT reset turning an incremental into a
new full; no snapshot left behind; deleting the newest point; an export the VMA cannot make (vCenter
refuses the login) failing the backup with the VMA's reason."""

from __future__ import annotations

import json
import random
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio
from pyVim.task import WaitForTask
from pyVmomi import vim

from lab import DiskSpec, LabVM, MiB, Partition
from oma.backups.layout import manifest_path, vm_key
from oma.state import STATE_KEY, OmaState
from pyapp import mover
from tests.e2e.conftest import Product
from tests.vma.conftest import snapshot_names

pytestmark = pytest.mark.e2e

TERMINAL = ("completed", "failed", "cancelled")


def state_of(product: Product) -> OmaState:
    st: OmaState = product.oma.extra["app"].extensions[STATE_KEY]
    return st


async def wait_backup(product: Product, backup_id: str, within: float = 60.0) -> dict[str, Any]:
    """Poll the OMA until the backup has ended and the engine has let it go (export released)."""
    engine = state_of(product).backup_engine
    assert engine is not None
    with trio.fail_after(within):
        while True:
            point: dict[str, Any] = (await product.oma.get(f"/backup/{backup_id}")).json()
            if point["status"] in TERMINAL and backup_id not in engine.backups:
                return point
            await trio.sleep(0.05)


def assert_point_is(point: dict[str, Any], frozen: Path) -> None:
    path = Path(point["file_path"])
    r = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(path), str(frozen)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, f"{path} differs from {frozen}: {r.stdout}{r.stderr}"
    r = subprocess.run(["qemu-img", "check", "-q", str(path)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert manifest_path(path).is_file()


async def test_backups_of_a_lab_disk(product: Product, vm1: LabVM, tmp_path: Path) -> None:
    r = await product.oma.post("/discovery/add-vms", json={"vm_names": ["vm1"]})
    assert r.status_code == 200 and r.json()["added_count"] == 1, r.text
    db = state_of(product).db
    repository_id = f"repo-{uuid.uuid4().hex[:12]}"
    root = tmp_path / "repository"
    await db.execute(
        "INSERT INTO backup_repositories (id, name, type, config) VALUES ($1, 'e2e', 'local', $2::jsonb)",
        repository_id,
        json.dumps({"disk_path": str(root)}),
    )
    disk = vm1.disks[0]
    disk_id = f"disk-{disk.key}"
    frozen = tmp_path / "frozen"
    frozen.mkdir()

    async def backup(backup_type: str, expect_mode: str) -> dict[str, Any]:
        r = await product.oma.post(
            "/backup/start",
            json={
                "vm_name": "vm1",
                "disk_id": "0",
                "backup_type": backup_type,
                "repository_id": repository_id,
            },
        )
        assert r.status_code == 202, r.text
        assert r.json()["disk_id"] == disk_id
        point = await wait_backup(product, r.json()["backup_id"])
        assert point["status"] == "completed", point["error_message"]
        # nothing writes the lab disk while the point is taken: the disk now is the point's disk
        copy = frozen / f"{point['backup_id']}.raw"
        subprocess.run(["cp", "--sparse=always", str(disk.image), str(copy)], check=True)
        assert_point_is(point, copy)
        report = await mover.verify(point["file_path"])
        assert report.ok and report.found_digest == point["disk_digest"]
        assert point["virtual_size_bytes"] == disk.capacity
        changed = (await mover.checksum(str(copy))).disk_digest
        assert changed == point["disk_digest"]
        assert await trio.to_thread.run_sync(snapshot_names, product.lab, "vm1") == []
        assert (await product.oma.get(f"/backup/{point['backup_id']}")).json()["copy_mode"] == expect_mode
        return point

    full = await backup("full", "full")
    assert full["backup_type"] == "full" and full["change_id"]

    written = await trio.to_thread.run_sync(
        lambda: disk.guest.rewrite_random_chunks(5, chunk=64 * 1024, seed=11)
    )
    changed_bytes = sum(n for _, n in written)
    incr = await backup("incremental", "incremental")
    assert incr["backup_type"] == "incremental" and incr["parent_backup_id"] == full["backup_id"]
    assert incr["chain_id"] == full["backup_id"] and incr["change_id"] != full["change_id"]
    # only the changed areas were read (CBT rounds to 512-byte blocks), and stored as an overlay
    assert changed_bytes <= incr["changed_bytes"] <= changed_bytes + 2 * 4096, incr
    assert incr["stored_bytes"] < full["stored_bytes"]

    await trio.to_thread.run_sync(lambda: disk.guest.rewrite_random_chunks(2, chunk=64 * 1024, seed=12))
    second = await backup("incremental", "incremental")
    assert second["parent_backup_id"] == incr["backup_id"]
    chain = (await product.oma.get("/backup/chain", params={"vm_name": "vm1"})).json()
    assert [b["backup_id"] for b in chain["backups"]] == [
        full["backup_id"],
        incr["backup_id"],
        second["backup_id"],
    ]

    # vSphere resets CBT: the incremental asked for becomes a full, the start of a new chain
    await trio.to_thread.run_sync(disk.guest.reset_cbt)
    await trio.to_thread.run_sync(lambda: disk.guest.rewrite_random_chunks(1, chunk=64 * 1024, seed=13))
    reset = await backup("incremental", "full-cbt-reset")
    assert reset["backup_type"] == "full" and reset["requested_type"] == "incremental"
    assert reset["parent_backup_id"] is None and reset["chain_id"] == reset["backup_id"]

    # the newest point of the old chain can go; its parent stays restorable
    r = await product.oma.delete(f"/backup/{second['backup_id']}")
    assert r.status_code == 200, r.text
    assert not Path(second["file_path"]).exists()
    assert_point_is(incr, frozen / f"{incr['backup_id']}.raw")


async def test_a_backup_the_vma_cannot_export_fails_with_its_reason(
    product: Product, vm1: LabVM, tmp_path: Path
) -> None:
    await product.oma.post("/discovery/add-vms", json={"vm_names": ["vm1"]})
    db = state_of(product).db
    await db.execute(
        "INSERT INTO backup_repositories (id, name, type, config)"
        " VALUES ('repo-e2e', 'e2e', 'local', $1::jsonb)",
        json.dumps({"disk_path": str(tmp_path / "repository")}),
    )
    credential = (await product.oma.get("/vmware-credentials/default")).json()["id"]
    r = await product.oma.put(f"/vmware-credentials/{credential}", json={"password": "not-the-password"})
    assert r.status_code == 200, r.text
    r = await product.oma.post(
        "/backup/start",
        json={
            "vm_name": "vm1",
            "disk_id": f"disk-{vm1.disks[1].key}",
            "backup_type": "full",
            "repository_id": "repo-e2e",
        },
    )
    assert r.status_code == 202, r.text
    point = await wait_backup(product, r.json()["backup_id"])
    assert point["status"] == "failed" and "before serving the disk" in point["error_message"], point
    assert "refused the login" in point["error_message"], point
    assert point["file_path"] is None and not list((tmp_path / "repository").rglob("*.qcow2"))
    assert await trio.to_thread.run_sync(snapshot_names, product.lab, "vm1") == []


def _lab_vm(product: Product, name: str, seed: int, folder: str | None = None) -> LabVM:
    """A one-disk lab VM whose disk holds its own random data (``seed``); created under a
    temporary name and renamed, so two VMs may share ``name`` (in two folders)."""
    data = random.Random(seed).randbytes(2 * MiB)
    vm = product.lab.create_vm(
        f"{name}-{seed}".replace(" ", "-"),
        [
            DiskSpec(
                32 * MiB, [Partition(16 * MiB, "ext4", "root", {"who.txt": name.encode(), "data.bin": data})]
            )
        ],
    )
    si = product.lab.connect()
    content = si.RetrieveContent()
    dc = next(e for e in content.rootFolder.childEntity if isinstance(e, vim.Datacenter) and e.name == "DC0")
    managed = next(
        v for v in dc.vmFolder.childEntity if isinstance(v, vim.VirtualMachine) and v._moId == vm.moref
    )
    if folder is not None:
        target = next(
            (f for f in dc.vmFolder.childEntity if isinstance(f, vim.Folder) and f.name == folder), None
        )
        target = target or dc.vmFolder.CreateFolder(folder)
        WaitForTask(target.MoveIntoFolder_Task([managed]))
    WaitForTask(managed.Rename_Task(name))
    return LabVM(name, vm.moref, vm.uuid, vm.disks)


async def test_vms_whose_names_collide_keep_their_own_chains(product: Product, tmp_path: Path) -> None:
    """Names never key a backup (issue 12, item 2): ``c2 vm`` and ``c2_vm`` (one name once
    sanitised), and ``dupa`` in two folders, each backed up at the same time as its twin, full
    then incremental after each guest writes: every point reads as its own VM's disk, never the
    other's, and each VM has its own chain directory."""
    vms = {
        "/DC0/vm/c2 vm": await trio.to_thread.run_sync(_lab_vm, product, "c2 vm", 21),
        "/DC0/vm/c2_vm": await trio.to_thread.run_sync(_lab_vm, product, "c2_vm", 22),
        "/DC0/vm/dupa": await trio.to_thread.run_sync(_lab_vm, product, "dupa", 23),
        "/DC0/vm/f2/dupa": await trio.to_thread.run_sync(_lab_vm, product, "dupa", 24, "f2"),
    }
    r = await product.oma.post("/discovery/discover-vms", json={})  # the inventory: paths, morefs, disks
    assert r.status_code == 200, r.text
    discovered = {vm["path"]: vm for vm in r.json()["discovered_vms"]}
    assert {p: discovered[p]["id"] for p in vms} == {p: vm.moref for p, vm in vms.items()}
    db = state_of(product).db
    vcenter = r.json()["vcenter"]["host"]
    # One managed VM each. (VM contexts were one per name; the replication half of the issue
    # keys them by identity too: until then the second "dupa" cannot be added by discovery.)
    await db.execute("ALTER TABLE vm_contexts DROP CONSTRAINT IF EXISTS vm_contexts_vm_name_key")
    contexts: dict[str, str] = {}
    for path, vm in vms.items():
        contexts[path] = f"ctx-{uuid.uuid4().hex[:12]}"
        await db.execute(
            "INSERT INTO vm_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host, datacenter)"
            " VALUES ($1, $2, $3, $4, $5, 'DC0')",
            contexts[path],
            vm.name,
            vm.moref,
            path,
            vcenter,
        )
    repository_id = f"repo-{uuid.uuid4().hex[:12]}"
    root = tmp_path / "repository"
    await db.execute(
        "INSERT INTO backup_repositories (id, name, type, config) VALUES ($1, 'e2e', 'local', $2::jsonb)",
        repository_id,
        json.dumps({"disk_path": str(root)}),
    )
    r = await product.oma.post(
        "/backup/start",
        json={"vm_name": "dupa", "disk_id": "0", "backup_type": "full", "repository_id": repository_id},
    )
    assert r.status_code == 409 and r.json()["code"] == "AMBIGUOUS_VM", r.text  # a name picks no VM

    frozen = tmp_path / "frozen"
    frozen.mkdir()

    async def backup_all(backup_type: str) -> dict[str, dict[str, Any]]:
        """One backup of every VM's disk, all started before any ends; each point compared with
        its own VM's disk as it is now (nothing writes meanwhile)."""
        started: dict[str, str] = {}
        for path in vms:
            r = await product.oma.post(
                "/backup/start",
                json={
                    "vm_context_id": contexts[path],
                    "disk_id": "0",
                    "backup_type": backup_type,
                    "repository_id": repository_id,
                },
            )
            assert r.status_code == 202, (path, r.text)
            started[path] = r.json()["backup_id"]
        points = {path: await wait_backup(product, backup_id) for path, backup_id in started.items()}
        for path, point in points.items():
            assert point["status"] == "completed", (path, point["error_message"])
            assert point["vm_key"] == vm_key(vcenter, vms[path].moref), point
            copy = frozen / f"{point['backup_id']}.raw"
            subprocess.run(["cp", "--sparse=always", str(vms[path].disks[0].image), str(copy)], check=True)
            assert_point_is(point, copy)
            assert (await mover.checksum(str(copy))).disk_digest == point["disk_digest"]
        return points

    fulls = await backup_all("full")
    for i, vm in enumerate(vms.values()):  # each guest writes its own data
        await trio.to_thread.run_sync(
            lambda vm=vm, i=i: vm.disks[0].guest.rewrite_random_chunks(3, chunk=64 * 1024, seed=40 + i)
        )
    incrementals = await backup_all("incremental")
    for path, point in incrementals.items():
        assert point["parent_backup_id"] == fulls[path]["backup_id"], (path, point)
        assert point["backup_type"] == "incremental" and point["copy_mode"] == "incremental"
        assert Path(point["file_path"]).parent == Path(fulls[path]["file_path"]).parent
    directories = [Path(p["file_path"]).parent for p in fulls.values()]
    assert len(set(directories)) == len(vms), directories  # one chain directory per VM
    digests = [p["disk_digest"] for p in incrementals.values()]
    assert len(set(digests)) == len(vms)  # and four different disks
    for path in vms:
        chain = (
            await product.oma.get("/backup/chain", params={"vm_context_id": contexts[path], "disk_id": "0"})
        ).json()
        assert [b["backup_id"] for b in chain["backups"]] == [
            fulls[path]["backup_id"],
            incrementals[path]["backup_id"],
        ], (path, chain)
