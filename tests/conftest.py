"""Fixtures shared by every suite: one PostgreSQL server per test session, and the vSphere lab
with its two-disk VM ``vm1`` (tests/lab has its own ``vm1``).

``DATABASE_URL`` (a superuser DSN) selects an external server; otherwise an embedded PostgreSQL
(the ``pgserver`` wheel) is started in a temporary directory and stopped at the end of the session.
Suites create their own databases on it (see ``pyapp.db.create_database``).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from lab import DiskSpec, Lab, LabVM, MiB, Partition
from pyapp.db import create_database, with_database
from pyapp.logs import JsonFormatter
from tests.oma.oma_harness import Oma, make_config, run_oma
from tests.oma.vma_double import run_vma_double

FILES = {"etc/hostname": b"vm1\n", "var/lib/data/blob.bin": bytes(range(256)) * 8192}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    # An 8 MiB window: every disk takes several QueryChangedDiskAreas answers, so the callers'
    # loops are exercised.
    with Lab(tmp_path / "lab", qcda_window=8 * MiB) as lab:
        yield lab


@pytest.fixture
def tls_lab(tmp_path: Path) -> Iterator[Lab]:
    """A lab serving HTTPS with its own self-signed certificate: connect to it by pinning
    ``tls_lab.thumbprint()`` or with ``tls_lab.ca_file`` as CA, never without verification."""
    with Lab(tmp_path / "tls-lab", tls=True) as lab:
        yield lab


@pytest.fixture
def vm1(lab: Lab) -> LabVM:
    """A VM with two disks: an ext4 file system with files, and a blank disk."""
    return lab.create_vm(
        "vm1",
        [DiskSpec(32 * MiB, [Partition(16 * MiB, "ext4", "root", FILES)]), DiskSpec(16 * MiB)],
        guest_id="ubuntu64Guest",
        memory_mb=2048,
        num_cpus=2,
    )


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> Iterator[str]:
    external = os.environ.get("DATABASE_URL")
    if external:
        yield external
        return
    import pgserver

    # Not under pytest's tmp_path: as root, pgserver runs PostgreSQL as its own user, which cannot
    # traverse pytest's 0700 base directory.
    base = Path(tempfile.mkdtemp(prefix="pytest-pg-"))
    server = pgserver.get_server(base / "pgdata", cleanup_mode="stop")
    # A throw-away test server: durability buys nothing, speed does (CREATE DATABASE per test).
    server.psql(
        "ALTER SYSTEM SET fsync = off; ALTER SYSTEM SET synchronous_commit = off;"
        " ALTER SYSTEM SET full_page_writes = off; SELECT pg_reload_conf();"
    )
    try:
        yield str(server.get_uri("postgres"))
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def oma_dsn(postgres_admin_dsn: str) -> str:
    name = f"oma_test_{uuid.uuid4().hex[:12]}"
    await create_database(postgres_admin_dsn, name)
    return with_database(postgres_admin_dsn, name)


@pytest.fixture
def log_capture() -> Iterator[io.StringIO]:
    """Every log record of the process during the test, as the JSON lines the service writes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture
async def oma_service(tmp_path: Path, oma_dsn: str) -> AsyncIterator[Oma]:
    """An OMA on its own database with the VMA double behind it."""
    async with run_vma_double() as double, run_oma(make_config(tmp_path, oma_dsn, double.base_url)) as oma:
        yield oma
