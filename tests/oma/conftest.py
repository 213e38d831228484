"""OMA test fixtures: a fresh database per test, the VMA double, the OMA on a free loopback port."""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from oma_harness import Oma, make_config, run_oma
from vma_double import VmaDouble, run_vma_double

from oma.backups.immutability import clear_tree
from pyapp.db import create_database, with_database
from pyapp.logs import JsonFormatter


@pytest.fixture(autouse=True)
def _clear_immutable_files(request: pytest.FixtureRequest) -> Iterator[None]:
    """Clear the immutable attribute a test's locked backup points left under its ``tmp_path``:
    pytest could not remove them otherwise."""
    tmp_path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp_path is not None:
        clear_tree(tmp_path)


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
async def vma() -> AsyncIterator[VmaDouble]:
    async with run_vma_double() as double:
        yield double


@pytest.fixture
async def oma(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> AsyncIterator[Oma]:
    async with run_oma(make_config(tmp_path, oma_dsn, vma.base_url)) as handle:
        yield handle
