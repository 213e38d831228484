"""The typed boundary over dissect: volumes of a disk and the file systems on them.

dissect ships no type information, so everything it returns stays inside this module as
``Any`` and leaves it as :class:`Entry` (plain data plus an opaque handle) and :class:`FileSystem`
(five operations: root, children, lookup, open, the type). The rest of ``oma.restore`` never
imports dissect.

Volumes: the disk's partition table (GPT or MBR, through ``dissect.volume``); inside each
partition either an LVM2 physical volume (each linear logical volume becomes a volume
``lvm-<vg>-<lv>``) or a file system (``part<N>``). A disk without a partition table that holds a
file system (or an LVM2 PV) directly gives the volume ``disk`` (or its logical volumes). File
systems are recognised by their magic numbers before dissect parses them: ext2/3/4, XFS, NTFS,
FAT12/16/32. Partitions with none of them (swap, empty space, BIOS boot) are not volumes. A
volume group spread over several physical volumes is not browsable (each PV is read alone).

Every call here blocks (it reads the image): callers run them in worker threads, serialised per
image (see :mod:`oma.restore.mount`), because dissect's streams seek and read one shared file
object.
"""

from __future__ import annotations

import datetime as dt
import logging
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

from dissect.extfs import ExtFS  # type: ignore[import-untyped]
from dissect.fat import FATFS  # type: ignore[import-untyped]
from dissect.ntfs import NTFS  # type: ignore[import-untyped]
from dissect.ntfs.util import segment_reference  # type: ignore[import-untyped]
from dissect.volume.disk import Disk  # type: ignore[import-untyped]
from dissect.volume.lvm import LVM2  # type: ignore[import-untyped]
from dissect.xfs import XFS  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

Kind = Literal["file", "directory", "symlink", "other"]
_EXT_MAGIC_OFFSET = 1024 + 56
_NTFS_SYSTEM_RECORDS = 24  # MFT records 0-23 are NTFS metadata ($MFT, $Bitmap, ..., reserved)
_NTFS_STANDARD_INFORMATION = 0x10
_NTFS_REPARSE_POINT = 0xC0
_NTFS_SYSTEM_FILE = 0x4  # FILE_ATTRIBUTE_SYSTEM
_INTERIX_MAGIC = b"IntxLNK\x01"
_INTERIX_MAX = 8 + 2 * 4096  # magic + a PATH_MAX target in UTF-16


class NoFileSystem(Exception):
    """The disk (or the asked volume) holds no file system this module reads."""


@dataclass(frozen=True)
class Entry:
    """One directory entry: what ``stat`` tells, and the file system's own handle."""

    name: str
    kind: Kind
    size: int
    mode: int | None = None  # permission bits, when the file system has them
    uid: int | None = None
    gid: int | None = None
    modified: dt.datetime | None = None
    accessed: dt.datetime | None = None
    created: dt.datetime | None = None
    link_target: str | None = None
    #: The file's identity in its file system (inode, MFT record, first cluster), when known:
    #: walks use it to never enter one directory twice (a damaged or hostile image may link a
    #: directory below itself).
    inode: int | None = None
    handle: Any = field(default=None, compare=False, repr=False)


class FileSystem(ABC):
    """One file system of a volume. Subclasses adapt one dissect parser: they list raw
    ``(name, handle)`` pairs cheaply and build an :class:`Entry` (which reads the inode or MFT
    record) only for the entries asked for."""

    fs_type: str = ""
    #: FAT and NTFS names match case-insensitively (an exact match still wins).
    case_insensitive: bool = False

    @abstractmethod
    def root(self) -> Entry: ...

    @abstractmethod
    def _raw_children(self, directory: Entry) -> Iterator[tuple[str, Any]]:
        """``(name, handle)`` of each entry of ``directory``, without ``.``, ``..`` and metadata."""

    @abstractmethod
    def _entry(self, handle: Any, name: str) -> Entry: ...

    def open(self, entry: Entry) -> BinaryIO:
        """A seekable reader of a regular file's content."""
        reader: BinaryIO = entry.handle.open()
        return reader

    def children(self, directory: Entry) -> Iterator[Entry]:
        for name, handle in self._raw_children(directory):
            yield self._entry(handle, name)

    def lookup(self, directory: Entry, name: str) -> Entry | None:
        """The entry called ``name`` in ``directory``, or None."""
        folded: tuple[str, Any] | None = None
        for child_name, handle in self._raw_children(directory):
            if child_name == name:
                return self._entry(handle, child_name)
            if self.case_insensitive and folded is None and child_name.casefold() == name.casefold():
                folded = (child_name, handle)
        return self._entry(folded[1], folded[0]) if folded is not None else None


def _kind_of(mode: int) -> Kind:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


class _InodeFileSystem(FileSystem):
    """ext and XFS: POSIX inodes with mode, owner and nanosecond times."""

    def __init__(self, fs: Any, fs_type: str) -> None:
        self._fs = fs
        self.fs_type = fs_type

    @abstractmethod
    def _mode_uid_gid(self, inode: Any) -> tuple[int, int, int]: ...

    def _entry(self, handle: Any, name: str) -> Entry:
        mode, uid, gid = self._mode_uid_gid(handle.inode)
        kind = _kind_of(mode)
        return Entry(
            name=name,
            kind=kind,
            size=int(handle.size) if kind != "directory" else 0,
            mode=stat.S_IMODE(mode),
            uid=uid,
            gid=gid,
            modified=handle.mtime,
            accessed=handle.atime,
            created=handle.crtime,
            link_target=str(handle.link) if kind == "symlink" else None,
            inode=int(handle.inum),
            handle=handle,
        )

    def root(self) -> Entry:
        return self._entry(self._fs.get("/"), "")

    def _raw_children(self, directory: Entry) -> Iterator[tuple[str, Any]]:
        for node in directory.handle.iterdir():
            if node.filename not in (".", ".."):
                yield str(node.filename), node


class ExtFileSystem(_InodeFileSystem):
    def __init__(self, fh: BinaryIO) -> None:
        fs = ExtFS(fh)
        super().__init__(fs, {2: "ext2", 3: "ext3"}.get(int(fs.type), "ext4"))

    def _mode_uid_gid(self, inode: Any) -> tuple[int, int, int]:
        uid = int(inode.i_uid) | (int(inode.i_uid_high) << 16)
        gid = int(inode.i_gid) | (int(inode.i_gid_high) << 16)
        return int(inode.i_mode), uid, gid


class XfsFileSystem(_InodeFileSystem):
    def __init__(self, fh: BinaryIO) -> None:
        super().__init__(XFS(fh), "xfs")

    def _mode_uid_gid(self, inode: Any) -> tuple[int, int, int]:
        return int(inode.di_mode), int(inode.di_uid), int(inode.di_gid)


class FatFileSystem(FileSystem):
    """FAT12/16/32: no owner and no modes (read-only files show 0555, others 0644/0755), local
    (zone-less) times; the volume label entry is not a file."""

    fs_type = "fat"
    case_insensitive = True

    def __init__(self, fh: BinaryIO) -> None:
        self._fs = FATFS(fh)

    def _entry(self, handle: Any, name: str) -> Entry:
        is_dir = bool(handle.is_directory())
        return Entry(
            name=name,
            kind="directory" if is_dir else "file",
            size=0 if is_dir else int(handle.size),
            mode=0o555 if handle.is_readonly() else 0o755 if is_dir else 0o644,
            modified=handle.mtime,
            accessed=handle.atime,
            created=handle.ctime,
            inode=int(handle.cluster) if handle.cluster is not None else None,
            handle=handle,
        )

    def root(self) -> Entry:
        return self._entry(self._fs.root, "")

    def _raw_children(self, directory: Entry) -> Iterator[tuple[str, Any]]:
        for node in directory.handle.iterdir():
            name = _fat_name(node)
            if name not in (".", "..") and not node.is_volume_id():
                yield name, node


#: DIR_NTRes flags (set by Windows NT and later, and by mtools): the 8.3 name's base and
#: extension are stored upper case but are lower case names.
_FAT_LOWER_BASE = 0x08
_FAT_LOWER_EXT = 0x10


def _fat_name(node: Any) -> str:
    """The name the guest sees: the long name, else the 8.3 name with its case flags applied
    (``readme.txt`` is stored as ``README  TXT`` + flags, and has no long name)."""
    if node.ldirents:
        return str(node.name)
    name = str(node.short_name)
    flags = int(node.dirent.DIR_NTRes)
    base, dot, ext = name.partition(".")
    if flags & _FAT_LOWER_BASE:
        base = base.lower()
    if flags & _FAT_LOWER_EXT:
        ext = ext.lower()
    return base + dot + ext


class NtfsFileSystem(FileSystem):
    """NTFS: the default data stream of each file; the metadata files of the root ($MFT, ...)
    and DOS 8.3 aliases are hidden. Symbolic links and junctions (reparse points) keep their
    target: a relative one with ``/`` separators, an absolute one (a drive or device path, which
    cannot be resolved inside one volume) as ``/`` + the Windows path, which the path resolver
    refuses like any absolute target. The symlinks ntfs-3g writes by default (Interix links: a
    small system file holding ``IntxLNK\\1`` and the UTF-16 target) are symlinks too."""

    fs_type = "ntfs"
    case_insensitive = True

    def __init__(self, fh: BinaryIO) -> None:
        self._fs = NTFS(fh)
        self._root_segment = int(self._fs.mft.root.segment)

    def _entry(self, handle: Any, name: str) -> Entry:
        record = handle.dereference() if hasattr(handle, "dereference") else handle
        kind: Kind = "directory" if record.is_dir() else "file"
        target: str | None = None
        if record.is_symlink() or record.is_mount_point():
            reparse = record.attributes[_NTFS_REPARSE_POINT][0]
            raw = str(reparse.print_name or reparse.substitute_name or "").replace("\\", "/")
            target = raw if reparse.relative else "/" + raw
            kind = "symlink"
        infos = record.attributes[_NTFS_STANDARD_INFORMATION]
        info = infos[0] if infos else None
        size = int(record.size()) if kind == "file" and record.has_stream("") else 0
        if kind == "file" and info is not None and info.file_attributes & _NTFS_SYSTEM_FILE:
            interix = _interix_target(record, size)
            if interix is not None:
                kind, target, size = "symlink", interix, len(interix)
        return Entry(
            name=name,
            kind=kind,
            size=size,
            modified=info.last_modification_time if info is not None else None,
            accessed=info.last_access_time if info is not None else None,
            created=info.creation_time if info is not None else None,
            link_target=target,
            inode=int(record.segment),
            handle=record,
        )

    def root(self) -> Entry:
        return self._entry(self._fs.mft.root, "")

    def _raw_children(self, directory: Entry) -> Iterator[tuple[str, Any]]:
        at_root = int(directory.handle.segment) == self._root_segment
        for index_entry in directory.handle.iterdir(ignore_dos=True):
            name = str(index_entry.attribute.file_name)
            if name == ".":
                continue
            if at_root and name.startswith("$") and _segment(index_entry) < _NTFS_SYSTEM_RECORDS:
                continue
            yield name, index_entry


def _interix_target(record: Any, size: int) -> str | None:
    """The target of an Interix symbolic link (as ntfs-3g writes them), or None."""
    if not len(_INTERIX_MAGIC) < size <= _INTERIX_MAX:
        return None
    data = record.open().read(size)
    if not data.startswith(_INTERIX_MAGIC):
        return None
    try:
        return str(data[len(_INTERIX_MAGIC) :].decode("utf-16-le"))
    except UnicodeDecodeError:
        return None


def _segment(index_entry: Any) -> int:
    return int(segment_reference(index_entry.header.FileReference))


def _read_at(fh: BinaryIO, offset: int, length: int) -> bytes:
    fh.seek(offset)
    return fh.read(length)


def probe_file_system(fh: BinaryIO) -> FileSystem | None:
    """The file system at the start of ``fh``, recognised by its magic, or None."""
    openers: list[tuple[Callable[[BinaryIO], bool], Callable[[BinaryIO], FileSystem]]] = [
        (lambda f: _read_at(f, _EXT_MAGIC_OFFSET, 2) == b"\x53\xef", ExtFileSystem),
        (lambda f: _read_at(f, 0, 4) == b"XFSB", XfsFileSystem),
        (lambda f: _read_at(f, 3, 8) == b"NTFS    ", NtfsFileSystem),
        (
            lambda f: _read_at(f, 510, 2) == b"\x55\xaa" and _read_at(f, 0, 1) in (b"\xeb", b"\xe9"),
            FatFileSystem,
        ),
    ]
    for matches, opener in openers:
        try:
            if not matches(fh):
                continue
            fh.seek(0)
            return opener(fh)
        except Exception as exc:  # a damaged or unsupported variant: not a volume we can browse
            log.warning("file system probe failed: %s", exc, extra={"action": "restore_probe"})
            return None
    return None


@dataclass(frozen=True)
class Volume:
    """One browsable file system of a disk."""

    name: str  # part<N>, lvm-<vg>-<lv>, disk
    source: Literal["partition", "lvm", "disk"]
    offset: int  # of the partition (or disk) holding it
    size: int  # of the file system's container (partition or logical volume)
    fs: FileSystem = field(compare=False, repr=False)

    @property
    def filesystem_type(self) -> str:
        return self.fs.fs_type

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "filesystem_type": self.filesystem_type,
            "offset": self.offset,
            "size": self.size,
            "source": self.source,
        }


def _lvm_volumes(stream: BinaryIO, offset: int) -> list[Volume] | None:
    """The file systems of the logical volumes of an LVM2 PV in ``stream``; None if no PV."""
    try:
        stream.seek(0)
        lvm = LVM2(stream)
    except Exception:
        return None
    out = []
    vg = lvm.volume_group
    for lv in vg.lv:
        if not lv.is_visible:
            continue
        try:
            lv_stream = lv.open()
        except Exception as exc:  # thin pools, RAID, missing PVs: not browsable
            log.warning("LVM volume %s/%s not readable: %s", vg.name, lv.name, exc)
            continue
        fs = probe_file_system(lv_stream)
        if fs is not None:
            size = sum(int(s.extent_count) for s in lv.segments) * int(vg.extent_size) * 512
            out.append(Volume(f"lvm-{vg.name}-{lv.name}", "lvm", offset, size, fs))
    return out


#: MBR partition types of an extended partition (a container of logical partitions).
_EXTENDED_TYPES = (0x05, 0x0F, 0x85)


def linux_numbers(disk: Any) -> dict[int, int]:
    """Partition numbers as Linux gives them, by partition offset. For an MBR disk: a primary
    partition is numbered by its slot in the table (1-4), and the logical partitions of the
    extended partition 5, 6, ... in the order of its chain (dissect numbers them after the
    primaries, 2, 3, ...); any other scheme keeps dissect's numbers."""
    numbers = {int(p.offset): int(p.number) for p in disk.partitions}
    if type(disk.scheme).__name__ != "MBR":
        return numbers
    sector_size = int(disk.sector_size)
    table = disk.scheme.mbr.part
    primaries: dict[int, int] = {}
    extended: list[tuple[int, int]] = []
    for slot, entry in enumerate(table, 1):
        if entry.type == 0:
            continue
        start = int(disk.scheme.offset) + int(entry.sector_ofs) * sector_size
        if entry.type in _EXTENDED_TYPES:
            extended.append((start, start + int(entry.sector_size) * sector_size))
        else:
            primaries[start] = slot
    logical = 5
    for part in disk.partitions:  # dissect lists the logical partitions in chain order
        offset = int(part.offset)
        if offset in primaries:
            numbers[offset] = primaries[offset]
        elif any(lo <= offset < hi for lo, hi in extended):
            numbers[offset] = logical
            logical += 1
    return numbers


def find_volumes(fh: BinaryIO) -> list[Volume]:
    """Every file system of the disk read through ``fh``, in disk order. Partitions are named
    ``part<N>`` with Linux's number N (MBR logical partitions are 5, 6, ...)."""
    size = fh.seek(0, 2)
    fh.seek(0)
    try:
        disk = Disk(fh)
    except Exception:
        disk = None
    numbers = linux_numbers(disk) if disk is not None else {}
    volumes: list[Volume] = []
    for part in disk.partitions if disk is not None else ():
        if part.size <= 0 or part.type in (*_EXTENDED_TYPES, 0xEE):
            continue
        lvm = _lvm_volumes(part.open(), int(part.offset))
        if lvm is not None:
            volumes.extend(lvm)
            continue
        fs = probe_file_system(part.open())
        if fs is not None:
            number = numbers.get(int(part.offset), int(part.number))
            volumes.append(Volume(f"part{number}", "partition", int(part.offset), int(part.size), fs))
    if volumes:
        return volumes
    # No table, or a "table" that is really a file system's boot sector (a FAT made by
    # mkfs.fat on a whole disk passes for an MBR): the disk itself.
    lvm = _lvm_volumes(fh, 0)
    if lvm is not None:
        return lvm
    fs = probe_file_system(fh)
    return [Volume("disk", "disk", 0, size, fs)] if fs is not None else []
