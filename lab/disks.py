"""Raw disk images with a partition table and real file systems, built without mounting.

Each file system is made in a partition-sized scratch file (``mke2fs -d`` for ext4,
``mkfs.xfs -p`` with a generated protofile for XFS, ``mkfs.fat`` + ``mcopy`` for FAT, ``mkntfs``
+ ``ntfscp`` for NTFS, an LVM2 physical volume holding one ext4 logical volume for ``lvm``; the
last two live in :mod:`pyapp.lab.fsdisk`) and then copied into place with
``dd conv=notrunc,sparse``; the table is written by ``sfdisk``. Images stay sparse: unwritten
space is holes.

Builds are reproducible: table and file system UUIDs, volume IDs, hash seeds and file times are
derived from the disk and partition (file system, label, size, number) rather than drawn at
random or read from the clock, so building the same partition twice with a slightly different
tree gives images that differ only where the trees do (what
:func:`pyapp.lab.fsdisk.rewrite_partition` relies on to write few blocks). ext4, FAT and LVM
builds are byte-identical; mkfs.xfs and ntfscp stamp a few inodes with the current time, so
XFS and NTFS builds differ in one or two 64 KiB blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal
from uuid import UUID, uuid5

MiB = 1024 * 1024
FsType = Literal["ext4", "xfs", "fat", "ntfs", "lvm", "none"]
TableType = Literal["gpt", "dos"]

# sfdisk partition type per file system, for each table type.
_TYPE_CODES: dict[TableType, dict[FsType, str]] = {
    "gpt": {
        "ext4": "L",
        "xfs": "L",
        "fat": "U",
        "ntfs": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",  # Microsoft basic data
        "lvm": "E6D6D379-F507-44C2-A23C-238F2A3DF928",  # Linux LVM
        "none": "L",
    },
    "dos": {"ext4": "83", "xfs": "83", "fat": "0c", "ntfs": "07", "lvm": "8e", "none": "83"},
}
#: The time given to every file, directory and symlink of a lab file system (reproducible builds).
FIXED_TIME = 1_700_000_000
_UUID_NAMESPACE = UUID("6c61622d-6469-736b-0000-000000000000")
XFS_MIN_BYTES = 300 * MiB  # xfsprogs >= 5.19 refuses smaller file systems


class DiskBuildError(RuntimeError):
    """A tool failed while building an image; the message carries its stderr."""


@dataclass(frozen=True)
class Partition:
    """One partition: its size, file system, label and content: the tree under ``source`` (if
    given) plus ``files`` (relative POSIX path -> bytes) and ``symlinks`` (relative POSIX path ->
    link target, ext4/XFS/LVM only) on top. ``fs="lvm"`` makes the partition an LVM2 physical
    volume of the volume group ``volume_group`` holding one linear logical volume
    ``logical_volume`` (all the extents) with an ext4 file system of the content."""

    size: int
    fs: FsType = "ext4"
    label: str = ""
    files: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    source: Path | None = None
    symlinks: Mapping[str, str] = field(default_factory=dict, repr=False)
    volume_group: str = "labvg"
    logical_volume: str = "data"


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


def _run(*args: str, stdin: bytes | None = None, env: Mapping[str, str] | None = None) -> bytes:
    proc = subprocess.run(args, input=stdin, capture_output=True, check=False, env=env)
    if proc.returncode != 0:
        raise DiskBuildError(
            f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout


def _inside(root: Path, rel: str) -> Path:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"file path must stay inside the file system: {rel!r}")
    return root.joinpath(*p.parts)


def _populate(root: Path, files: Mapping[str, bytes], symlinks: Mapping[str, str] | None = None) -> None:
    """Write ``files`` and ``symlinks`` under ``root``, then give every entry :data:`FIXED_TIME`.

    Symlink targets are stored as given (they may point anywhere: the lab builds hostile guests
    too); the tools below copy them as links, never through them."""
    for rel, data in files.items():
        target = _inside(root, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    for rel, link in (symlinks or {}).items():
        target = _inside(root, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(link)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in (*filenames, *dirnames):
            os.utime(os.path.join(dirpath, name), (FIXED_TIME, FIXED_TIME), follow_symlinks=False)
    os.utime(root, (FIXED_TIME, FIXED_TIME))


def fs_uuid(part: Partition, number: int, purpose: str = "fs") -> UUID:
    """The reproducible UUID of one lab file system (or of its hash seed, LVM ids, ...)."""
    return uuid5(_UUID_NAMESPACE, f"{purpose}:{number}:{part.fs}:{part.label}:{part.size}")


def _xfs_protofile(root: Path) -> str:
    """An mkfs.xfs protofile describing the tree under ``root`` (see mkfs.xfs(8), "-p")."""
    lines = ["/dev/null", "0 0", "d--755 0 0"]

    def walk(d: Path, depth: int) -> None:
        pad = " " * depth
        for entry in sorted(d.iterdir()):
            if entry.is_symlink():  # before is_dir(), which follows links
                lines.append(f"{pad}{entry.name} l--777 0 0 {os.readlink(entry)}")
            elif entry.is_dir():
                lines.append(f"{pad}{entry.name} d--755 0 0")
                walk(entry, depth + 1)
                lines.append(f"{pad}$")
            else:
                lines.append(f"{pad}{entry.name} ---644 0 0 {entry}")

    walk(root, 1)
    lines.append("$")
    return "\n".join(lines) + "\n"


def make_ext4(scratch: Path, src: Path, part: Partition, number: int, size: int | None = None) -> None:
    """An ext4 file system of the tree ``src`` in ``scratch`` (``size`` bytes, default the
    partition's), reproducible: fixed UUID, hash seed and creation time."""
    with scratch.open("wb") as f:
        f.truncate(size if size is not None else part.size)
    label = ["-L", part.label] if part.label else []
    _run(
        "mke2fs", "-q", "-F", "-t", "ext4", "-U", str(fs_uuid(part, number)),
        "-E", f"root_owner=0:0,hash_seed={fs_uuid(part, number, 'hash')}",
        *label, "-d", str(src), str(scratch),
        env={**os.environ, "E2FSPROGS_FAKE_TIME": str(FIXED_TIME)},
    )  # fmt: skip
    # mke2fs -d copies each inode's ctime from the host, which no one can set: fix it afterwards.
    commands = [
        f'sif "/{entry.relative_to(src).as_posix()}" ctime @{FIXED_TIME}' for entry in sorted(src.rglob("*"))
    ]
    if commands:
        script = scratch.with_name(scratch.name + ".debugfs")
        script.write_bytes(os.fsencode("\n".join(commands) + "\n"))  # names need not be UTF-8
        try:
            _run("debugfs", "-w", "-f", str(script), str(scratch),
                 env={**os.environ, "E2FSPROGS_FAKE_TIME": str(FIXED_TIME)})  # fmt: skip
        finally:
            script.unlink()


def _make_fs(part: Partition, scratch: Path, workdir: Path, number: int = 0) -> None:
    src = workdir / "root"
    if src.exists():
        shutil.rmtree(src)
    if part.source is not None:
        shutil.copytree(part.source, src, symlinks=True)
    else:
        src.mkdir()
    if part.symlinks and part.fs not in ("ext4", "xfs", "lvm"):
        raise ValueError(f"{part.fs} partitions cannot hold symlinks in the lab")
    _populate(src, part.files, part.symlinks)
    if part.fs == "ext4":
        make_ext4(scratch, src, part, number)
        return
    with scratch.open("wb") as f:
        f.truncate(part.size)
    if part.fs == "xfs":
        if part.size < XFS_MIN_BYTES:
            raise ValueError(f"XFS partitions need at least {XFS_MIN_BYTES} bytes")
        proto = workdir / "xfs.proto"
        proto.write_text(_xfs_protofile(src))
        label = ["-L", part.label] if part.label else []
        uuid = f"uuid={fs_uuid(part, number)}"
        _run("mkfs.xfs", "-q", "-f", "-m", uuid, *label, "-p", str(proto), str(scratch))
    elif part.fs == "fat":
        label = ["-n", part.label] if part.label else []
        volume_id = fs_uuid(part, number).hex[:8]
        _run("mkfs.fat", "--invariant", "-i", volume_id, *label, str(scratch))
        entries = sorted(src.iterdir())
        if entries:
            _run("mcopy", "-s", "-m", "-Q", "-i", str(scratch), *(str(e) for e in entries), "::")
    elif part.fs in ("ntfs", "lvm"):
        from pyapp.lab import fsdisk  # it builds on this module

        if part.fs == "ntfs":
            fsdisk.make_ntfs(scratch, src, part)
        else:
            fsdisk.make_lvm(scratch, src, part, number, workdir)
    elif part.fs == "none":
        if part.files or part.source is not None or part.symlinks:
            raise ValueError("a partition without a file system cannot hold files")
    else:  # pragma: no cover - Literal guards this
        raise ValueError(f"unknown file system {part.fs!r}")


def place(scratch: Path, image: Path, offset: int) -> None:
    """Copy the file ``scratch`` into ``image`` at ``offset`` bytes, keeping holes."""
    _run(
        "dd",
        f"if={scratch}",
        f"of={image}",
        "bs=1M",
        f"seek={offset}",
        "oflag=seek_bytes",
        "conv=notrunc,sparse",
        "status=none",
    )


def build_partition(part: Partition, number: int, scratch: Path, workdir: Path) -> None:
    """Make partition ``number``'s file system (``part``) in the file ``scratch``, using the
    directory ``workdir`` for its tree; the same call with the same content gives the same bytes."""
    _make_fs(part, scratch, workdir, number)


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
    disk_id = uuid5(_UUID_NAMESPACE, f"disk:{size}:{table}:{[(p.fs, p.label, p.size) for p in partitions]}")
    label_id = str(disk_id) if table == "gpt" else f"0x{disk_id.hex[:8]}"
    script = [f"label: {label}", f"label-id: {label_id}", "unit: sectors", ""]
    for number, p in enumerate(partitions, 1):
        part_uuid = f", uuid={fs_uuid(p, number, 'partition')}" if table == "gpt" else ""
        script.append(f"size={p.size // 512}, type={_TYPE_CODES[table][p.fs]}{part_uuid}")
    _run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path), stdin="\n".join(script).encode())
    info = json.loads(_run("sfdisk", "--json", str(path)))
    sector = int(info["partitiontable"].get("sectorsize", 512))
    placed = []
    for i, (spec, entry) in enumerate(zip(partitions, info["partitiontable"]["partitions"], strict=True)):
        start, psize = int(entry["start"]) * sector, int(entry["size"]) * sector
        if psize != spec.size:
            raise DiskBuildError(f"partition {i + 1}: sfdisk made {psize} bytes, asked {spec.size}")
        placed.append(PlacedPartition(i + 1, start, psize, spec))

    _write_file_systems(path, placed)
    return DiskLayout(path, size, table, tuple(placed))


def _write_file_systems(path: Path, placed: list[PlacedPartition]) -> None:
    """Make each placed partition's file system in a scratch image and write it at its offset."""
    with tempfile.TemporaryDirectory(prefix="lab-disk-", dir=path.parent) as tmp:
        work = Path(tmp)
        for pp in placed:
            if pp.spec.fs == "none":
                continue
            scratch = work / f"part{pp.number}.img"
            _make_fs(pp.spec, scratch, work, pp.number)
            place(scratch, path, pp.start)
            scratch.unlink()


def build_dos_disk_with_logicals(
    path: Path, size: int, primaries: list[Partition], logicals: list[Partition]
) -> DiskLayout:
    """An MBR disk as Linux numbers it: ``primaries`` in slots 1, 2, ..., then an extended
    partition over the rest of the disk holding ``logicals``, which Linux (and ``sfdisk``)
    number 5, 6, ... Each logical partition sits behind its own extended boot record (1 MiB
    aligned, as ``sfdisk`` places them). The layout lists the primaries and the logicals (not
    the extended container) with their numbers."""
    if size % MiB:
        raise ValueError("disk size must be a multiple of 1 MiB")
    if len(primaries) > 3 or not logicals:
        raise ValueError("at most 3 primary partitions and at least one logical partition")
    for p in (*primaries, *logicals):
        if p.size <= 0 or p.size % MiB:
            raise ValueError("partition sizes must be positive multiples of 1 MiB")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    everything = [*primaries, *logicals]
    disk_id = uuid5(
        _UUID_NAMESPACE, f"disk:{size}:dos+logical:{[(p.fs, p.label, p.size) for p in everything]}"
    )
    script = ["label: dos", f"label-id: 0x{disk_id.hex[:8]}", "unit: sectors", ""]
    script += [f"size={p.size // 512}, type={_TYPE_CODES['dos'][p.fs]}" for p in primaries]
    script.append("type=5")  # the extended partition: the rest of the disk
    script += [f"size={p.size // 512}, type={_TYPE_CODES['dos'][p.fs]}" for p in logicals]
    _run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path), stdin="\n".join(script).encode())
    info = json.loads(_run("sfdisk", "--json", str(path)))
    sector = int(info["partitiontable"].get("sectorsize", 512))
    entries = [e for e in info["partitiontable"]["partitions"] if e["type"] not in ("5", "f", "85")]
    numbers = [*range(1, len(primaries) + 1), *range(5, 5 + len(logicals))]
    placed = []
    for number, spec, entry in zip(numbers, everything, entries, strict=True):
        node_number = int(str(entry["node"]).removeprefix(str(path)))
        if node_number != number:
            raise DiskBuildError(f"sfdisk numbered partition {number} as {node_number}")
        start, psize = int(entry["start"]) * sector, int(entry["size"]) * sector
        if psize != spec.size:
            raise DiskBuildError(f"partition {number}: sfdisk made {psize} bytes, asked {spec.size}")
        placed.append(PlacedPartition(number, start, psize, spec))
    _write_file_systems(path, placed)
    return DiskLayout(path, size, "dos", tuple(placed))
