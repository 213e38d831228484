"""Removing backup points (oma/backups/chains.py) on real QCOW2 chains written by the mover.

Each test builds a full and three incrementals of a small disk, keeping the disk as it was at
every point, and checks after each removal that every remaining point still reads back exactly
(``qemu-img compare``), verifies against its manifest, and keeps its digest.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from backup_fixtures import build_chain, data_cluster_offset, flip_byte, qemu_img_compare, state_of
from oma_harness import Oma

from oma.backups import chains, immutability, verify
from oma.backups.layout import manifest_path
from pyapp import mover
from pyapp.api import ApiError
from pyapp.db import Database


@dataclass
class Chain:
    ids: list[str]
    states: list[Path]  # the disk as it was at each point
    files: list[Path]
    repo_root: Path


async def add_repository(db: Database, repo_id: str, root: Path, *, immutable_days: int = 0) -> None:
    await db.execute(
        "INSERT INTO backup_repositories (id, name, type, config, immutable, immutable_days)"
        " VALUES ($1, $1, 'local', $2, $3, $4)",
        repo_id,
        json.dumps({"disk_path": str(root)}),
        immutable_days > 0,
        immutable_days,
    )


async def make_chain(
    db: Database, tmp_path: Path, repo_id: str = "repo-a", *, immutable_days: int = 0
) -> Chain:
    """A full and three incrementals made 10, 7, 4 and 1 days ago, with the disk at each point."""
    root = tmp_path / repo_id
    root.mkdir()
    await add_repository(db, repo_id, root, immutable_days=immutable_days)
    now = dt.datetime.now(dt.UTC)
    points = await build_chain(
        db,
        tmp_path / "work",
        root,
        repo_id,
        points=4,
        created_at=[now - dt.timedelta(days=d) for d in (10, 7, 4, 1)],
        snapshots=True,
    )
    return Chain(
        [p.backup_id for p in points],
        [p.snapshot for p in points if p.snapshot],
        [p.path for p in points],
        root,
    )


async def assert_restorable(db: Database, backup_id: str, state: Path) -> None:
    row = await db.fetchrow("SELECT file_path, disk_digest, status FROM backup_jobs WHERE id = $1", backup_id)
    assert row is not None and row["status"] == "completed"
    done = qemu_img_compare(Path(row["file_path"]), state)
    assert done.returncode == 0, done.stdout + done.stderr
    report = await mover.verify(row["file_path"])
    assert report.mismatches == [] and report.found_digest == row["disk_digest"]


async def test_delete_keeps_every_other_point(oma: Oma, tmp_path: Path) -> None:
    st = state_of(oma)
    db = st.db
    chain = await make_chain(db, tmp_path)
    mounts = tmp_path / "mounts"

    with pytest.raises(ApiError) as middle:
        await chains.delete_backup(db, st.box, mounts, chain.ids[1])
    assert middle.value.status == 409 and middle.value.code == chains.CHAIN_DEPENDENCY

    answer = await chains.delete_backup(db, st.box, mounts, chain.ids[0])
    assert answer["merged_into"] == chain.ids[1]
    assert not chain.files[0].exists() and not manifest_path(chain.files[0]).exists()
    info = await mover.info(chain.files[1])
    assert info["depth"] == 1
    row = await db.fetchrow(
        "SELECT backup_type, parent_backup_id FROM backup_jobs WHERE id = $1", chain.ids[1]
    )
    assert row is not None and (row["backup_type"], row["parent_backup_id"]) == ("full", None)
    for backup_id, state in zip(chain.ids[1:], chain.states[1:], strict=True):
        await assert_restorable(db, backup_id, state)

    answer = await chains.delete_backup(db, st.box, mounts, chain.ids[3])
    assert "merged_into" not in answer
    assert not chain.files[3].exists()
    assert await db.fetchval("SELECT count(*) FROM backup_jobs") == 2
    await assert_restorable(db, chain.ids[2], chain.states[2])

    with pytest.raises(ApiError) as missing:
        await chains.delete_backup(db, st.box, mounts, chain.ids[3])
    assert missing.value.status == 404


async def test_locks_and_mounts_refuse_deletion(oma: Oma, tmp_path: Path) -> None:
    st = state_of(oma)
    db = st.db
    chain = await make_chain(db, tmp_path, immutable_days=30)
    with pytest.raises(ApiError) as locked:
        await chains.delete_backup(db, st.box, tmp_path, chain.ids[3])
    assert locked.value.code == chains.IMMUTABLE and "until" in locked.value.message
    assert chain.files[3].exists()

    await db.execute("UPDATE backup_repositories SET immutable = false")
    await db.execute(
        "INSERT INTO restore_mounts (id, backup_id, status, expires_at)"
        " VALUES ('mount-1', $1, 'mounted', now())",
        chain.ids[3],
    )
    with pytest.raises(ApiError) as mounted:
        await chains.delete_backup(db, st.box, tmp_path, chain.ids[3])
    assert mounted.value.code == chains.MOUNTED
    status = await db.fetchval("SELECT status FROM backup_jobs WHERE id = $1", chain.ids[3])
    assert status == "completed" and chain.files[3].exists()


async def copy_chain(db: Database, chain: Chain, tmp_path: Path, repo_id: str) -> list[Path]:
    """Copies of every point in a second repository, as the copy worker lays them out."""
    root = tmp_path / repo_id
    root.mkdir()
    await add_repository(db, repo_id, root)
    copies = []
    for backup_id, image in zip(chain.ids, chain.files, strict=True):
        target = root / image.relative_to(chain.repo_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
        shutil.copyfile(manifest_path(image), manifest_path(target))
        await db.execute(
            "INSERT INTO backup_copies (id, backup_id, repository_id, status, file_path, verified)"
            " VALUES ($1, $2, $3, 'completed', $4, true)",
            f"copy-{backup_id}",
            backup_id,
            repo_id,
            str(target),
        )
        copies.append(target)
    return copies


async def test_retention_merges_expired_points_everywhere(oma: Oma, tmp_path: Path) -> None:
    st = state_of(oma)
    db = st.db
    chain = await make_chain(db, tmp_path)  # points at -10, -7, -4 and -1 days
    copies = await copy_chain(db, chain, tmp_path, "repo-b")
    now = dt.datetime.now(dt.UTC)

    result = await chains.apply_retention(db, st.box, tmp_path / "mounts", chain.ids, 5, now)
    assert result.removed == chain.ids[:2] and result.new_fulls == [chain.ids[2]], result
    assert result.postponed == [] and result.failed == []
    for path in (*chain.files[:2], *copies[:2]):
        assert not path.exists()
    for backup_id, state in zip(chain.ids[2:], chain.states[2:], strict=True):
        await assert_restorable(db, backup_id, state)
    for copy, state in zip(copies[2:], chain.states[2:], strict=True):
        done = subprocess.run(
            ["qemu-img", "compare", str(copy), str(state)], capture_output=True, check=False
        )
        assert done.returncode == 0
    assert (await mover.info(copies[2]))["depth"] == 1

    # Everything expired: the newest point stays, as the full.
    later = now + dt.timedelta(days=30)
    result = await chains.apply_retention(db, st.box, tmp_path / "mounts", chain.ids[2:], 5, later)
    assert result.removed == [chain.ids[2]] and result.new_fulls == [chain.ids[3]]
    await assert_restorable(db, chain.ids[3], chain.states[3])
    assert sorted(os.listdir(chain.files[3].parent)) == sorted(
        [chain.files[3].name, manifest_path(chain.files[3]).name]
    )


async def test_retention_postpones_locked_points(oma: Oma, tmp_path: Path) -> None:
    st = state_of(oma)
    db = st.db
    chain = await make_chain(db, tmp_path, immutable_days=30)
    result = await chains.apply_retention(db, st.box, tmp_path, chain.ids, 5, dt.datetime.now(dt.UTC))
    assert result.removed == [] and len(result.postponed) == 1
    assert "immutable" in result.postponed[0]["reason"]
    assert all(f.exists() for f in chain.files)
    statuses = await db.fetch("SELECT DISTINCT status FROM backup_jobs")
    assert [r["status"] for r in statuses] == ["completed"]


async def test_verify_finds_a_flipped_byte_in_any_layer(oma: Oma, tmp_path: Path) -> None:
    st = state_of(oma)
    db = st.db
    chain = await make_chain(db, tmp_path)
    clean = await verify.verify_backup(db, st.box, tmp_path, chain.ids[3])
    assert clean["ok"] and [len(r["files"]) for r in clean["replicas"]] == [4]

    flip_byte(chain.files[1], data_cluster_offset(chain.files[1]) + 100)
    found = await verify.verify_backup(db, st.box, tmp_path, chain.ids[3])
    assert not found["ok"]
    files = {f["image"]: f for f in found["replicas"][0]["files"]}
    # The layer holding the byte, and the newer layers reading through it, disagree with their
    # manifests; the full below it does not.
    assert files[str(chain.files[0])]["ok"]
    bad = files[str(chain.files[1])]
    assert not bad["ok"] and bad["mismatch_count"] == 1 and bad["mismatches"][0]["length"] > 0


async def test_a_locked_point_holds_below_the_database(oma: Oma, tmp_path: Path) -> None:
    """Locked files (lock record + the file system's immutable attribute) cannot be removed or
    overwritten even by root; unlocking the repository in the database does not let the API or
    retention remove them before the record's date; after it, retention clears the attribute
    and merges as usual."""
    st = state_of(oma)
    db = st.db
    chain = await make_chain(db, tmp_path, immutable_days=30)
    now = dt.datetime.now(dt.UTC)
    rows = await db.fetch("SELECT id, file_path, created_at FROM backup_jobs ORDER BY created_at")
    for row in rows:
        until = row["created_at"] + dt.timedelta(days=30)
        mode = immutability.lock_point(Path(row["file_path"]), row["id"], row["created_at"], until, now)
        assert mode == "enforced"
    newest = chain.files[3]
    for path in immutability.point_files(newest):
        assert immutability.is_immutable(path), path
        with pytest.raises(PermissionError):
            path.unlink()
    rm = subprocess.run(["rm", "-f", str(newest)], capture_output=True, text=True, check=False)
    assert rm.returncode != 0 and "Operation not permitted" in rm.stderr
    dd = subprocess.run(
        ["dd", "if=/dev/zero", f"of={newest}", "bs=4096", "count=1", "conv=notrunc"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert dd.returncode != 0 and "Operation not permitted" in dd.stderr
    await assert_restorable(db, chain.ids[3], chain.states[3])
    record = immutability.read_lock(newest)
    assert record is not None and record.backup_id == chain.ids[3]
    assert record.files == (newest.name, manifest_path(newest).name)

    # A database edit does not unlock: the API and retention read the point's own record.
    await db.execute("UPDATE backup_repositories SET immutable = false, immutable_days = 0")
    with pytest.raises(ApiError) as locked:
        await chains.delete_backup(db, st.box, tmp_path, chain.ids[3])
    assert locked.value.status == 409 and locked.value.code == chains.IMMUTABLE
    assert "lock record" in locked.value.message
    result = await chains.apply_retention(db, st.box, tmp_path, chain.ids, 5, now)
    assert result.removed == [] and "lock record" in result.postponed[0]["reason"], result
    # Nor does a second, shorter lock: the first record counts.
    immutability.lock_point(newest, chain.ids[3], now, now + dt.timedelta(seconds=1), now)
    assert immutability.locked_until(newest) == record.locked_until
    assert all(f.exists() for f in chain.files)

    # Past every lock: the attribute is cleared and the expired points merge as usual.
    later = now + dt.timedelta(days=40)
    result = await chains.apply_retention(db, st.box, tmp_path, chain.ids, 5, later)
    assert result.removed == chain.ids[:3] and result.new_fulls == [chain.ids[3]], result
    for path in chain.files[:3]:
        assert not path.exists() and not immutability.lock_path(path).exists()
    assert not any(immutability.is_immutable(p) for p in immutability.point_files(newest))
    await assert_restorable(db, chain.ids[3], chain.states[3])
