"""Directory downloads: a zip or tar.gz archive written entry by entry while it is sent.

The archive is produced by :mod:`zipfile` or :mod:`tarfile` in a worker thread that owns them,
writing into a :class:`_QueueWriter`: a file object whose ``write`` puts bounded chunks on a
bounded :class:`queue.Queue`; the response's async generator takes them off in another
thread hop per chunk. Memory is bounded by the queue (``QUEUE_CHUNKS`` x ``CHUNK``), and there
is no temporary copy of the tree. When the client goes away, the generator is closed: it sets
the stop flag and drains the queue, and the producer ends at its next write.

Entries: directories, regular files (read through the mount, chunk by chunk) and symbolic
links, which are never followed. In tar a link is a ``SYMTYPE`` member. In zip it is stored the
way Info-ZIP stores links: a member whose content is the link target and whose Unix mode (in
``external_attr``, with ``create_system`` 3) says ``S_IFLNK``, so ``unzip`` recreates the link
and other tools show a small text file naming the target. Other kinds (devices, FIFOs,
sockets) are skipped. The zip is written without seeking, so each member has a data
descriptor; members are stored, not compressed (backups of disks are mostly compressed data
already, and stored members keep the CPU out of the way); ZIP64 is used for files of 2 GiB and
more.
"""

from __future__ import annotations

import queue
import stat
import tarfile
import threading
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import trio

from oma.restore.filesystems import Entry
from oma.restore.mount import Located, Mount, shown

ArchiveFormat = Literal["zip", "tar.gz"]
CHUNK = 256 * 1024
QUEUE_CHUNKS = 16
_ZIP64_FROM = (1 << 31) - 1
_ZIP_EPOCH, _ZIP_END = 1980, 2107
_PUT_TIMEOUT_S = 0.5


class _Stopped(Exception):
    """The consumer went away: the producer stops."""


class _QueueWriter:
    """A write-only, unseekable file object feeding a bounded queue."""

    def __init__(self, q: queue.Queue[bytes | BaseException | None], stop: threading.Event) -> None:
        self._q = q
        self._stop = stop
        self._buffer = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= CHUNK:
            self._put(bytes(self._buffer[:CHUNK]))
            del self._buffer[:CHUNK]
        return len(data)

    def flush(self) -> None:
        """Nothing to do: chunks leave when full (tarfile and zipfile call this)."""

    def close(self) -> None:
        """Called by zipfile at the archive's end; :meth:`finish` sends what is left."""

    def finish(self) -> None:
        """Send the last chunk and the end of the stream."""
        if self._buffer:
            self._put(bytes(self._buffer))
            self._buffer.clear()
        self._put(None)

    def fail(self, exc: BaseException) -> None:
        """Hand the producer's failure to the consumer, which ends the response with it."""
        self._put(exc)

    def _put(self, item: bytes | BaseException | None) -> None:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._q.put(item, timeout=_PUT_TIMEOUT_S)
                return
            except queue.Full:
                continue


def _mode(entry: Entry) -> int:
    """Permission bits to archive: the entry's, or the usual ones where the file system has none."""
    if entry.mode is not None:
        return entry.mode
    return 0o755 if entry.kind == "directory" else 0o644


def _zip_time(entry: Entry) -> tuple[int, int, int, int, int, int]:
    """The modification time as zip stores it: fields without a zone (UTC where the file system
    keeps UTC), years 1980 to 2107."""
    if entry.modified is None or not _ZIP_EPOCH <= entry.modified.year <= _ZIP_END:
        return (_ZIP_EPOCH, 1, 1, 0, 0, 0)
    t = entry.modified
    return (t.year, t.month, t.day, t.hour, t.minute, t.second)


def _write_zip(mount: Mount, start: Located, root_name: str, out: _QueueWriter) -> None:
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for rel, where in mount.walk(start):
            name = shown("/".join((root_name, *rel)))  # zip names are UTF-8: no byte names
            entry = where.entry
            info = zipfile.ZipInfo(
                name + ("/" if entry.kind == "directory" else ""), date_time=_zip_time(entry)
            )
            info.create_system = 3  # Unix: external_attr carries the mode
            mode = _mode(entry)
            if entry.kind == "directory":
                info.external_attr = ((stat.S_IFDIR | mode) << 16) | 0x10
                zf.writestr(info, b"")
            elif entry.kind == "symlink":
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, (entry.link_target or "").encode("utf-8", "surrogateescape"))
            elif entry.kind == "file":
                info.external_attr = (stat.S_IFREG | mode) << 16
                info.file_size = entry.size
                with (
                    mount.open_entry(where) as src,
                    zf.open(info, "w", force_zip64=entry.size >= _ZIP64_FROM) as dst,
                ):
                    while chunk := src.read(CHUNK):
                        dst.write(chunk)


def _write_tar(mount: Mount, start: Located, root_name: str, out: _QueueWriter) -> None:
    with tarfile.open(fileobj=out, mode="w|gz", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for rel, where in mount.walk(start):
            entry = where.entry
            info = tarfile.TarInfo("/".join((root_name, *rel)))
            info.mtime = int(entry.modified.timestamp()) if entry.modified is not None else 0
            info.mode = _mode(entry)
            info.uid, info.gid = entry.uid or 0, entry.gid or 0
            if entry.kind == "directory":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = entry.link_target or ""
                tar.addfile(info)
            elif entry.kind == "file":
                info.size = entry.size
                with mount.open_entry(where) as src:
                    tar.addfile(info, src)


def _produce(
    fmt: ArchiveFormat,
    mount: Mount,
    start: Located,
    root_name: str,
    q: queue.Queue[bytes | BaseException | None],
    stop: threading.Event,
) -> None:
    out = _QueueWriter(q, stop)
    try:
        (_write_zip if fmt == "zip" else _write_tar)(mount, start, root_name, out)
        out.finish()
    except _Stopped:
        return
    except BaseException as exc:
        try:
            out.fail(exc)
        except _Stopped:
            return


async def stream_archive(
    fmt: ArchiveFormat,
    mount: Mount,
    start: Located,
    root_name: str,
    *,
    producers: trio.CapacityLimiter,
    on_chunk: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[bytes]:
    """The archive of the directory ``start`` of ``mount``, as chunks (see the module doc).

    ``producers`` bounds the archives produced at once in the process (a producer holds one
    token from its start until the response ends); ``on_chunk`` is awaited after each chunk
    (the caller keeps the mount alive with it)."""
    token = object()
    await producers.acquire_on_behalf_of(token)
    q: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
    stop = threading.Event()
    producer = threading.Thread(
        target=_produce, args=(fmt, mount, start, root_name, q, stop), name=f"restore-{fmt}", daemon=True
    )
    try:
        producer.start()
        while True:
            item = await trio.to_thread.run_sync(q.get, abandon_on_cancel=True)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            if on_chunk is not None:
                await on_chunk()
    finally:
        # The producer sees the flag at its next write (a waiting put retries every 0.5 s);
        # taking what is queued frees its memory now.
        stop.set()
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                break
        producers.release_on_behalf_of(token)
