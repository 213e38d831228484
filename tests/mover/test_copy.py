"""Copies between real peers: qemu-nbd and nbdkit exports and raw files, checked byte for byte
with qemu-img compare and for allocation with qemu-img map / st_blocks."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pyapp import mover
from pyapp.nbd_export import NbdExport

from .conftest import MiB, Nbdkit, allocated_bytes, flushless_nbdkit_args, images_equal, write_disk

pytestmark = pytest.mark.interop

SIZE = 64 * MiB
DATA = [(0, 3 * MiB), (10 * MiB + 4096, 2 * MiB), (40 * MiB, 1 * MiB), (SIZE - MiB, MiB)]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.raw"
    write_disk(path, SIZE, DATA)
    return path


def fresh(tmp_path: Path, name: str = "target.raw", size: int = SIZE) -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def qemu_map_data(path: Path) -> int:
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", str(path)],
                         capture_output=True, check=True, text=True).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"])


async def test_file_to_file_is_sparse_and_equal(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "new.raw"
    result = await mover.copy(str(source), str(target), allocated_only=True)
    assert images_equal(source, target)
    data = sum(length for _, length in DATA)
    assert result.bytes_written == data
    assert result.bytes_read == data
    assert result.bytes_zeroed == SIZE - data
    assert allocated_bytes(target) <= allocated_bytes(source) + MiB


async def test_nbd_to_nbd_full_copy_moves_only_data(
    source: Path, tmp_path: Path, qemu_nbd: Callable[..., NbdExport]
) -> None:
    target = fresh(tmp_path)
    src = qemu_nbd(source, name="src", read_only=True)
    dst = qemu_nbd(target, name="dst")
    result = await mover.copy(src.uri, dst.uri, allocated_only=True)
    dst.stop()
    assert images_equal(source, target)
    data = sum(length for _, length in DATA)
    assert result.bytes_written == data, "holes must not travel as data"
    assert qemu_map_data(target) <= data + MiB


async def test_all_plan_scans_zeros_into_zero_commands(
    source: Path, tmp_path: Path, qemu_nbd: Callable[..., NbdExport]
) -> None:
    target = fresh(tmp_path)
    dst = qemu_nbd(target, name="dst")
    result = await mover.copy(str(source), dst.uri)
    dst.stop()
    assert images_equal(source, target)
    assert result.bytes_read == SIZE
    # Requests are 1 MiB on a 1 MiB grid: a request touching any data is written whole.
    assert result.bytes_written <= 9 * MiB
    assert result.bytes_zeroed == SIZE - result.bytes_written


async def test_nbdkit_memory_and_file_plugins(
    source: Path, tmp_path: Path, nbdkit: Callable[..., Nbdkit]
) -> None:
    memory = nbdkit("memory", f"size={SIZE}")
    await mover.copy(str(source), memory.uri, allocated_only=True)
    back = tmp_path / "back.raw"
    await mover.copy(memory.uri, str(back), allocated_only=True)
    assert images_equal(source, back)
    served = nbdkit("file", str(source))
    again = tmp_path / "again.raw"
    result = await mover.copy(served.uri, str(again), allocated_only=True)
    assert images_equal(source, again)
    assert result.bytes_written == sum(length for _, length in DATA)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_explicit_extents_random_overlapping_and_touching_the_end(
    seed: int, source: Path, tmp_path: Path, qemu_nbd: Callable[..., NbdExport]
) -> None:
    rng = random.Random(seed)
    extents = [(rng.randrange(0, SIZE - 1), rng.randrange(1, 3 * MiB)) for _ in range(40)]
    extents = [(o, min(n, SIZE - o)) for o, n in extents]
    extents += [extents[0], (extents[1][0] + 1, extents[1][1] - 1), (SIZE - 4096, 4096), (SIZE - 1, 1)]
    target = fresh(tmp_path)
    dst = qemu_nbd(target, name="dst")
    await mover.copy(str(source), dst.uri, extents=extents)
    dst.stop()
    expect = bytearray(SIZE)
    got = target.read_bytes()
    src = source.read_bytes()
    for o, n in extents:
        expect[o:o + n] = src[o:o + n]
    assert got == bytes(expect)


async def test_extent_past_the_end_is_refused_before_any_write(source: Path, tmp_path: Path) -> None:
    target = fresh(tmp_path)
    with pytest.raises(mover.InvalidPlanError, match="past the end"):
        await mover.copy(str(source), str(target), extents=[(0, MiB), (SIZE - 10, 11)])
    assert allocated_bytes(target) == 0


async def test_read_only_export_as_target_is_a_target_write_error(
    source: Path, tmp_path: Path, qemu_nbd: Callable[..., NbdExport]
) -> None:
    target = fresh(tmp_path)
    ro = qemu_nbd(target, name="ro", read_only=True)
    with pytest.raises(mover.TargetWriteError) as info:
        await mover.copy(str(source), ro.uri, allocated_only=True)
    assert info.value.code == 1  # EPERM


async def test_malformed_uri_and_missing_socket(source: Path, tmp_path: Path) -> None:
    with pytest.raises(mover.InvalidEndpointError):
        await mover.copy("nbd://[::1/export", str(tmp_path / "t.raw"))
    with pytest.raises(mover.InvalidEndpointError):
        await mover.copy("ftp://host/disk", str(tmp_path / "t.raw"))
    with pytest.raises(mover.ConnectError, match=r"missing\.sock"):
        await mover.copy(f"nbd+unix:///x?socket={tmp_path}/missing.sock", str(tmp_path / "t.raw"))
    with pytest.raises(mover.ConnectError):
        await mover.copy(str(tmp_path / "no-such-disk.raw"), str(tmp_path / "t.raw"))


async def test_zero_unlisted_repairs_a_target_holding_stale_data(
    source: Path, tmp_path: Path, qemu_nbd: Callable[..., NbdExport]
) -> None:
    """A first full pass into a volume left by an earlier, failed pass: the listed extents are
    the source's data, and everything else must be zeroed, or stale bytes survive."""
    target = tmp_path / "stale.raw"
    target.write_bytes(b"\xa5" * SIZE)
    dst = qemu_nbd(target, name="dst")
    await mover.copy(str(source), dst.uri, extents=DATA)
    assert not images_equal(source, target), "without zeroing, the stale bytes remain"
    result = await mover.copy(str(source), dst.uri, extents=DATA, zero_unlisted=True)
    dst.stop()
    assert images_equal(source, target)
    assert result.bytes_zeroed == SIZE - sum(length for _, length in DATA)
    with pytest.raises(mover.InvalidPlanError):
        await mover.copy(str(source), str(target), zero_unlisted=True)


def flushless_nbdkit(nbdkit: Callable[..., Nbdkit], path: Path) -> Nbdkit:
    return nbdkit(*flushless_nbdkit_args(path))


async def test_durable_only_when_every_target_flush_happened(
    tmp_path: Path, qemu_nbd: Callable[..., NbdExport], nbdkit: Callable[..., Nbdkit]
) -> None:
    """A target whose NBD server cannot flush gets the bytes, but the result says they may not
    be on stable storage (``durable`` false); qemu-nbd (flush acknowledged) and a raw file
    (fdatasync) are durable."""
    size, data = 8 * MiB, [(MiB, 512 * 1024), (6 * MiB, 4096)]
    source = tmp_path / "small.raw"
    write_disk(source, size, data)

    kit_target = fresh(tmp_path, "kit.raw", size)
    kit = flushless_nbdkit(nbdkit, kit_target)
    result = await mover.copy(str(source), kit.uri, allocated_only=True, request_size=256 * 1024)
    assert images_equal(source, kit_target)
    assert result.durable is False
    assert mover.Copy(str(source), kit.uri).progress().durable is False  # not yet finished

    qemu_target = fresh(tmp_path, "qemu.raw", size)
    dst = qemu_nbd(qemu_target, name="dst")
    result = await mover.copy(str(source), dst.uri, allocated_only=True)
    assert result.durable is True
    assert (await mover.copy(str(source), str(tmp_path / "file.raw"))).durable is True

    def cli(target: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pyapp.cli", "copy", str(source), target, *args],
                              capture_output=True, text=True, check=True)

    assert json.loads(cli(kit.uri, "--allocated-only", "--json").stdout)["durable"] is False
    assert json.loads(cli(dst.uri, "--json").stdout)["durable"] is True
    assert "cannot be made durable" in cli(kit.uri, "--allocated-only").stderr
