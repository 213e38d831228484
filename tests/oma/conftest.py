"""OMA test fixtures: a fresh database per test, the VMA double, the OMA on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from oma_harness import Oma, make_config, run_oma
from vma_double import VmaDouble, run_vma_double

from oma.backups.immutability import clear_tree


@pytest.fixture(autouse=True)
def _clear_immutable_files(request: pytest.FixtureRequest) -> Iterator[None]:
    """Clear the immutable attribute a test's locked backup points left under its ``tmp_path``:
    pytest could not remove them otherwise."""
    tmp_path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp_path is not None:
        clear_tree(tmp_path)


@pytest.fixture
async def vma() -> AsyncIterator[VmaDouble]:
    async with run_vma_double() as double:
        yield double


@pytest.fixture
async def oma(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> AsyncIterator[Oma]:
    async with run_oma(make_config(tmp_path, oma_dsn, vma.base_url)) as handle:
        yield handle
