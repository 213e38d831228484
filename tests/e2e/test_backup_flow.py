"""Backups end to end: the real OMA (backup engine on), the real VMA (export jobs) and the vSphere
lab. A full then incremental backups of a lab disk with guest writes between them, each point
read through its chain equal to the disk as it was; a CBT reset turning an incremental into a
new full; no snapshot left behind; deleting the newest point; an export the VMA cannot make (vCenter
refuses the login) failing the backup with the VMA's reason."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from oma.backups.layout import manifest_path
from oma.state import STATE_KEY, OmaState
from pyapp import mover
from pyapp.lab import LabVM
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
