"""A lab guest: writes into a VM disk's raw image as the guest OS would, journalling each write.

:func:`rewrite_partition` is a guest changing its files: it rebuilds one partition's file system
with a new tree (builds are reproducible, see :mod:`lab.filesystems`) and writes only the 64 KiB
blocks that differ into the disk — through a :class:`GuestDisk` when given one, so the
simulator's change tracking sees them as guest writes.

The journal format is described in ``lab/vcsim/journal.go`` and ``docs/lab.md``: JSON lines
``{"op": "write", "disk": ..., "seq": N, "offset": o, "length": l}``, plus ``reset`` and ``off``
records for change tracking. The lock (``flock`` on the journal) is held across "write the bytes,
append the record", so a snapshot that the simulator freezes under the same lock never sees bytes
without their record or the reverse.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from lab.datastore import flat_of, journal_of
from lab.disks import DiskLayout
from lab.filesystems import MiB, build_partition

#: Granularity of :func:`rewrite_partition`: what a changed-block tracker would report.
REWRITE_BLOCK = 64 * 1024


@dataclass(frozen=True)
class JournalEntry:
    op: str
    seq: int
    offset: int = 0
    length: int = 0
    uuid: str = ""


def pwrite_all(image: Path, offset: int, data: bytes) -> None:
    """Write all of ``data`` at ``offset`` of ``image`` (no truncation, no journal)."""
    fd = os.open(image, os.O_WRONLY)
    try:
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, view[done:], offset + done)
    finally:
        os.close(fd)


def new_cbt_uuid() -> str:
    """A change-tracking UUID in VMware's notation: ``"52 de c0 d9 98 a8 ac 5b-a1 16 ed 5d 02 86 e1 04"``."""
    b = secrets.token_bytes(16)
    return " ".join(f"{x:02x}" for x in b[:8]) + "-" + " ".join(f"{x:02x}" for x in b[8:])


def read_journal(path: Path) -> list[JournalEntry]:
    """All complete records of a journal, in order."""
    if not path.exists():
        return []
    out = []
    with path.open("rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        data = f.read()
    for line in data.split(b"\n")[:-1]:
        if line.strip():
            r: dict[str, Any] = json.loads(line)
            out.append(
                JournalEntry(
                    r["op"],
                    int(r["seq"]),
                    int(r.get("offset", 0)),
                    int(r.get("length", 0)),
                    str(r.get("uuid", "")),
                )
            )
    return out


class GuestDisk:
    """One disk of a lab VM, addressed by its descriptor file ``x.vmdk`` (raw bytes in ``x-flat.vmdk``)."""

    def __init__(self, descriptor: Path) -> None:
        self.descriptor = descriptor
        self.image = flat_of(descriptor)
        self.journal = journal_of(descriptor)
        self.size = self.image.stat().st_size
        self._parsed = 0  # bytes of the journal already scanned for the highest seq
        self._seq = 0

    @contextmanager
    def _locked(self) -> Iterator[tuple[BinaryIO, int]]:
        """The journal, open for appending under an exclusive lock, and its highest seq."""
        with self.journal.open("a+b") as j:
            fcntl.flock(j.fileno(), fcntl.LOCK_EX)
            try:
                size = os.fstat(j.fileno()).st_size
                if size < self._parsed:  # replaced or truncated: scan again
                    self._parsed, self._seq = 0, 0
                j.seek(self._parsed)
                tail = j.read(size - self._parsed)
                whole = tail[: tail.rfind(b"\n") + 1]
                for line in whole.split(b"\n"):
                    if line.strip():
                        self._seq = max(self._seq, int(json.loads(line)["seq"]))
                self._parsed += len(whole)
                yield j, self._seq
            finally:
                fcntl.flock(j.fileno(), fcntl.LOCK_UN)

    def _append(self, j: BinaryIO, record: dict[str, Any]) -> None:
        j.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        j.flush()

    def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` and journal it; returns the write's seq."""
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write [{offset}, {offset + len(data)}) outside the disk ({self.size} bytes)")
        with self._locked() as (j, seq):
            pwrite_all(self.image, offset, data)
            seq += 1
            self._append(
                j,
                {
                    "op": "write",
                    "disk": self.descriptor.name,
                    "seq": seq,
                    "offset": offset,
                    "length": len(data),
                },
            )
            return seq

    def read(self, offset: int, length: int) -> bytes:
        with self.image.open("rb") as f:
            f.seek(offset)
            return f.read(length)

    def reset_cbt(self) -> str:
        """Start a new change-tracking epoch (as vSphere does after a CBT reset); returns its UUID.

        Change IDs of earlier epochs are refused by QueryChangedDiskAreas from then on."""
        uuid = new_cbt_uuid()
        with self._locked() as (j, seq):
            self._append(j, {"op": "reset", "disk": self.descriptor.name, "seq": seq, "uuid": uuid})
        return uuid

    def entries(self) -> list[JournalEntry]:
        return read_journal(self.journal)

    def rewrite_random_chunks(
        self, count: int, chunk: int = 1024 * 1024, seed: int = 1, region: tuple[int, int] | None = None
    ) -> list[tuple[int, int]]:
        """Overwrite ``count`` distinct chunk-aligned chunks with random bytes; returns their
        ``(offset, length)`` sorted by offset. ``region`` limits them to ``[start, end)``."""
        start, end = region if region is not None else (0, self.size)
        first, last = -(-start // chunk), end // chunk
        if last - first < count:
            raise ValueError(f"only {last - first} whole chunks in the region, {count} asked")
        rng = random.Random(seed)
        picked = sorted(rng.sample(range(first, last), count))
        out = []
        for idx in picked:
            self.write(idx * chunk, rng.randbytes(chunk))
            out.append((idx * chunk, chunk))
        return out


def _differing_blocks(current: bytes, new: bytes, base: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for pos in range(0, len(new), REWRITE_BLOCK):
        if current[pos : pos + REWRITE_BLOCK] != new[pos : pos + REWRITE_BLOCK]:
            if out and out[-1][0] + out[-1][1] == base + pos:
                out[-1] = (out[-1][0], out[-1][1] + min(REWRITE_BLOCK, len(new) - pos))
            else:
                out.append((base + pos, min(REWRITE_BLOCK, len(new) - pos)))
    return out


def rewrite_partition(
    image_or_guest: Path | GuestDisk,
    layout: DiskLayout,
    number: int,
    files: Mapping[str, bytes],
    symlinks: Mapping[str, str] | None = None,
) -> list[tuple[int, int]]:
    """Rebuild partition ``number`` of ``layout`` with the tree ``files`` (+ ``symlinks``) and
    write the 64 KiB blocks that differ into the disk, as the guest changing its files would.

    ``image_or_guest`` is the raw image (written in place) or a guest disk (each write journalled
    for change tracking). Returns the written ``(offset, length)`` areas of the disk, merged,
    in order: the extents an incremental backup of this change copies.
    """
    placed = next((p for p in layout.partitions if p.number == number), None)
    if placed is None:
        raise ValueError(f"{layout.path} has no partition {number}")
    for rel in files:
        if ".." in PurePosixPath(rel).parts:
            raise ValueError(f"file path must stay inside the file system: {rel!r}")
    spec = replace(placed.spec, files=dict(files), source=None, symlinks=dict(symlinks or {}))
    image = image_or_guest.image if isinstance(image_or_guest, GuestDisk) else image_or_guest
    written: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory(prefix="lab-rewrite-", dir=Path(image).parent) as tmp:
        scratch = Path(tmp) / "part.img"
        build_partition(spec, number, scratch, Path(tmp))
        with scratch.open("rb") as new_f, open(image, "rb") as old_f:
            pos = 0
            while pos < placed.size:
                n = min(16 * MiB, placed.size - pos)
                new = new_f.read(n).ljust(n, b"\0")
                old_f.seek(placed.start + pos)
                current = old_f.read(n)
                for offset, length in _differing_blocks(current, new, placed.start + pos):
                    data = new[offset - placed.start - pos : offset - placed.start - pos + length]
                    _write(image_or_guest, offset, data)
                    if written and written[-1][0] + written[-1][1] == offset:
                        written[-1] = (written[-1][0], written[-1][1] + length)
                    else:
                        written.append((offset, length))
                pos += n
    return written


def _write(target: Path | GuestDisk, offset: int, data: bytes) -> None:
    if isinstance(target, GuestDisk):
        target.write(offset, data)
    else:
        pwrite_all(target, offset, data)
