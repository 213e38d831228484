"""QCOW2 through the ``mover`` command and the facade, against QEMU as the oracle.

Images made by ``qemu-img create/convert`` and written through ``qemu-io`` (versions 2 and 3,
compressed clusters (deflate and zstd), zero clusters, discards, chains of 1, 2 and 10 layers) are read by the
mover; images the mover writes (standalone and overlays, chains of 10) must pass
``qemu-img check``, equal their source under ``qemu-img compare``, be served by ``qemu-nbd``,
and carry manifests that ``verify`` checks and a flipped byte breaks.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyapp import mover
from pyapp.nbd_export import NbdExport

from .conftest import MiB, images_equal, write_disk

pytestmark = pytest.mark.interop

SIZE = 32 * MiB
DATA = [(0, 2 * MiB), (5 * MiB + 4096, MiB + 12345), (20 * MiB, 3 * MiB), (SIZE - MiB, MiB)]


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_io(image: Path, *cmds: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def check_clean(image: Path) -> None:
    r = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report


def to_raw(image: Path, out: Path) -> Path:
    qemu_img("convert", "-O", "raw", str(image), str(out))
    return out


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pyapp.cli", *args]
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def cli_json(*args: str) -> Any:
    return json.loads(cli(*args, "--json").stdout)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.raw"
    write_disk(path, SIZE, DATA)
    return path


def random_ops(rng: random.Random, n: int, size: int) -> list[str]:
    """qemu-io commands: writes (some overwriting), zero writes, discards, unaligned edges."""
    ops = []
    for _ in range(n):
        off = rng.randrange(0, size - 2 * MiB) // 512 * 512
        length = rng.choice([512, 4096, 65536, 300 * 1024, MiB + 512])
        kind = rng.random()
        if kind < 0.6:
            ops.append(f"write -P {rng.randrange(1, 255)} {off} {length}")
        elif kind < 0.8:
            ops.append(f"write -z {off} {length}")
        else:
            ops.append(f"discard {off} {length}")
    return ops


@pytest.mark.parametrize("opts", ["compat=0.10", "compat=1.1", "compat=1.1,cluster_size=4096",
                                  "compat=1.1,cluster_size=2M"])
async def test_qemu_images_are_read_like_qemu(tmp_path: Path, opts: str) -> None:
    img = tmp_path / "q.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(img), str(SIZE))
    qemu_io(img, *random_ops(random.Random(opts), 40, SIZE))
    out = tmp_path / "out.raw"
    await mover.copy(str(img), str(out), allocated_only=True)
    assert images_equal(out, img, fmt_b="qcow2")


async def test_compressed_images_are_read(source: Path, tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(source), str(img))
    out = tmp_path / "out.raw"
    await mover.copy(str(img), str(out))
    assert images_equal(out, source)


@pytest.mark.parametrize("opts", ["cluster_size=64k", "cluster_size=2M", "cluster_size=64k,extended_l2=on"])
def test_cli_copies_zstd_compressed_images(source: Path, tmp_path: Path, opts: str) -> None:
    img = tmp_path / "z.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type=zstd,{opts}", str(source), str(img))
    assert json.loads(qemu_img("info", "--output=json", str(img)))["format-specific"]["data"][
        "compression-type"] == "zstd"
    out = tmp_path / "out.raw"
    cli("copy", str(img), str(out))
    assert images_equal(out, img, fmt_b="qcow2")
    assert images_equal(out, source)
    # The same disk digest as the raw source, and a QCOW2 copy that QEMU checks and compares.
    assert cli_json("checksum", str(img))["disk_digest"] == cli_json("checksum", str(source))["disk_digest"]
    new = tmp_path / "out.qcow2"
    cli("copy", str(img), str(new))
    check_clean(new)
    assert images_equal(new, img, fmt_a="qcow2", fmt_b="qcow2")


def qemu_chain(tmp_path: Path, layers: int) -> Path:
    """A chain made by qemu-img and written by qemu-io: a raw base, then QCOW2 overlays."""
    base = tmp_path / "base.raw"
    write_disk(base, SIZE, DATA, seed=3)
    below, fmt = base, "raw"
    rng = random.Random(layers)
    for i in range(layers):
        img = tmp_path / f"l{i}.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", below.name, "-F", fmt, str(img))
        qemu_io(img, *random_ops(rng, 8, SIZE))
        below, fmt = img, "qcow2"
    return below


@pytest.mark.parametrize("layers", [1, 2, 10])
async def test_qemu_chains_are_read_and_copied(tmp_path: Path, layers: int) -> None:
    top = qemu_chain(tmp_path, layers)
    out = tmp_path / "flat.raw"
    await mover.copy(str(top), str(out), allocated_only=True)
    assert images_equal(out, top, fmt_b="qcow2")
    # Chain to a new standalone QCOW2 image: checked, compared, with a manifest that verifies.
    new = tmp_path / "flat.qcow2"
    result = await mover.copy(str(top), str(new), allocated_only=True)
    assert result.manifest == f"{new}.manifest"
    check_clean(new)
    assert images_equal(new, top, fmt_a="qcow2", fmt_b="qcow2")
    assert (await mover.verify(str(new))).ok
    doc = await mover.info(top)
    assert doc["depth"] == layers + 1
    assert doc["layers"][-1]["format"] == "raw"
    assert doc["layers"][0]["backing_format"] == "qcow2" if layers > 1 else "raw"


def test_cli_copy_writes_an_image_qemu_checks_and_serves(
    source: Path, tmp_path: Path, qemu_nbd: Callable[..., NbdExport]
) -> None:
    img = tmp_path / "backup.qcow2"
    out = cli_json("copy", str(source), str(img), "--allocated-only")
    assert out["manifest"] == f"{img}.manifest"
    data = sum(length for _, length in DATA)
    assert data <= out["bytes_written"] <= data + 4096 * len(DATA), "only data travels (file blocks)"
    check_clean(img)
    assert images_equal(img, source, fmt_a="qcow2")
    info = json.loads(qemu_img("info", "--output=json", str(img)))
    assert info["cluster-size"] == 65536
    # Served by qemu-nbd, read back over NBD by the mover.
    export = qemu_nbd(img, name="b", fmt="qcow2", read_only=True)
    back = tmp_path / "back.raw"
    cli_json("copy", export.uri, str(back), "--allocated-only")
    assert images_equal(back, source)
    # Writing into an existing QCOW2 image is refused clearly.
    r = cli("copy", str(source), str(img), check=False)
    assert r.returncode == 1 and "existing QCOW2" in r.stderr


def test_cli_cluster_size_and_manifest_for_raw_targets(source: Path, tmp_path: Path) -> None:
    img = tmp_path / "small.qcow2"
    cli_json("copy", str(source), str(img), "--cluster-size", "4096")
    assert json.loads(qemu_img("info", "--output=json", str(img)))["cluster-size"] == 4096
    check_clean(img)
    raw = tmp_path / "copy.raw"
    out = cli_json("copy", str(source), str(raw), "--manifest", str(tmp_path / "copy.manifest"))
    assert out["disk_digest"] == cli_json("checksum", str(source))["disk_digest"]
    assert cli_json("verify", str(raw), "--manifest", str(tmp_path / "copy.manifest"))["ok"]


def mover_chain(tmp_path: Path, layers: int, source: Path) -> tuple[list[Path], list[Path]]:
    """A backup chain written by the mover: a full, then overlays of changed extents (random
    writes, overwrites and zeroed ranges of the raw disk), each with a raw snapshot."""
    rng = random.Random(11)
    disk = tmp_path / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(source), str(disk)], check=True)
    images: list[Path] = []
    snaps: list[Path] = []
    for i in range(layers):
        changed: list[tuple[int, int]] = []
        if i:
            with open(disk, "r+b") as f:
                for _ in range(6):
                    off = rng.randrange(0, SIZE - MiB)
                    length = rng.choice([4096, 70000, MiB])
                    f.seek(off)
                    f.write(bytes(length) if rng.random() < 0.3 else rng.randbytes(length))
                    changed.append((off, length))
        snap = tmp_path / f"snap{i}.raw"
        subprocess.run(["cp", "--sparse=always", str(disk), str(snap)], check=True)
        img = tmp_path / f"b{i}.qcow2"
        if i == 0:
            cli_json("copy", str(disk), str(img), "--allocated-only")
        else:
            ext = tmp_path / "changed.json"
            # Sorted and disjoint, as CBT reports it (the command refuses any other plan file).
            plan: list[list[int]] = []
            for off, length in sorted(changed):
                if plan and off <= plan[-1][0] + plan[-1][1]:
                    plan[-1][1] = max(plan[-1][1], off + length - plan[-1][0])
                else:
                    plan.append([off, length])
            ext.write_text(json.dumps(plan))
            cli_json("copy", str(disk), str(img), "--extents", str(ext), "--backing", str(images[-1]))
        images.append(img)
        snaps.append(snap)
    return images, snaps


def test_mover_chain_of_10_layers_reads_in_qemu(source: Path, tmp_path: Path) -> None:
    images, snaps = mover_chain(tmp_path, 10, source)
    for img, snap in zip(images, snaps, strict=True):
        check_clean(img)
        assert images_equal(img, snap, fmt_a="qcow2"), img
    info = json.loads(qemu_img("info", "--output=json", "--backing-chain", str(images[-1])))
    assert len(info) == 10
    assert info[0]["backing-filename"] == "b8.qcow2"
    assert info[0]["backing-filename-format"] == "qcow2"
    # The overlay manifests were derived without re-reading: they equal fresh checksums.
    for img, snap in zip(images, snaps, strict=True):
        assert cli_json("verify", str(img))["ok"]
        assert cli_json("checksum", str(snap))["disk_digest"] == cli_json("checksum", str(img))["disk_digest"]
    doc = json.loads(cli("info", str(images[-1])).stdout)
    assert doc["depth"] == 10
    assert {r["kind"] for r in doc["map"]} >= {"data", "unallocated"}


def flip_data_byte(img: Path, nth: int = 0) -> int:
    """Flip one byte in the ``nth`` data run of ``img`` itself; return its guest offset."""
    runs = json.loads(qemu_img("map", "--output=json", str(img)))
    own = [r for r in runs if r["data"] and r["depth"] == 0 and "offset" in r]
    run = own[nth]
    with open(img, "r+b") as f:
        f.seek(run["offset"] + 100)
        b = f.read(1)
        f.seek(run["offset"] + 100)
        f.write(bytes([b[0] ^ 0x20]))
    return int(run["start"]) + 100


def test_verify_names_the_chunk_with_a_flipped_byte_in_any_layer(source: Path, tmp_path: Path) -> None:
    images, _ = mover_chain(tmp_path, 3, source)
    assert cli_json("verify", str(images[-1]), "--chain")["ok"]
    guest = flip_data_byte(images[0], nth=1)
    r = cli("verify", str(images[0]), "--json", check=False)
    assert r.returncode == 1
    bad = json.loads(r.stdout)["images"][0]["mismatches"]
    assert [m["index"] for m in bad] == [guest // MiB]
    # The whole chain: the full's own view is checked, even where newer layers hide the byte.
    r = cli("verify", str(images[-1]), "--chain", "--json", check=False)
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert [len(i["mismatches"]) > 0 for i in doc["images"]][-1]
    assert not doc["ok"]
    text = cli("verify", str(images[0]), check=False)
    assert text.returncode == 1 and f"chunk {guest // MiB} offset" in text.stdout


def test_checksum_saves_a_manifest_for_any_source(source: Path, tmp_path: Path) -> None:
    m = tmp_path / "src.manifest"
    out = cli_json("checksum", str(source), "-o", str(m))
    assert out["chunks"] == SIZE // MiB and m.stat().st_size == 64 + 32 * (SIZE // MiB)
    assert cli_json("verify", str(source), "--manifest", str(m))["ok"]
    with open(source, "r+b") as f:
        f.seek(20 * MiB + 5)
        f.write(b"\xff")
    r = cli("verify", str(source), "--manifest", str(m), "--json", check=False)
    assert r.returncode == 1
    assert [x["index"] for x in json.loads(r.stdout)["images"][0]["mismatches"]] == [20]


def test_image_file_object_reads_through_the_chain(source: Path, tmp_path: Path) -> None:
    top = qemu_chain(tmp_path, 2)
    flat = to_raw(top, tmp_path / "flat.raw")
    want = flat.read_bytes()
    with mover.open_image(top) as f:
        assert f.seekable() and f.readable() and not f.writable()
        assert f.seek(0, 2) == SIZE
        f.seek(5 * MiB + 4000)
        assert f.read(10000) == want[5 * MiB + 4000: 5 * MiB + 14000]
        buf = bytearray(4096)
        f.seek(-100, 2)
        assert f.readinto(buf) == 100 and bytes(buf[:100]) == want[-100:]
        assert f.read(10) == b""
        f.seek(0)
        assert f.read() == want
