"""Retention (oma/backups/retention.py) over real chains: the service the app runs groups each
enabled policy's points by disk and repository and hands them to the lead's
``chains.apply_retention``, which merges in the primary and in every copy repository."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from backup_fixtures import (
    BackupPoint,
    build_chain,
    create_local_repository,
    db_of,
    key_of,
    qemu_img_compare,
    run_backup_oma,
    wait_for_copies,
)
from oma_harness import Oma, make_config, run_oma
from test_backups import BackupLab, MiB, assert_point_is, pattern, setup_lab
from vma_double import VmaDouble

from oma.backups import copies, immutability
from oma.backups.layout import backup_path
from oma.backups.retention import RETENTION_KEY, RetentionService
from pyapp import mover

DAY = dt.timedelta(days=1)


@pytest.fixture
async def oma(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> AsyncIterator[Oma]:
    # The services run (copies are needed); retention's own first run finds an empty database.
    async with run_backup_oma(tmp_path, oma_dsn, vma.base_url, run_backups=True) as handle:
        yield handle


def service_of(oma: Oma) -> RetentionService:
    service: RetentionService = oma.extra["app"].extensions[RETENTION_KEY]
    return service


async def make_policy(oma: Oma, name: str, primary: str, *copy_to: str, **fields: Any) -> str:
    r = await oma.post(
        "/policies",
        json={
            "name": name,
            "primary_repository_id": primary,
            "retention_days": 7,
            "copy_rules": [{"destination_repository_id": d} for d in copy_to],
            **fields,
        },
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def ages(*days: int) -> list[dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return [now - d * DAY for d in days]


async def test_expired_points_merge_in_primary_and_copy(oma: Oma, tmp_path: Path) -> None:
    primary = await create_local_repository(oma, "primary", tmp_path / "primary")
    offsite = await create_local_repository(oma, "offsite", tmp_path / "offsite")
    policy = await make_policy(oma, "daily", primary, offsite)
    db = db_of(oma)
    chain = await build_chain(
        db, tmp_path / "work", tmp_path / "primary", primary, points=4, policy_id=policy,
        created_at=ages(20, 15, 10, 1), snapshots=True,
    )  # fmt: skip
    await copies.enqueue_policy_copies(db, chain[-1].backup_id)
    for point in chain:
        assert [c["status"] for c in await wait_for_copies(oma, point.backup_id)] == ["completed"]

    run = await service_of(oma).run_once()
    kept = chain[3]
    assert run.skipped is None and run.policies == 1 and run.disks == 1
    assert run.chains_examined == 1
    assert sorted(run.points_removed) == sorted(p.backup_id for p in chain[:3])
    assert run.new_fulls == [kept.backup_id] and run.postponed == [] and run.failed == []

    row = await db.fetchrow("SELECT parent_backup_id, backup_type, disk_digest FROM backup_jobs")
    assert await db.fetchval("SELECT count(*) FROM backup_jobs") == 1
    assert row is not None and row["parent_backup_id"] is None and row["backup_type"] == "full"
    assert row["disk_digest"] == kept.disk_digest
    copy_row = await db.fetchrow("SELECT status, file_path FROM backup_copies")
    assert copy_row is not None and copy_row["status"] == "completed"
    for root in (tmp_path / "primary", tmp_path / "offsite"):
        image = backup_path(root, key_of("web01"), "disk-2000", kept.backup_id)
        assert (await mover.info(image))["depth"] == 1  # standalone now
        assert kept.snapshot is not None
        compared = qemu_img_compare(image, kept.snapshot)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        assert (await mover.verify(str(image))).ok
        assert sorted(p.name for p in image.parent.iterdir()) == sorted(
            [image.name, image.name + ".manifest"]
        )

    status = (await oma.get("/policies/retention-status")).json()
    assert status["running"] is True and status["interval_seconds"] == oma.config.retention_interval
    last = status["last_run"]
    assert status["last_run_at"] == last["finished_at"]
    assert last["points_removed_count"] == 3 and last["new_fulls"] == [kept.backup_id]
    assert last["postponed_count"] == 0 and last["finished_at"] is not None
    assert last["ran_by"].startswith(socket.gethostname() + ":")  # recorded for every OMA process


async def test_locks_postpone_and_grouping(oma: Oma, tmp_path: Path) -> None:
    locked = await create_local_repository(
        oma, "locked", tmp_path / "locked", immutable=True, immutable_days=30
    )
    plain = await create_local_repository(oma, "plain", tmp_path / "plain")
    db = db_of(oma)
    on_locked = await make_policy(oma, "locked", locked)
    on_plain = await make_policy(oma, "plain", plain)
    paused = await make_policy(oma, "paused", plain, enabled=False)

    # Two disks under one policy, each its own group; a disabled policy's and an orphan's points.
    work = tmp_path / "work"
    chains: dict[str, list[BackupPoint]] = {
        "locked": await build_chain(
            db, work, tmp_path / "locked", locked, points=2, policy_id=on_locked, created_at=ages(12, 9)
        ),
        "disk-a": await build_chain(
            db, work, tmp_path / "plain", plain, points=2, policy_id=on_plain, created_at=ages(12, 9),
            disk_id="disk-a",
        ),
        "disk-b": await build_chain(
            db, work, tmp_path / "plain", plain, points=2, policy_id=on_plain, created_at=ages(12, 2),
            disk_id="disk-b",
        ),
        "paused": await build_chain(
            db, work, tmp_path / "plain", plain, points=2, policy_id=paused, created_at=ages(12, 9),
            vm_name="db01",
        ),
        "orphan": await build_chain(
            db, work, tmp_path / "plain", plain, points=2, created_at=ages(12, 9), vm_name="old01"
        ),
    }  # fmt: skip

    run = await service_of(oma).run_once()
    assert run.policies == 2 and run.disks == 3 and run.failed == []
    # Both points of disk-a expired: the older merges into the newer, which always stays.
    assert sorted(run.points_removed) == sorted(
        [chains["disk-a"][0].backup_id, chains["disk-b"][0].backup_id]
    )
    (postponed,) = run.postponed
    assert postponed["policy_id"] == on_locked and postponed["repository_id"] == locked
    assert "immutable" in postponed["reason"] and chains["locked"][0].backup_id in postponed["reason"]
    left = {r["id"] for r in await db.fetch("SELECT id FROM backup_jobs")}
    for name in ("locked", "paused", "orphan"):
        assert {p.backup_id for p in chains[name]} <= left, name

    # A later run, past the lock: the locked chain is merged then.
    later = await service_of(oma).run_once(now=dt.datetime.now(dt.UTC) + 40 * DAY)
    assert chains["locked"][0].backup_id in later.points_removed and later.postponed == []
    status = (await oma.get("/policies/retention-status")).json()["last_run"]
    assert status["now"] > status["started_at"]


@pytest.fixture
async def lab(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> AsyncIterator[BackupLab]:
    """The backup engine against the VMA double (tests/oma/test_backups.py's lab)."""
    config = make_config(tmp_path, oma_dsn, vma.base_url, run_backups=True, engine_poll_interval=0.1)
    async with run_oma(config) as handle:
        yield await setup_lab(handle, vma, tmp_path)


async def test_engine_locks_points_below_the_database(lab: BackupLab, tmp_path: Path) -> None:
    """A point the engine completes in an immutable local repository carries the immutable
    attribute on its image, manifest and lock record: root's ``rm`` fails, and a database edit
    that unlocks the repository does not make the API delete it."""
    vault = await create_local_repository(
        lab.oma, "vault", tmp_path / "vault", immutable=True, immutable_days=7
    )
    answer = (await lab.oma.get(f"/repositories/{vault}")).json()
    assert answer["immutability"] == "enforced", answer
    assert (await lab.oma.get(f"/repositories/{lab.repository_id}")).json()["immutability"] is None
    point = await lab.backup("full", repository_id=vault)
    image = Path(point["file_path"])
    record = immutability.read_lock(image)
    assert record is not None and record.backup_id == point["backup_id"]
    shown = dt.datetime.fromisoformat(point["locked_until"])  # the API shows milliseconds
    assert abs(record.locked_until - shown) < dt.timedelta(milliseconds=1)
    for path in immutability.point_files(image):
        assert immutability.is_immutable(path), path
    rm = subprocess.run(["rm", "-f", str(image)], capture_output=True, text=True, check=False)
    assert rm.returncode != 0 and "Operation not permitted" in rm.stderr

    await db_of(lab.oma).execute("UPDATE backup_repositories SET immutable = false WHERE id = $1", vault)
    r = await lab.oma.delete(f"/backup/{point['backup_id']}")
    assert r.status_code == 409 and r.json()["code"] == "IMMUTABLE", r.text
    assert "lock record" in r.json()["error"]
    assert image.is_file()

    # A point whose record has ended is released by the retention run (the attribute cleared).
    run = await service_of(lab.oma).run_once(now=dt.datetime.now(dt.UTC) + 8 * DAY)
    assert point["backup_id"] in run.locks_released, run
    assert not any(immutability.is_immutable(p) for p in immutability.point_files(image))


async def test_immutable_longer_than_retention_starts_new_fulls_and_expires_old_chains_whole(
    lab: BackupLab, tmp_path: Path
) -> None:
    """``immutable_days`` (30) beyond ``retention_days`` (7): the expired points of a chain can
    never be merged into a newer point (that one is always still locked), so once the chain is
    older than the retention an incremental of the policy becomes a new full; the old chain
    goes whole once every point of it is past retention and lock — never merged."""
    vault = await create_local_repository(
        lab.oma, "vault", tmp_path / "vault", immutable=True, immutable_days=30
    )
    policy = await make_policy(lab.oma, "locked-daily", vault)
    db = db_of(lab.oma)
    old = [await lab.backup("full", policy_id=policy, repository_id=None)]
    lab.disk.write(3 * MiB, pattern(7, 64 * 1024))
    old.append(await lab.backup("incremental", policy_id=policy, repository_id=None))
    assert old[1]["backup_type"] == "incremental"
    # A chain within the retention keeps growing.
    lab.disk.write(4 * MiB, pattern(8, 64 * 1024))
    old.append(await lab.backup("incremental", policy_id=policy, repository_id=None))
    assert old[2]["backup_type"] == "incremental" and old[2]["chain_id"] == old[0]["backup_id"]
    # Ten days later (rows aged; the files' lock records keep their real dates).
    await db.execute(
        "UPDATE backup_jobs SET created_at = created_at - interval '10 days',"
        " completed_at = completed_at - interval '10 days'"
    )
    lab.disk.write(5 * MiB, pattern(9, 64 * 1024))
    new = await lab.backup("incremental", policy_id=policy, repository_id=None)
    assert new["requested_type"] == "incremental" and new["backup_type"] == "full", new
    assert new["parent_backup_id"] is None and new["chain_id"] == new["backup_id"]
    old_ids = [p["backup_id"] for p in old]

    # Past the retention, inside the lock: nothing is merged, the old chain waits whole.
    run = await service_of(lab.oma).run_once(now=dt.datetime.now(dt.UTC) + 8 * DAY)
    assert run.points_removed == [] and run.failed == [], run
    assert any("immutable" in p["reason"] for p in run.postponed), run
    assert all(Path(p["file_path"]).is_file() for p in old)
    # Past every lock of the old chain (its records say created now + 30 days): it goes whole,
    # the new chain stays.
    run = await service_of(lab.oma).run_once(now=dt.datetime.now(dt.UTC) + 31 * DAY)
    assert sorted(run.points_removed) == sorted(old_ids) and run.new_fulls == [], run
    assert run.failed == [], run
    for point in old:
        image = Path(point["file_path"])
        assert not image.exists() and not immutability.lock_path(image).exists()
    left = [r["id"] for r in await db.fetch("SELECT id FROM backup_jobs WHERE status = 'completed'")]
    assert left == [new["backup_id"]]
    assert_point_is(Path(new["file_path"]), lab.state(new["backup_id"]))
