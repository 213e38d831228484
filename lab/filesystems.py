"""One partition's file system, made in a partition-sized scratch file without mounting.

``mke2fs -d`` for ext4, ``mkfs.xfs -p`` with a generated protofile for XFS, ``mkfs.fat`` +
``mcopy`` for FAT, ``mkntfs`` + ``ntfscp`` for NTFS, and for ``lvm`` an LVM2 physical volume
(written by :mod:`lab.lvm`) whose one logical volume holds an ext4 file system.
:mod:`lab.disks` places the scratch files into a disk image behind its partition table.

Builds are reproducible: file system UUIDs, volume IDs, hash seeds and file times are derived
from the partition (file system, label, size, number) rather than drawn at random or read from
the clock, so building the same partition twice with a slightly different tree gives images that
differ only where the trees do (what :func:`lab.guest.rewrite_partition` relies on to write few
blocks). ext4, FAT and LVM builds are byte-identical; mkfs.xfs and ntfscp stamp a few inodes with
the current time, so XFS and NTFS builds differ in one or two 64 KiB blocks.

NTFS
    ``mkntfs -F -f -T`` (zero time: fixed serial and times) on a scratch file, then one
    ``ntfscp`` per file. ntfs-3g has no tool that makes a directory without a FUSE mount, so
    NTFS partitions hold files at their root only (a nested path is refused).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal
from uuid import UUID, uuid5

from lab.lvm import LVM_PE_START, write_lvm_pv

MiB = 1024 * 1024
FsType = Literal["ext4", "xfs", "fat", "ntfs", "lvm", "none"]

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


def run_tool(*args: str, stdin: bytes | None = None, env: Mapping[str, str] | None = None) -> bytes:
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


def lab_uuid(name: str) -> UUID:
    """The reproducible UUID of the lab object ``name`` (a disk, a file system, its hash seed, ...)."""
    return uuid5(_UUID_NAMESPACE, name)


def fs_uuid(part: Partition, number: int, purpose: str = "fs") -> UUID:
    """The reproducible UUID of one lab file system (or of its hash seed, LVM ids, ...)."""
    return lab_uuid(f"{purpose}:{number}:{part.fs}:{part.label}:{part.size}")


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
    run_tool(
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
            run_tool("debugfs", "-w", "-f", str(script), str(scratch),
                     env={**os.environ, "E2FSPROGS_FAKE_TIME": str(FIXED_TIME)})  # fmt: skip
        finally:
            script.unlink()


def build_partition(part: Partition, number: int, scratch: Path, workdir: Path) -> None:
    """Make partition ``number``'s file system (``part``) in the file ``scratch``, using the
    directory ``workdir`` for its tree; the same call with the same content gives the same bytes."""
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
        run_tool("mkfs.xfs", "-q", "-f", "-m", uuid, *label, "-p", str(proto), str(scratch))
    elif part.fs == "fat":
        label = ["-n", part.label] if part.label else []
        volume_id = fs_uuid(part, number).hex[:8]
        run_tool("mkfs.fat", "--invariant", "-i", volume_id, *label, str(scratch))
        entries = sorted(src.iterdir())
        if entries:
            run_tool("mcopy", "-s", "-m", "-Q", "-i", str(scratch), *(str(e) for e in entries), "::")
    elif part.fs == "ntfs":
        make_ntfs(scratch, src, part)
    elif part.fs == "lvm":
        make_lvm(scratch, src, part, number, workdir)
    elif part.fs == "none":
        if part.files or part.source is not None or part.symlinks:
            raise ValueError("a partition without a file system cannot hold files")
    else:  # pragma: no cover - Literal guards this
        raise ValueError(f"unknown file system {part.fs!r}")


def make_lvm(scratch: Path, src: Path, part: Partition, number: int, workdir: Path) -> None:
    """Partition ``part`` as an LVM2 physical volume whose one logical volume holds an ext4
    file system of the tree ``src``."""
    if part.size < LVM_PE_START + 8 * MiB:
        raise ValueError("LVM partitions need at least 9 MiB")
    seed = str(fs_uuid(part, number, "lvm"))
    lv_offset, lv_size = write_lvm_pv(
        scratch, part.volume_group, part.logical_volume, seed, creation_time=FIXED_TIME
    )
    lv_image = workdir / f"lv{number}.img"
    make_ext4(lv_image, src, part, number, size=lv_size)
    fd_in = os.open(lv_image, os.O_RDONLY)
    fd_out = os.open(scratch, os.O_WRONLY)
    try:
        _copy_data(fd_in, fd_out, lv_offset, lv_size)
    finally:
        os.close(fd_in)
        os.close(fd_out)
    lv_image.unlink()


def _copy_data(fd_in: int, fd_out: int, offset: int, size: int) -> None:
    """Copy the data regions of the sparse file ``fd_in`` to ``fd_out`` at ``offset``."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd_in, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        hole = min(os.lseek(fd_in, data, os.SEEK_HOLE), size)
        while data < hole:
            chunk = os.pread(fd_in, min(MiB, hole - data), data)
            os.pwrite(fd_out, chunk, offset + data)
            data += len(chunk)
        pos = hole


def make_ntfs(scratch: Path, src: Path, part: Partition) -> None:
    """An NTFS file system in ``scratch`` with the files of ``src`` at its root."""
    label = ["-L", part.label] if part.label else []
    run_tool("mkntfs", "-F", "-f", "-q", "-T", *label, str(scratch))
    for entry in sorted(src.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            raise ValueError(f"NTFS lab partitions hold files at their root only, not {entry.name!r}/")
        run_tool("ntfscp", "-f", "-q", "-t", str(scratch), str(entry), f"/{entry.name}")
