"""Raw disk images with a partition table and real file systems, built without mounting.

Each file system is made in a partition-sized scratch file (``mke2fs -d`` for ext4,
``mkfs.xfs -p`` with a generated protofile for XFS, ``mkfs.fat`` + ``mcopy`` for FAT) and then
copied into place with ``dd conv=notrunc,sparse``; the table is written by ``sfdisk``. Images
stay sparse: unwritten space is holes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

MiB = 1024 * 1024
FsType = Literal["ext4", "xfs", "fat", "none"]
TableType = Literal["gpt", "dos"]

# sfdisk partition type per file system, for each table type.
_TYPE_CODES: dict[TableType, dict[FsType, str]] = {
    "gpt": {"ext4": "L", "xfs": "L", "fat": "U", "none": "L"},
    "dos": {"ext4": "83", "xfs": "83", "fat": "0c", "none": "83"},
}
XFS_MIN_BYTES = 300 * MiB  # xfsprogs >= 5.19 refuses smaller file systems


class DiskBuildError(RuntimeError):
    """A tool failed while building an image; the message carries its stderr."""


@dataclass(frozen=True)
class Partition:
    """One partition: its size, file system, label and content: the tree under ``source`` (if
    given) plus ``files`` (relative POSIX path -> bytes) on top."""

    size: int
    fs: FsType = "ext4"
    label: str = ""
    files: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    source: Path | None = None


@dataclass(frozen=True)
class PlacedPartition:
    number: int
    start: int  # bytes from the start of the image
    size: int
    spec: Partition


@dataclass(frozen=True)
class DiskLayout:
    path: Path
    size: int
    table: TableType
    partitions: tuple[PlacedPartition, ...]


def _run(*args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(args, input=stdin, capture_output=True, check=False)
    if proc.returncode != 0:
        raise DiskBuildError(
            f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout


def _populate(root: Path, files: Mapping[str, bytes]) -> None:
    for rel, data in files.items():
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"file path must stay inside the file system: {rel!r}")
        target = root.joinpath(*p.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _xfs_protofile(root: Path) -> str:
    """An mkfs.xfs protofile describing the tree under ``root`` (see mkfs.xfs(8), "-p")."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(d: Path, depth: int) -> None:
        pad = " " * depth
        for entry in sorted(d.iterdir()):
            if entry.is_dir():
                lines.append(f"{pad}{entry.name} d--755 0 0")
                walk(entry, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{entry.name} ---644 0 0 {entry}")

    walk(root, 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def _make_fs(part: Partition, scratch: Path, workdir: Path) -> None:
    with scratch.open("wb") as f:
        f.truncate(part.size)
    src = workdir / "root"
    if src.exists():
        shutil.rmtree(src)
    if part.source is not None:
        shutil.copytree(part.source, src, symlinks=True)
    else:
        src.mkdir()
    _populate(src, part.files)
    if part.fs == "ext4":
        label = ["-L", part.label] if part.label else []
        _run("mke2fs", "-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", *label, "-d", str(src), str(scratch))
    elif part.fs == "xfs":
        if part.size < XFS_MIN_BYTES:
            raise ValueError(f"XFS partitions need at least {XFS_MIN_BYTES} bytes")
        proto = workdir / "xfs.proto"
        proto.write_text(_xfs_protofile(src))
        label = ["-L", part.label] if part.label else []
        _run("mkfs.xfs", "-q", "-f", *label, "-p", str(proto), str(scratch))
    elif part.fs == "fat":
        label = ["-n", part.label] if part.label else []
        _run("mkfs.fat", *label, str(scratch))
        entries = sorted(src.iterdir())
        if entries:
            _run("mcopy", "-s", "-Q", "-i", str(scratch), *(str(e) for e in entries), "::")
    elif part.fs == "none":
        if part.files or part.source is not None:
            raise ValueError("a partition without a file system cannot hold files")
    else:  # pragma: no cover - Literal guards this
        raise ValueError(f"unknown file system {part.fs!r}")


def build_disk(path: Path, size: int, partitions: list[Partition], table: TableType = "gpt") -> DiskLayout:
    """Create the sparse raw image ``path`` of ``size`` bytes with ``partitions`` (1 MiB aligned)."""
    if size % MiB:
        raise ValueError("disk size must be a multiple of 1 MiB")
    for p in partitions:
        if p.size <= 0 or p.size % MiB:
            raise ValueError("partition sizes must be positive multiples of 1 MiB")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    layout = DiskLayout(path, size, table, ())
    if not partitions:
        return layout

    label = "gpt" if table == "gpt" else "dos"
    script = [f"label: {label}", "unit: sectors", ""]
    for p in partitions:
        script.append(f"size={p.size // 512}, type={_TYPE_CODES[table][p.fs]}")
    _run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path), stdin="\n".join(script).encode())
    info = json.loads(_run("sfdisk", "--json", str(path)))
    sector = int(info["partitiontable"].get("sectorsize", 512))
    placed = []
    for i, (spec, entry) in enumerate(zip(partitions, info["partitiontable"]["partitions"], strict=True)):
        start, psize = int(entry["start"]) * sector, int(entry["size"]) * sector
        if psize != spec.size:
            raise DiskBuildError(f"partition {i + 1}: sfdisk made {psize} bytes, asked {spec.size}")
        placed.append(PlacedPartition(i + 1, start, psize, spec))

    with tempfile.TemporaryDirectory(prefix="lab-disk-", dir=path.parent) as tmp:
        work = Path(tmp)
        for pp in placed:
            if pp.spec.fs == "none":
                continue
            scratch = work / f"part{pp.number}.img"
            _make_fs(pp.spec, scratch, work)
            _run(
                "dd",
                f"if={scratch}",
                f"of={path}",
                "bs=1M",
                f"seek={pp.start}",
                "oflag=seek_bytes",
                "conv=notrunc,sparse",
                "status=none",
            )
            scratch.unlink()
    return DiskLayout(path, size, table, tuple(placed))
