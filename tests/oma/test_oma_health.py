"""``GET /health`` reflects the database (a real query under a deadline), the data directory's free
space (statvfs) and the background workers, with ``status``, ``reasons`` and 200/503."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from oma_harness import Oma, make_config, run_oma
from vma_double import VmaDouble

from oma.state import STATE_KEY, OmaState
from oma.store import MIGRATIONS_DIR
from pyapp.db import load_migrations, open_database


def state_of(oma: Oma) -> OmaState:
    st: OmaState = oma.extra["app"].extensions[STATE_KEY]
    return st


async def test_health_and_login(oma: Oma) -> None:
    r = await oma.client.get(oma.url("/health"))
    assert r.status_code == 200
    assert r.json()["status"] == "healthy"
    r = await oma.get("/vms")
    assert r.status_code == 200


async def test_health_reports_its_checks(oma: Oma) -> None:
    r = await oma.client.get(oma.url("/health"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "healthy" and body["reasons"] == []
    checks = body["checks"]
    latest = max(m.version for m in load_migrations(MIGRATIONS_DIR))
    assert checks["database"]["status"] == "ok" and checks["database"]["schema_version"] == latest
    assert checks["database"]["latency_ms"] >= 0
    vfs = os.statvfs(oma.config.data_dir)
    data = checks["data_dir"]
    assert data["status"] == "ok" and data["path"] == str(oma.config.data_dir)
    assert data["total_bytes"] == vfs.f_blocks * vfs.f_frsize
    assert abs(data["free_bytes"] - vfs.f_bavail * vfs.f_frsize) < 256 * 1024 * 1024
    # the harness turns the replication engine off; the backup services run
    assert checks["workers"] == {
        "replication_engine": "disabled",
        "backup_engine": "running",
        "copy_worker": "running",
        "retention": "running",
    }


async def test_health_is_unhealthy_when_the_database_does_not_answer(oma: Oma) -> None:
    # Another session holds an exclusive lock on the table the probe reads: the query waits.
    async with (
        open_database(oma.config.database_url or "", min_size=1, max_size=1) as other,
        other.transaction() as conn,
    ):
        await conn.execute("LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        r = await oma.client.get(oma.url("/health"))
        took = time.monotonic() - started
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["status"] == "unhealthy"
        assert body["checks"]["database"]["status"] == "error" and body["database"].startswith("error: ")
        assert any(reason.startswith("database: no answer within") for reason in body["reasons"]), body
        assert took < 4  # the probe's deadline is 2 s
    # the lock gone, the same pool answers again
    r = await oma.client.get(oma.url("/health"))
    assert r.status_code == 200 and r.json()["status"] == "healthy", r.text


async def test_health_is_unhealthy_when_a_worker_has_stopped(oma: Oma) -> None:
    engine = state_of(oma).backup_engine
    assert engine is not None
    engine.stop()
    with trio.fail_after(20):
        await engine.stopped.wait()
    r = await oma.client.get(oma.url("/health"))
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "unhealthy" and body["checks"]["workers"]["backup_engine"] == "stopped"
    assert "backup engine is not running" in body["reasons"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 MiB tmpfs (under the 1 GiB the OMA wants free)."""
    mount = shutil.which("mount")
    assert mount is not None, "mount(8) is needed"
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run([mount, "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_health_is_degraded_when_the_data_directory_is_short_of_space(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble, small_fs: Path
) -> None:
    config = make_config(tmp_path, oma_dsn, vma.base_url, data_dir=small_fs / "oma-data")
    async with run_oma(config) as oma:
        r = await oma.client.get(oma.url("/health"))
        assert r.status_code == 200, r.text  # degraded still serves
        body = r.json()
        assert body["status"] == "degraded", body
        assert body["checks"]["data_dir"]["status"] == "low"
        assert body["checks"]["data_dir"]["total_bytes"] == 64 * 1024 * 1024
        assert [r for r in body["reasons"] if r.startswith(f"data directory {small_fs / 'oma-data'}")]
