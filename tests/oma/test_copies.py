"""Backup copies (oma/backups/copies.py) with the real copy worker, real chains written by the
mover, and ``qemu-img`` as the oracle."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from backup_fixtures import (
    build_chain,
    create_local_repository,
    data_cluster_offset,
    db_of,
    flip_byte,
    key_of,
    mounted_tmpfs,
    qemu_img_compare,
    run_backup_oma,
    wait_for_copies,
)
from oma_harness import Oma
from vma_double import VmaDouble

from oma.backups import copies, immutability
from oma.backups.layout import backup_path, manifest_path
from pyapp import mover


@pytest.fixture
async def oma(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> AsyncIterator[Oma]:
    async with run_backup_oma(tmp_path, oma_dsn, vma.base_url, run_backups=True) as handle:
        yield handle


async def two_repositories(oma: Oma, tmp_path: Path) -> tuple[str, str]:
    return (
        await create_local_repository(oma, "primary", tmp_path / "primary"),
        await create_local_repository(oma, "offsite", tmp_path / "offsite"),
    )


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.endswith(copies.TMP_SUFFIX))


async def test_policy_copies_chain_verified(oma: Oma, tmp_path: Path) -> None:
    primary, offsite = await two_repositories(oma, tmp_path)
    r = await oma.post(
        "/policies",
        json={
            "name": "3-2-1",
            "primary_repository_id": primary,
            "retention_days": 7,
            "copy_rules": [{"destination_repository_id": offsite}],
        },
    )
    policy_id = r.json()["id"]
    db = db_of(oma)
    chain = await build_chain(db, tmp_path / "work", tmp_path / "primary", primary, policy_id=policy_id)

    # Queued for the newest point only: the ancestors the destination lacks are queued with it.
    queued = await copies.enqueue_policy_copies(db, chain[-1].backup_id)
    assert len(queued) == 3
    assert await copies.enqueue_policy_copies(db, chain[-1].backup_id) == []  # already queued

    for point in chain:
        (copy,) = await wait_for_copies(oma, point.backup_id)
        dest = backup_path(tmp_path / "offsite", key_of("web01"), "disk-2000", point.backup_id)
        assert copy["status"] == "completed", copy
        assert copy["verified"] is True and copy["error_message"] is None
        assert copy["disk_digest"] == point.disk_digest
        assert copy["repository_id"] == offsite and copy["file_path"] == str(dest)
        assert copy["size_bytes"] == point.path.stat().st_size
        assert set(copy) == {
            "copy_id", "backup_id", "repository_id", "status", "file_path", "size_bytes", "disk_digest",
            "verified", "error_message", "created_at", "started_at", "completed_at",
        }  # fmt: skip
        assert manifest_path(dest).read_bytes() == manifest_path(point.path).read_bytes()
        # The copy reads through its own chain in the destination, and equals the primary.
        compared = qemu_img_compare(dest, point.path)
        assert compared.returncode == 0, compared.stdout + compared.stderr
    top = backup_path(tmp_path / "offsite", key_of("web01"), "disk-2000", chain[-1].backup_id)
    info = await mover.info(top)
    assert all(str(tmp_path / "offsite") in layer["path"] for layer in info["layers"]), info
    assert leftovers(tmp_path / "offsite") == []

    r = await oma.get(f"/repositories/{offsite}")
    assert r.json()["backup_count"] == 3


async def test_manual_copy_and_refusals(oma: Oma, tmp_path: Path) -> None:
    primary, offsite = await two_repositories(oma, tmp_path)
    db = db_of(oma)
    full, inc = await build_chain(db, tmp_path / "work", tmp_path / "primary", primary, points=2)

    r = await oma.post(f"/backups/{inc.backup_id}/copy", json={"repository_id": offsite})
    assert r.status_code == 409 and r.json()["code"] == "NO_PARENT_COPY", r.text
    assert full.backup_id in r.json()["error"]
    r = await oma.post(f"/backups/{full.backup_id}/copy", json={"repository_id": primary})
    assert r.status_code == 409 and "already" in r.json()["error"]
    assert (await oma.post("/backups/backup-nope/copy", json={"repository_id": offsite})).status_code == 404
    r = await oma.post(f"/backups/{full.backup_id}/copy", json={"repository_id": "repo-nope"})
    assert r.status_code == 404
    assert (await oma.post(f"/backups/{full.backup_id}/copy", json={})).status_code == 422
    assert (await oma.get("/backups/backup-nope/copies")).status_code == 404
    assert (await oma.get(f"/backups/{full.backup_id}/copies")).json() == []

    r = await oma.post(f"/backups/{full.backup_id}/copy", json={"repository_id": offsite})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending" and r.json()["copy_id"].startswith("copy-")
    (copy,) = await wait_for_copies(oma, full.backup_id)
    assert copy["copy_id"] == r.json()["copy_id"] and copy["status"] == "completed"
    r = await oma.post(f"/backups/{full.backup_id}/copy", json={"repository_id": offsite})
    assert r.status_code == 409 and "completed copy" in r.json()["error"]

    # The parent has its copy now: the incremental may follow.
    r = await oma.post(f"/backups/{inc.backup_id}/copy", json={"repository_id": offsite})
    assert r.status_code == 202, r.text
    (copy,) = await wait_for_copies(oma, inc.backup_id)
    assert copy["status"] == "completed" and copy["disk_digest"] == inc.disk_digest

    await db.execute("UPDATE backup_jobs SET status = 'failed' WHERE id = $1", inc.backup_id)
    r = await oma.post(f"/backups/{inc.backup_id}/copy", json={"repository_id": primary})
    assert r.status_code == 409 and "only a completed backup" in r.json()["error"]


async def test_corrupted_primary_fails_the_copy(oma: Oma, tmp_path: Path) -> None:
    """A byte flipped in a data cluster of the primary file is copied as it is; the copy's
    verification finds the chunk, fails the copy and removes its files."""
    primary, offsite = await two_repositories(oma, tmp_path)
    (full,) = await build_chain(db_of(oma), tmp_path / "work", tmp_path / "primary", primary, points=1)
    flip_byte(full.path, data_cluster_offset(full.path) + 4096)

    r = await oma.post(f"/backups/{full.backup_id}/copy", json={"repository_id": offsite})
    assert r.status_code == 202
    (copy,) = await wait_for_copies(oma, full.backup_id)
    assert copy["status"] == "failed" and copy["verified"] is False
    assert "verification failed: 1 chunk(s)" in copy["error_message"]
    assert "differ from its manifest: chunk" in copy["error_message"]
    dest = backup_path(tmp_path / "offsite", key_of("web01"), "disk-2000", full.backup_id)
    assert not dest.exists() and not manifest_path(dest).exists()
    assert leftovers(tmp_path / "offsite") == []

    # Once the cause is fixed, asking again queues the failed copy again.
    flip_byte(full.path, data_cluster_offset(full.path) + 4096)
    r = await oma.post(f"/backups/{full.backup_id}/copy", json={"repository_id": offsite})
    assert r.status_code == 202 and r.json()["copy_id"] == copy["copy_id"]
    (copy,) = await wait_for_copies(oma, full.backup_id)
    assert copy["status"] == "completed" and copy["verified"] is True


async def test_flipped_byte_in_a_copy_is_named(oma: Oma, tmp_path: Path) -> None:
    primary, offsite = await two_repositories(oma, tmp_path)
    full, inc = await build_chain(db_of(oma), tmp_path / "work", tmp_path / "primary", primary, points=2)
    for point in (full, inc):
        await oma.post(f"/backups/{point.backup_id}/copy", json={"repository_id": offsite})
        (copy,) = await wait_for_copies(oma, point.backup_id)
        assert copy["status"] == "completed"
    top = Path(copy["file_path"])
    report = await copies.verify_copy(top, inc.disk_digest)
    assert report.ok

    # Damage in the copied overlay's own data cluster: found through the copy's chain.
    flip_byte(top, data_cluster_offset(top) + 100)
    with pytest.raises(copies.CopyError) as caught:
        await copies.verify_copy(top, inc.disk_digest)
    message = str(caught.value)
    assert message.startswith("verification failed: 1 chunk(s) of") and "at offset" in message
    assert "expected" in message and "found" in message
    with pytest.raises(copies.CopyError, match="the copy's manifest has disk digest"):
        await copies.verify_copy(Path(inc.path), full.disk_digest)


async def test_scheduled_rule_waits_for_its_pass(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> None:
    async with run_backup_oma(tmp_path, oma_dsn, vma.base_url, run_backups=True, retention_interval=3) as oma:
        primary, offsite = await two_repositories(oma, tmp_path)
        r = await oma.post(
            "/policies",
            json={
                "name": "nightly-offsite",
                "primary_repository_id": primary,
                "retention_days": 7,
                "copy_rules": [{"destination_repository_id": offsite, "copy_mode": "scheduled"}],
            },
        )
        db = db_of(oma)
        (full,) = await build_chain(
            db, tmp_path / "work", tmp_path / "primary", primary, points=1, policy_id=r.json()["id"]
        )
        assert len(await copies.enqueue_policy_copies(db, full.backup_id)) == 1
        await trio.sleep(1)
        (copy,) = (await oma.get(f"/backups/{full.backup_id}/copies")).json()
        assert copy["status"] == "pending"  # queued before the worker's pass: it waits for it
        (copy,) = await wait_for_copies(oma, full.backup_id, within=20)
        assert copy["status"] == "completed"


def test_write_copy_order(tmp_path: Path) -> None:
    """The image is in place before its manifest; an earlier attempt's manifest goes first."""
    src = tmp_path / "src.qcow2"
    src.write_bytes(os.urandom(3 << 20))
    manifest_path(src).write_bytes(b"manifest")
    dest = tmp_path / "dst" / "vm" / "disk" / "b.qcow2"
    dest.parent.mkdir(parents=True)
    manifest_path(dest).write_bytes(b"stale")

    seen: list[tuple[bool, bool]] = []

    def check() -> None:  # called between chunks: the state of the final names then
        seen.append((dest.exists(), manifest_path(dest).exists()))

    size = copies.write_copy(src, manifest_path(src), dest, check)
    assert size == 3 << 20
    assert dest.read_bytes() == src.read_bytes() and manifest_path(dest).read_bytes() == b"manifest"
    assert seen and all(state == (False, False) for state in seen)
    assert leftovers(tmp_path) == []

    copies.remove_copy_files(dest)
    assert list(dest.parent.iterdir()) == []


async def test_copy_of_a_dead_process_is_redone(oma: Oma, tmp_path: Path) -> None:
    primary, offsite = await two_repositories(oma, tmp_path)
    db = db_of(oma)
    (full,) = await build_chain(db, tmp_path / "work", tmp_path / "primary", primary, points=1)
    # What a crash mid-copy leaves: the image renamed into place without its manifest, a
    # temporary manifest, and the row claimed by a process now gone, with the path it recorded
    # before writing.
    dest = backup_path(tmp_path / "offsite", key_of("web01"), "disk-2000", full.backup_id)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"a whole image, its manifest not yet in place")
    (dest.parent / f".{dest.name}.manifest{copies.TMP_SUFFIX}").write_bytes(b"half a manifest")
    dead = subprocess.Popen(["true"])
    dead.wait()
    await db.execute(
        "INSERT INTO backup_copies (id, backup_id, repository_id, status, claimed_by, started_at, file_path)"
        " VALUES ('copy-orphan', $1, $2, 'copying', $3, now(), $4)",
        full.backup_id,
        offsite,
        f"{socket.gethostname()}:{dead.pid}:gone",
        str(dest),
    )
    worker: copies.CopyWorker = oma.extra["app"].extensions[copies.COPY_WORKER_KEY]
    worker.max_active = 0  # nothing claimed while the recovery is looked at
    await worker.recover_orphans()
    assert not dest.exists() and leftovers(tmp_path / "offsite") == [], "the interrupted copy's files stay"
    row = await db.fetchrow("SELECT status, file_path FROM backup_copies WHERE id = 'copy-orphan'")
    assert (row["status"], row["file_path"]) == ("pending", None)
    worker.max_active = copies.MAX_ACTIVE_COPIES
    worker.wake()
    (copy,) = await wait_for_copies(oma, full.backup_id)
    assert copy["copy_id"] == "copy-orphan" and copy["status"] == "completed" and copy["verified"]
    assert leftovers(tmp_path / "offsite") == []
    assert qemu_img_compare(dest, full.path).returncode == 0


async def test_a_copy_records_its_path_before_writing(
    oma: Oma, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row names the destination before the first byte is written there, so a process that
    dies mid-copy leaves a record of what to remove."""
    primary, offsite = await two_repositories(oma, tmp_path)
    db = db_of(oma)
    (full,) = await build_chain(db, tmp_path / "work", tmp_path / "primary", primary, points=1)
    seen: list[tuple[str | None, bool]] = []
    real_write = copies.write_copy

    def watched(src: Path, src_manifest: Path, dest: Path) -> int:
        recorded = trio.from_thread.run(
            db.fetchval, "SELECT file_path FROM backup_copies WHERE backup_id = $1", full.backup_id
        )
        seen.append((recorded, dest.exists()))
        return real_write(src, src_manifest, dest)

    monkeypatch.setattr(copies, "write_copy", watched)
    r = await oma.post(f"/backups/{full.backup_id}/copy", json={"repository_id": offsite})
    assert r.status_code == 202, r.text
    (copy,) = await wait_for_copies(oma, full.backup_id)
    assert copy["status"] == "completed", copy
    assert seen == [(copy["file_path"], False)]
    # the copy mirrors the primary's place under its repository's root
    assert Path(copy["file_path"]).relative_to(tmp_path / "offsite") == full.path.relative_to(
        tmp_path / "primary"
    )


async def test_full_destination_fails_cleanly(oma: Oma, tmp_path: Path) -> None:
    """A destination that fills up mid-copy: the copy fails naming the cause, and nothing of it
    stays there."""
    with mounted_tmpfs(tmp_path / "small", size="1m") as small:
        primary = await create_local_repository(oma, "primary", tmp_path / "primary")
        tiny = await create_local_repository(oma, "tiny", small)
        (full,) = await build_chain(db_of(oma), tmp_path / "work", tmp_path / "primary", primary, points=1)
        r = await oma.post(f"/backups/{full.backup_id}/copy", json={"repository_id": tiny})
        assert r.status_code == 202
        (copy,) = await wait_for_copies(oma, full.backup_id)
        assert copy["status"] == "failed"
        assert "No space left on device" in copy["error_message"] and str(full.path) in copy["error_message"]
        assert [p for p in small.rglob("*") if p.is_file()] == []


async def test_shutdown_leaves_no_half_copy(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> None:
    """Stopping the OMA right after a copy was asked for: whenever the stop lands, the copy is
    either completed or back to pending with nothing of it left; the next start finishes it."""
    async with run_backup_oma(tmp_path, oma_dsn, vma.base_url, run_backups=True) as oma:
        primary, offsite = await two_repositories(oma, tmp_path)
        (full,) = await build_chain(
            db_of(oma), tmp_path / "work", tmp_path / "primary", primary, points=1, full_chunks=60
        )
        r = await oma.post(f"/backups/{full.backup_id}/copy", json={"repository_id": offsite})
        assert r.status_code == 202
    async with run_backup_oma(tmp_path, oma_dsn, vma.base_url, run_backups=False) as oma:
        (copy,) = (await oma.get(f"/backups/{full.backup_id}/copies")).json()
        assert copy["status"] in ("pending", "completed"), copy
        if copy["status"] == "pending":
            assert copy["file_path"] is None and list((tmp_path / "offsite").rglob("*.qcow2*")) == []
    async with run_backup_oma(tmp_path, oma_dsn, vma.base_url, run_backups=True) as oma:
        (copy,) = await wait_for_copies(oma, full.backup_id)
        assert copy["status"] == "completed" and copy["verified"] is True
        assert leftovers(tmp_path / "offsite") == []


async def test_a_copy_into_an_immutable_repository_is_locked_when_it_completes(
    oma: Oma, tmp_path: Path
) -> None:
    """A copy is a point of its repository: in an immutable one its image, manifest and lock
    record carry the immutable attribute as soon as the copy completes, not at the next
    retention sweep; the lock counts from the backup's time."""
    primary = await create_local_repository(oma, "primary", tmp_path / "primary")
    vault = await create_local_repository(oma, "vault", tmp_path / "vault", immutable=True, immutable_days=7)
    db = db_of(oma)
    (full,) = await build_chain(db, tmp_path / "work", tmp_path / "primary", primary, points=1)
    r = await oma.post(f"/backups/{full.backup_id}/copy", json={"repository_id": vault})
    assert r.status_code == 202, r.text
    (copy,) = await wait_for_copies(oma, full.backup_id)
    assert copy["status"] == "completed", copy
    dest = Path(copy["file_path"])
    record = immutability.read_lock(dest)
    assert record is not None and record.backup_id == full.backup_id
    created = await db.fetchval("SELECT created_at FROM backup_jobs WHERE id = $1", full.backup_id)
    assert record.locked_at == created and record.locked_until == created + dt.timedelta(days=7)
    for path in immutability.point_files(dest):
        assert immutability.is_immutable(path), path
    rm = subprocess.run(["rm", "-f", str(dest)], capture_output=True, text=True, check=False)
    assert rm.returncode != 0 and "Operation not permitted" in rm.stderr
    assert not immutability.is_immutable(full.path)  # the primary repository is not immutable
