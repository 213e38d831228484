"""A backup point opened for browsing: its volumes, the mount root, list, stat, read, walk.

A :class:`Mount` owns one read-only :class:`~pyapp.mover.ImageFile` over the point's QCOW2 chain
and the dissect parsers of its volumes (:mod:`oma.restore.filesystems`). Root semantics: a mount
exposing one volume has that file system's root as its root; with several, the root is a
directory of one directory per volume (``part1``, ``lvm-vg-lv``, ...).

Every method blocks and is meant for a worker thread. dissect's streams share the image's file
object (seek, then read), so the mount serialises them with one lock, held per operation: a
listing, a stat, or one read of an open file (:class:`LockedReader`). A long download therefore
interleaves with other requests on the same mount instead of holding it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import itertools
import logging
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Any, BinaryIO, cast

from oma.restore.filesystems import Entry, FileSystem, Volume, find_volumes
from oma.restore.paths import NOT_A_DIRECTORY, display, resolve, split_request_path
from pyapp.api import ApiError
from pyapp.mover import ImageFile, open_image

log = logging.getLogger(__name__)

VOLUME_NOT_FOUND = "VOLUME_NOT_FOUND"
NO_FILESYSTEM = "NO_FILESYSTEM"
IS_A_DIRECTORY = "IS_A_DIRECTORY"
NOT_A_FILE = "NOT_A_FILE"


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601: UTC times with ``Z``; FAT's zone-less local times as they are."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.isoformat()
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Located:
    """An entry found below the mount root: its volume (None: the multi-volume root) and its
    canonical path from the mount root."""

    volume: Volume | None
    entry: Entry
    parts: tuple[str, ...]

    @property
    def path(self) -> str:
        return display(self.parts)


class LockedReader(io.RawIOBase):
    """A file of the backup, read under its mount's lock (one seek + read per call)."""

    def __init__(self, inner: Any, lock: threading.Lock, size: int) -> None:
        super().__init__()
        self._inner = inner
        self._lock = lock
        self._pos = 0
        self.size = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read of a closed file")
        if size is None or size < 0:
            size = max(0, self.size - self._pos)
        with self._lock:
            self._inner.seek(self._pos)
            data: bytes = self._inner.read(size)
        self._pos += len(data)
        return data


class Mount:
    """The volumes of one backup point, browsable by path (see the module doc)."""

    def __init__(self, image: ImageFile, volumes: list[Volume]) -> None:
        if not volumes:
            raise ApiError.unprocessable("no file system to mount")
        self._image = image
        self._lock = threading.Lock()
        self.volumes = volumes
        self._by_name = {v.name: v for v in volumes}

    @classmethod
    def open(cls, path: str | PathLike[str], volumes: list[str] | None = None) -> Mount:
        """Open the image at ``path`` and find its file systems; ``volumes`` keeps only those
        (by name). Raises :class:`ApiError` when there is nothing (or not that) to browse."""
        image = open_image(path)
        try:
            found = find_volumes(cast(BinaryIO, image))  # an io.RawIOBase, binary and seekable
            if not found:
                raise ApiError(
                    422,
                    NO_FILESYSTEM,
                    "the disk holds no file system that can be browsed"
                    " (ext2/3/4, XFS, NTFS, FAT, inside MBR/GPT partitions or LVM2)",
                )
            if volumes is not None:
                names = {v.name for v in found}
                missing = [n for n in volumes if n not in names]
                if missing:
                    raise ApiError.not_found(
                        f"no volume {missing[0]!r} on this disk; volumes: {sorted(names)}", VOLUME_NOT_FOUND
                    )
                found = [v for v in found if v.name in volumes]
            return cls(image, found)
        except BaseException:
            image.close()
            raise

    @property
    def filesystem_type(self) -> str:
        types = sorted({v.filesystem_type for v in self.volumes})
        return types[0] if len(types) == 1 else ",".join(types)

    def close(self) -> None:
        with self._lock:
            self._image.close()

    @property
    def closed(self) -> bool:
        return bool(self._image.closed)

    # -- resolution ---------------------------------------------------------------------------

    def _root_of(self, volume: Volume) -> Entry:
        return dataclasses.replace(volume.fs.root(), name=volume.name)

    def _virtual_root(self) -> Entry:
        return Entry(name="", kind="directory", size=0, mode=0o555)

    def _locate(self, raw_path: str, *, follow_last: bool) -> Located:
        parts = split_request_path(raw_path)
        if len(self.volumes) == 1:
            volume = self.volumes[0]
            entry, canonical = resolve(volume.fs, parts, follow_last=follow_last)
            return Located(volume, entry, canonical)
        if not parts:
            return Located(None, self._virtual_root(), ())
        volume_or_none = self._by_name.get(parts[0])
        if volume_or_none is None:
            raise ApiError.not_found(
                f"/{parts[0]} does not exist; volumes: {sorted(self._by_name)}", "PATH_NOT_FOUND"
            )
        volume = volume_or_none
        entry, canonical = resolve(volume.fs, parts[1:], follow_last=follow_last, prefix=(volume.name,))
        if not canonical:
            entry = self._root_of(volume)
        return Located(volume, entry, (volume.name, *canonical))

    def _children(self, where: Located) -> list[Located]:
        if where.volume is None:
            return [Located(v, self._root_of(v), (v.name,)) for v in self.volumes]
        fs: FileSystem = where.volume.fs
        kids = [Located(where.volume, e, (*where.parts, e.name)) for e in fs.children(where.entry)]
        kids.sort(key=lambda k: k.entry.name)
        return kids

    def describe(self, where: Located) -> dict[str, Any]:
        """The FileInfo of an entry (the API's shape). Names that are not UTF-8 on disk (kept by
        dissect as surrogate escapes) are shown with U+FFFD: such a file is listed and archived
        (with its exact name), but cannot be named in a request."""
        e = where.entry
        return {
            "name": shown(e.name) or "/",
            "path": shown(where.path),
            "type": e.kind,
            "size": e.size,
            "mode": f"{e.mode:04o}" if e.mode is not None else None,
            "permissions": stat.filemode(_type_bits(e.kind) | e.mode) if e.mode is not None else None,
            "uid": e.uid,
            "gid": e.gid,
            "modified": iso(e.modified),
            "accessed": iso(e.accessed),
            "created": iso(e.created),
            "symlink_target": shown(e.link_target) if e.link_target is not None else None,
            "volume": where.volume.name if where.volume is not None else None,
            "filesystem_type": where.volume.filesystem_type if where.volume is not None else None,
        }

    # -- operations (blocking) ----------------------------------------------------------------

    def stat(self, raw_path: str) -> dict[str, Any]:
        """The entry at ``raw_path`` itself (a symlink is described, not followed)."""
        with self._lock:
            return self.describe(self._locate(raw_path, follow_last=False))

    def listdir(self, raw_path: str, *, recursive: bool, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """The entries below the directory ``raw_path`` (a symlink to a directory is followed for
        the start only, never while recursing). Returns at most ``limit`` entries and whether
        more were left out."""
        start = self.locate_directory(raw_path)
        found = list(itertools.islice(self.walk(start, recursive=recursive), limit + 1))
        return [self.describe(where) for _, where in found[:limit]], len(found) > limit

    def open_file(self, raw_path: str) -> tuple[LockedReader, dict[str, Any]]:
        """A reader of the regular file at ``raw_path`` (symlinks followed inside) and its info."""
        with self._lock:
            where = self._locate(raw_path, follow_last=True)
            if where.entry.kind == "directory":
                raise ApiError(400, IS_A_DIRECTORY, f"{where.path} is a directory; use download-directory")
            if where.entry.kind != "file" or where.volume is None:
                raise ApiError(400, NOT_A_FILE, f"{where.path} is not a regular file")
            inner = where.volume.fs.open(where.entry)
            return LockedReader(inner, self._lock, where.entry.size), self.describe(where)

    def locate_directory(self, raw_path: str) -> Located:
        """The directory at ``raw_path`` (symlinks followed inside); 400 when it is not one."""
        with self._lock:
            where = self._locate(raw_path, follow_last=True)
        if where.entry.kind != "directory":
            raise ApiError(400, NOT_A_DIRECTORY, f"{where.path} is not a directory")
        return where

    def walk(self, start: Located, *, recursive: bool = True) -> Iterator[tuple[tuple[str, ...], Located]]:
        """Every entry below ``start`` (a directory) with its path relative to it, parents
        before children; symlinks are yielded as themselves and never followed. A directory met
        twice (a loop in a damaged file system) is yielded but not entered again. The lock is
        taken per directory read, so other requests interleave with a long walk."""
        pending: list[tuple[tuple[str, ...], Located]] = [((), start)]
        entered: set[tuple[str, int]] = set()
        while pending:
            rel, directory = pending.pop()
            if directory.volume is not None and directory.entry.inode is not None:
                key = (directory.volume.name, directory.entry.inode)
                if key in entered:
                    log.warning("directory loop at %s: not entered again", directory.path)
                    continue
                entered.add(key)
            with self._lock:
                kids = self._children(directory)
            for kid in kids:
                kid_rel = (*rel, kid.entry.name)
                yield kid_rel, kid
                if recursive and kid.entry.kind == "directory":
                    pending.append((kid_rel, kid))

    def open_entry(self, where: Located) -> LockedReader:
        """A reader of a regular file met while walking."""
        assert where.volume is not None and where.entry.kind == "file"
        with self._lock:
            inner = where.volume.fs.open(where.entry)
        return LockedReader(inner, self._lock, where.entry.size)


def shown(text: str) -> str:
    """``text`` safe to encode as UTF-8 (undecodable bytes become U+FFFD)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _type_bits(kind: str) -> int:
    return {"file": stat.S_IFREG, "directory": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(kind, 0)
