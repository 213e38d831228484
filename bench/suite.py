"""The comparisons of issue 20 and their workloads, shared by ``bench/run.py`` (the table) and
``bench/test_bench.py`` (the pytest-benchmark suite CI runs in quick mode).

Every comparison is a list of :class:`harness.Side`: whole commands (the ``mover`` console
script of this virtualenv, ``nbdcopy``, ``qemu-img``), each with an untimed ``prepare`` that
gives it a fresh target. The first side is the mover; the others are its peers, durable first.

Workloads
    reference   DESIGN.md's disk: 1 MiB chunks, a seeded half random data (seed 1), the rest holes.
    fragmented  an ext4 file system made by ``mke2fs -d`` (no mount) from a generated tree of
                thousands of files of mixed sizes (512 B to 1 MiB log-uniform, 1% up to 32 MiB),
                then half of them deleted (``debugfs rm``) and the freed blocks punched out, as a
                guest's fstrim leaves a thin disk: the allocation map is many small extents.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness import Side
from workload import GiB, MiB, reference_disk, rewrite_chunks

from pyapp.nbd_export import NbdExport

MOVER = str(Path(sys.executable).parent / "mover")
FIXED_TIME = 1_700_000_000
#: Both ends of every NBD comparison use the same qemu-nbd flags (page cache, threads).
EXPORT_CACHE = "writeback"


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).exists()]
    if missing:
        raise RuntimeError(f"the benchmark needs {', '.join(missing)} (see scripts/bootstrap.sh)")


# --- workloads --------------------------------------------------------------------------------------


def reference(work: Path, size: int) -> Path:
    path = work / f"reference-{size // MiB}m.raw"
    if not path.exists():
        reference_disk(path, size=size)
    return path


def _tree(root: Path, data_bytes: int, rng: random.Random) -> list[str]:
    """Files of mixed sizes under ``root`` until ``data_bytes``; returns their paths (relative)."""
    dirs = [root]
    files: list[str] = []
    total = 0
    while total < data_bytes:
        if len(files) % 40 == 0:  # a new directory now and then, nested under an existing one
            d = rng.choice(dirs) / f"d{len(dirs):04d}"
            d.mkdir()
            dirs.append(d)
        # 512 B .. 1 MiB log-uniform, 1% of the files 1 .. 32 MiB
        exp = rng.uniform(20, 25) if rng.random() < 0.01 else rng.uniform(9, 20)
        size = min(int(2**exp), data_bytes - total + 512)
        path = rng.choice(dirs) / f"f{len(files):05d}.bin"
        path.write_bytes(rng.randbytes(size))
        files.append("/" + path.relative_to(root).as_posix())
        total += size
    return files


def _free_ranges(image: Path) -> Iterator[tuple[int, int]]:
    """The free blocks of an ext4 image as (offset, length) in bytes, from dumpe2fs."""
    out = subprocess.run(["dumpe2fs", str(image)], capture_output=True, text=True, check=True).stdout
    block = int(next(line.split(":")[1] for line in out.splitlines() if line.startswith("Block size:")))
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("Free blocks: ") or line == "Free blocks: ":
            continue
        for item in line.removeprefix("Free blocks: ").split(", "):
            first, _, last = item.partition("-")
            a = int(first)
            b = int(last) if last else a
            yield a * block, (b - a + 1) * block


def _punch(image: Path, ranges: Iterator[tuple[int, int]]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(image, os.O_RDWR)
    try:
        for offset, length in ranges:
            if libc.fallocate(fd, 0x3, offset, length) != 0:  # FALLOC_FL_PUNCH_HOLE | KEEP_SIZE
                raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE)", str(image))
        os.fsync(fd)
    finally:
        os.close(fd)


def fragmented(work: Path, size: int, fill: float = 0.6) -> Path:
    """An ext4 image of ``size`` bytes, reproducible: ``mke2fs -d`` of a generated tree about
    ``fill`` of the size, then a seeded half of the files deleted (``debugfs rm``) and the freed
    blocks punched out of the image, as a guest's ``fstrim`` leaves a thin disk: data in many
    small extents between holes, like a system disk that has lived a while."""
    need("mke2fs", "debugfs", "dumpe2fs")
    path = work / f"fragmented-{size // MiB}m.raw"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    rng = random.Random(1)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(FIXED_TIME)}
    with tempfile.TemporaryDirectory(dir=work) as d:
        files = _tree(Path(d), int(size * fill), rng)
        with tmp.open("wb") as f:
            f.truncate(size)
        subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-U", "6a1f4c2e-0b6d-4f3e-9d0a-1b2c3d4e5f60",
             "-E", "root_owner=0:0,hash_seed=0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a", "-d", d, str(tmp)],
            check=True, env=env,
        )  # fmt: skip
    gone = sorted(rng.sample(files, len(files) // 2))
    script = work / "fragmented.debugfs"
    script.write_text("".join(f"rm {f}\n" for f in gone))
    try:
        subprocess.run(["debugfs", "-w", "-f", str(script), str(tmp)], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        script.unlink()
    _punch(tmp, _free_ranges(tmp))
    tmp.rename(path)
    extents, allocated = allocation(path)
    print(f"built {path.name}: {len(files) - len(gone)} files, {allocated / MiB:.0f} MiB in {extents} "
          "extents", file=sys.stderr)
    return path


def allocation(path: Path) -> tuple[int, int]:
    """(data extents, allocated bytes) of a sparse file, from SEEK_DATA / SEEK_HOLE."""
    extents = allocated = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        end, pos = os.fstat(fd).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            extents += 1
            allocated += pos - start
    finally:
        os.close(fd)
    return extents, allocated


# --- comparisons --------------------------------------------------------------------------------------


def fresh(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    Path(f"{path}.manifest").unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


@dataclass
class Target:
    """An NBD export of a target file, restarted on a fresh (or given) file before each run."""

    work: Path
    size: int
    export: NbdExport | None = None

    @property
    def file(self) -> Path:
        return self.work / "target.raw"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///dst?socket={self.work / 'dst.sock'}"

    def restart(self, base: Path | None = None) -> None:
        self.stop()
        if base is None:
            fresh(self.file, self.size)
        else:
            subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(base), str(self.file)], check=True)
        self.export = NbdExport(self.file, name="dst", socket_path=self.work / "dst.sock",
                                cache=EXPORT_CACHE).start()

    def stop(self) -> None:
        if self.export is not None:
            self.export.stop()
            self.export = None


@contextmanager
def source_export(work: Path, image: Path) -> Iterator[NbdExport]:
    with NbdExport(image, name="src", socket_path=work / "src.sock", read_only=True, cache=EXPORT_CACHE) as s:
        yield s


@contextmanager
def nbd_copy(work: Path, image: Path, durable_only: bool = False) -> Iterator[list[Side]]:
    """mover copy NBD -> NBD against nbdcopy, qemu-nbd with the same flags at both ends."""
    need("qemu-nbd", "nbdcopy", MOVER)
    target = Target(work, image.stat().st_size)
    with source_export(work, image) as src:
        sides = [
            Side("mover", [MOVER, "copy", src.uri, target.uri, "--allocated-only"], target.restart),
            Side("nbdcopy --flush", ["nbdcopy", "--flush", src.uri, target.uri], target.restart),
        ]
        if not durable_only:
            sides.append(Side("nbdcopy", ["nbdcopy", src.uri, target.uri], target.restart))
        try:
            yield sides
        finally:
            target.stop()


@contextmanager
def qcow2_copy(work: Path, image: Path, durable_only: bool = False) -> Iterator[list[Side]]:
    """mover copy raw -> new QCOW2 (with and without its manifest) against qemu-img convert."""
    need("qemu-img", MOVER)
    out = work / "out.qcow2"

    def clean() -> None:
        out.unlink(missing_ok=True)
        Path(f"{out}.manifest").unlink(missing_ok=True)

    src = str(image)
    sides = [
        Side("mover", [MOVER, "copy", src, str(out), "--allocated-only"], clean),
        Side("qemu-img -t writeback",
             ["qemu-img", "convert", "-t", "writeback", "-O", "qcow2", src, str(out)], clean),
        Side("mover --no-manifest",
             [MOVER, "copy", src, str(out), "--allocated-only", "--no-manifest"], clean),
    ]
    if not durable_only:
        sides.append(Side("qemu-img (unsafe)", ["qemu-img", "convert", "-O", "qcow2", src, str(out)], clean))
    try:
        yield sides
    finally:
        clean()


@contextmanager
def incremental(work: Path, image: Path) -> Iterator[list[Side]]:
    """An incremental NBD pass of 5% of the chunks (explicit extents, onto the previous full)
    against a full pass of the same changed disk into a fresh target."""
    need("qemu-nbd", MOVER)
    changed = work / "changed.raw"
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(image), str(changed)], check=True)
    base = work / "base.raw"
    target = Target(work, image.stat().st_size)
    try:
        with source_export(work, image) as src:  # the previous full, as a backup would hold it
            target.restart()
            subprocess.run([MOVER, "copy", src.uri, target.uri, "--allocated-only"], check=True,
                           stdout=subprocess.DEVNULL)
            target.stop()
            target.file.rename(base)
        plan = work / "plan.json"
        plan.write_text(json.dumps([{"offset": o, "length": n} for o, n in rewrite_chunks(changed)]))
        with source_export(work, changed) as src:
            yield [
                Side("incremental 5%", [MOVER, "copy", src.uri, target.uri, "--extents", str(plan)],
                     lambda: target.restart(base)),
                Side("full", [MOVER, "copy", src.uri, target.uri, "--allocated-only"], target.restart),
            ]
    finally:
        target.stop()
        for p in (changed, base):
            p.unlink(missing_ok=True)


@contextmanager
def startup() -> Iterator[list[Side]]:
    """``mover --help`` against the interpreter's own start-up (``python -c pass``)."""
    need(MOVER)
    yield [Side("mover --help", [MOVER, "--help"]), Side("python -c pass", [sys.executable, "-c", "pass"])]


__all__ = ["GiB", "MiB"]
