"""Backups end to end with real data: a lab VM whose disk holds ext4, XFS and FAT partitions with
known files; a full and three incremental backups through the VMA and CBT, the guest changing its
files between them; every point browsed and its files downloaded (one by one, and as zip and
tar.gz archives) equal to what the guest had then; a copy rule to a second repository; an
immutability refusal; path traversal refused; retention merging the oldest points, after which
every remaining point restores the same files and keeps its digest; and a flipped byte in a
repository file reported by a verify run."""

from __future__ import annotations

import datetime as dt
import io
import random
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import trio

from lab import DiskSpec, LabVM, MiB, Partition, rewrite_partition
from oma.backups.retention import RETENTION_KEY, RetentionService
from tests.e2e.conftest import Product
from tests.oma.backup_fixtures import data_cluster_offset, flip_byte

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Tree = dict[str, bytes]
PARTS = {1: "ext4", 2: "xfs", 3: "fat"}


def initial_trees(rng: random.Random) -> dict[int, Tree]:
    return {
        1: {
            "etc/hostname": b"files1\n",
            "etc/app/config.ini": b"[main]\nthreads = 4\n",
            "var/data/blob.bin": rng.randbytes(300_000),
        },
        2: {
            "srv/www/index.html": b"<h1>version 1</h1>\n",
            "srv/www/img/logo.bin": rng.randbytes(1 << 20),
            "srv/empty.txt": b"",
        },
        3: {"EFI/BOOT/BOOTX64.EFI": rng.randbytes(65_536), "readme.txt": b"first\r\n"},
    }


def changes(rng: random.Random) -> list[dict[int, Tree]]:
    """What the guest changes before each incremental: the new trees of the partitions touched."""
    return [
        {1: {"etc/hostname": b"files1-renamed\n", "var/data/new.bin": rng.randbytes(70_000)}},
        {2: {"srv/www/index.html": b"<h1>version 2</h1>\n", "srv/www/img/logo2.bin": rng.randbytes(200_000)}},
        {3: {"readme.txt": b"second, and longer\r\n"}, 1: {"var/data/blob.bin": rng.randbytes(300_000)}},
    ]


async def wait_backup(product: Product, backup_id: str, within: float = 120.0) -> dict[str, Any]:
    with trio.fail_after(within):
        while True:
            r = await product.oma.get(f"/backup/{backup_id}")
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            if body["status"] in ("completed", "failed", "cancelled"):
                assert body["status"] == "completed", body
                return body
            await trio.sleep(0.2)


async def wait_copies(product: Product, backup_id: str, within: float = 60.0) -> list[dict[str, Any]]:
    with trio.fail_after(within):
        while True:
            r = await product.oma.get(f"/backups/{backup_id}/copies")
            copies: list[dict[str, Any]] = r.json()
            if copies and all(c["status"] in ("completed", "failed") for c in copies):
                return copies
            await trio.sleep(0.2)


async def check_point(product: Product, backup_id: str, trees: dict[int, Tree], *, archives: bool) -> None:
    """Mount the point and compare every partition's files with ``trees``; then unmount."""
    oma = product.oma
    r = await oma.post("/restore/mount", json={"backup_id": backup_id})
    assert r.status_code == 201, r.text
    mount_id = r.json()["mount_id"]
    try:
        root = (await oma.get(f"/restore/{mount_id}/files", params={"path": "/"})).json()
        assert sorted(f["name"] for f in root["files"]) == [f"part{n}" for n in PARTS]
        for number, tree in trees.items():
            r = await oma.get(
                f"/restore/{mount_id}/files", params={"path": f"/part{number}", "recursive": "true"}
            )
            assert r.status_code == 200, r.text
            listed = {
                f["path"].removeprefix(f"/part{number}/")
                for f in r.json()["files"]
                if f["type"] == "file"
                and not f["path"].removeprefix(f"/part{number}/").startswith("lost+found")
            }
            assert listed == set(tree), (backup_id, number)
            for rel, data in tree.items():
                r = await oma.get(f"/restore/{mount_id}/download", params={"path": f"/part{number}/{rel}"})
                assert r.status_code == 200 and r.content == data, (backup_id, number, rel)
                assert int(r.headers["content-length"]) == len(data)
            if archives:
                for fmt in ("zip", "tar.gz"):
                    r = await oma.get(
                        f"/restore/{mount_id}/download-directory",
                        params={"path": f"/part{number}", "format": fmt},
                    )
                    assert r.status_code == 200, r.text
                    assert unpack(r.content, fmt) == tree, (backup_id, number, fmt)
    finally:
        r = await oma.delete(f"/restore/{mount_id}")
        assert r.status_code == 200, r.text


def unpack(blob: bytes, fmt: str) -> Tree:
    """The regular files of an archive (lost+found and directories left out), by relative path."""
    out: Tree = {}
    if fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            for info in z.infolist():
                if not info.is_dir():
                    out[info.filename] = z.read(info)
    else:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as t:
            for member in t.getmembers():
                if member.isfile():
                    f = t.extractfile(member)
                    assert f is not None
                    out[member.name] = f.read()
    prefix = next(iter(out), "").split("/", 1)[0] + "/" if out and all("/" in k for k in out) else ""
    tree = {k.removeprefix(prefix): v for k, v in out.items()}
    return {k: v for k, v in tree.items() if not k.startswith("lost+found")}


@pytest.fixture
def files_vm(product: Product) -> tuple[LabVM, dict[int, Tree]]:
    trees = initial_trees(random.Random(11))
    vm = product.lab.create_vm(
        "files1",
        [
            DiskSpec(
                400 * MiB,
                [
                    Partition(32 * MiB, "ext4", "root", trees[1]),
                    Partition(300 * MiB, "xfs", "srv", trees[2]),
                    Partition(32 * MiB, "fat", "ESP", trees[3]),
                ],
            )
        ],
        guest_id="ubuntu64Guest",
    )
    return vm, trees


async def test_backups_restore_copies_retention(
    product: Product, files_vm: tuple[LabVM, dict[int, Tree]], tmp_path: Path
) -> None:
    vm, trees = files_vm
    oma = product.oma
    disk = vm.disks[0]
    disk_id = f"disk-{disk.key}"
    r = await oma.post("/discovery/add-vms", json={"vm_names": [vm.name]})
    assert r.status_code == 200, r.text

    repo_a = await oma.post(
        "/repositories",
        json={"name": "primary", "type": "local", "config": {"disk_path": str(tmp_path / "a")}},
    )
    repo_b = await oma.post(
        "/repositories",
        json={
            "name": "offsite",
            "type": "local",
            "config": {"disk_path": str(tmp_path / "b")},
            "immutable": True,
            "immutable_days": 1,
        },
    )
    assert repo_a.status_code == 201 and repo_b.status_code == 201, (repo_a.text, repo_b.text)
    a, b = repo_a.json()["id"], repo_b.json()["id"]
    r = await oma.post(
        "/policies",
        json={
            "name": "nightly",
            "enabled": True,
            "primary_repository_id": a,
            "retention_days": 7,
            "copy_rules": [
                {"destination_repository_id": b, "copy_mode": "immediate", "verify_after_copy": True}
            ],
        },
    )
    assert r.status_code == 201, r.text
    policy = r.json()["id"]

    # A full and three incrementals, the guest changing files between them.
    points: list[dict[str, Any]] = []
    states: list[dict[int, Tree]] = []
    current = {n: dict(t) for n, t in trees.items()}
    for i, change in enumerate([{}, *changes(random.Random(12))]):
        for number, new in change.items():
            current[number].update(new)
            if number == 2 and i == 2:
                del current[2]["srv/www/img/logo.bin"]
            await trio.to_thread.run_sync(rewrite_partition, disk.guest, disk.layout, number, current[number])
        r = await oma.post(
            "/backup/start",
            json={
                "vm_name": vm.name,
                "disk_id": disk_id,
                "backup_type": "full" if i == 0 else "incremental",
                "repository_id": a,
                "policy_id": policy,
            },
        )
        assert r.status_code in (201, 202), r.text
        point = await wait_backup(product, r.json()["backup_id"])
        assert point["backup_type"] == ("full" if i == 0 else "incremental")
        if i:
            assert point["parent_backup_id"] == points[-1]["backup_id"]
            assert 0 < point["changed_bytes"] < disk.capacity // 10
        points.append(point)
        states.append({n: dict(t) for n, t in current.items()})
        copies = await wait_copies(product, point["backup_id"])
        assert [(c["repository_id"], c["status"], c["verified"]) for c in copies] == [(b, "completed", True)]
        assert copies[0]["disk_digest"] == point["disk_digest"]

    chain = (await oma.get("/backup/chain", params={"vm_name": vm.name, "disk_id": disk_id})).json()
    assert [p["backup_id"] for p in chain["backups"]] == [p["backup_id"] for p in points]

    # Every point restores the files the guest had then.
    for i, (point, state) in enumerate(zip(points, states, strict=True)):
        await check_point(product, point["backup_id"], state, archives=i in (0, 3))

    # Path traversal is refused.
    mount_id = (await oma.post("/restore/mount", json={"backup_id": points[3]["backup_id"]})).json()[
        "mount_id"
    ]
    for bad in ("/part1/../../etc/passwd", "../etc/passwd", "/part1/etc/../../..", "/part2/srv/\x00x"):
        r = await oma.get(f"/restore/{mount_id}/download", params={"path": bad})
        assert r.status_code == 400 and r.json()["code"] == "PATH_TRAVERSAL", (bad, r.text)
    assert (await oma.delete(f"/restore/{mount_id}")).status_code == 200

    # Immutability: the newest point's copy is locked for a day.
    r = await oma.delete(f"/backup/{points[3]['backup_id']}")
    assert r.status_code == 409 and r.json()["code"] == "IMMUTABLE", r.text

    # Retention: the two oldest points are 10 days old; two days on, the copies' locks are over.
    st = oma.extra["app"].extensions["oma"]
    await st.db.execute(
        "UPDATE backup_jobs SET created_at = now() - interval '10 days' WHERE id = ANY($1::text[])",
        [p["backup_id"] for p in points[:2]],
    )
    retention: RetentionService = oma.extra["app"].extensions[RETENTION_KEY]
    run = await retention.run_once(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    assert run is not None
    left = (await oma.get("/backup/list", params={"vm_name": vm.name})).json()
    assert sorted(p["backup_id"] for p in left["backups"]) == sorted(p["backup_id"] for p in points[2:])
    for point, state in zip(points[2:], states[2:], strict=True):
        now = (await oma.get(f"/backup/{point['backup_id']}")).json()
        assert now["disk_digest"] == point["disk_digest"]
        await check_point(product, point["backup_id"], state, archives=False)
    assert (await oma.get(f"/backup/{points[2]['backup_id']}")).json()["backup_type"] == "full"

    # Verification: clean, then a flipped byte in the primary repository's full is found.
    r = await oma.post(f"/backup/{points[3]['backup_id']}/verify")
    assert r.status_code == 200 and r.json()["ok"], r.text
    full = Path(points[2]["file_path"])
    flip_byte(full, data_cluster_offset(full) + 1234)
    r = await oma.post(f"/backup/{points[3]['backup_id']}/verify")
    report = r.json()
    assert r.status_code == 200 and not report["ok"]
    primary = next(rep for rep in report["replicas"] if rep["repository_id"] == a)
    copy = next(rep for rep in report["replicas"] if rep["repository_id"] == b)
    assert not primary["ok"] and copy["ok"]
    assert any(f["image"] == str(full) and f["mismatch_count"] >= 1 for f in primary["files"])
