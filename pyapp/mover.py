"""The typed facade over the Rust data plane (``pyapp._mover``).

Services import this module, never the extension. Long calls run in a worker thread under the
mover's own :class:`trio.CapacityLimiter`, with the GIL released by the extension, so a trio
caller awaits them without blocking its event loop. Cancelling the awaiting trio task asks the
copy to stop and waits for it: a thread that is writing is never abandoned.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any, TypeVar

import trio

from pyapp import _mover, metrics
from pyapp._mover import (
    CancelledError,
    ChecksumReport,
    ChunkMismatch,
    ConnectError,
    ConsolidateReport,
    Copy,
    CopyProgress,
    FormatError,
    ImageReader,
    InvalidEndpointError,
    InvalidPlanError,
    MoverError,
    ProtocolError,
    SourceReadError,
    TargetWriteError,
    Tracker,
    VerifyReport,
)

__all__ = [
    "CancelledError",
    "ChecksumReport",
    "ChunkMismatch",
    "ConnectError",
    "ConsolidateReport",
    "Copy",
    "CopyProgress",
    "FormatError",
    "ImageFile",
    "ImageReader",
    "InvalidEndpointError",
    "InvalidPlanError",
    "MoverError",
    "ProtocolError",
    "SourceReadError",
    "TargetWriteError",
    "Tracker",
    "VerifyReport",
    "checksum",
    "consolidate",
    "copy",
    "info",
    "open_image",
    "verify",
    "verify_chain",
]

T = TypeVar("T")

#: How many copies may run at once in this process; each uses its own connections and buffers.
LIMITER = trio.CapacityLimiter(8)


async def _report(job: Copy, on_progress: Callable[[CopyProgress], None], interval: float) -> None:
    while True:
        on_progress(job.progress())
        await trio.sleep(interval)


async def _cancel_on_exit(job: Copy) -> None:
    try:
        await trio.sleep_forever()
    finally:
        job.cancel()


async def copy(
    source: str,
    target: str,
    *,
    extents: Sequence[tuple[int, int]] | None = None,
    allocated_only: bool = False,
    connections: int = 4,
    requests: int = 16,
    request_size: int = 1 << 20,
    checkpoint: str | PathLike[str] | None = None,
    target_is_zero: bool = False,
    checkpoint_interval: float = 5.0,
    reconnect_timeout: float = 60.0,
    backing: str | PathLike[str] | None = None,
    cluster_size: int = 1 << 16,
    manifest: str | PathLike[str] | None = None,
    write_manifest: bool = True,
    zero_unlisted: bool = False,
    request_timeout: float = 60.0,
    connect_timeout: float = 30.0,
    on_progress: Callable[[CopyProgress], None] | None = None,
    progress_interval: float = 0.5,
) -> CopyProgress:
    """Copy ``source`` to ``target`` (NBD URIs, QCOW2 images or raw paths) and return the final
    counters.

    ``extents`` is an explicit list of ``(offset, length)`` (e.g. CBT changed areas);
    ``allocated_only`` copies what the source's allocation map reports as data.
    ``zero_unlisted`` says the extents are all the data the disk holds (vCenter's allocated areas)
    and zeroes everything else on the target, so stale data of an earlier pass cannot remain. A
    target path
    ending in ``.qcow2`` that does not exist becomes a new QCOW2 image (an overlay on
    ``backing`` when given) with a BLAKE3 manifest beside it; ``manifest`` asks for one at that
    path for any other target, ``write_manifest=False`` for none at all. Raises a
    :class:`MoverError` subclass naming the failing range on failure.

    Nothing waits on an NBD server forever: each connection attempt has ``connect_timeout``
    seconds, each request ``request_timeout`` seconds for its reply; a request past its deadline
    is sent again on a new connection within ``reconnect_timeout``, then fails naming the request.

    The result's ``durable`` is true only when every flush of the target reached stable storage
    (``fdatasync`` of a file or image, an acknowledged NBD flush); an NBD target that does not
    advertise flush gives ``durable=False``: the copy succeeded, but the bytes may still be lost
    with the server's cache, so nothing that assumes they are safe (a change ID) may be recorded.
    """
    job = Copy(
        source,
        target,
        extents=list(extents) if extents is not None else None,
        allocated_only=allocated_only,
        connections=connections,
        requests=requests,
        request_size=request_size,
        checkpoint=checkpoint,
        target_is_zero=target_is_zero,
        checkpoint_interval=checkpoint_interval,
        reconnect_timeout=reconnect_timeout,
        backing=backing,
        cluster_size=cluster_size,
        manifest=manifest,
        write_manifest=write_manifest,
        zero_unlisted=zero_unlisted,
        request_timeout=request_timeout,
        connect_timeout=connect_timeout,
    )
    error: MoverError | None = None
    metrics.ACTIVE_COPIES.inc()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_exit, job)
            if on_progress is not None:
                nursery.start_soon(_report, job, on_progress, progress_interval)
            try:
                # Not abandonable: on cancellation _cancel_on_exit asks the copy to stop, and this
                # waits for the thread to return.
                result = await trio.to_thread.run_sync(job.run, limiter=LIMITER)
            except MoverError as e:
                error = e  # raised below, outside the nursery, as itself rather than in a group
            finally:
                nursery.cancel_scope.cancel()
    finally:
        metrics.ACTIVE_COPIES.dec()
    if error is not None:
        if isinstance(error, CancelledError):
            await trio.lowlevel.checkpoint()  # raises trio.Cancelled when that was the cause
        raise error
    metrics.copy_finished(result.bytes_written, result.bytes_zeroed, result.bytes_read, result.seconds)
    if on_progress is not None:
        on_progress(result)
    return result


async def _cancel_tracker_on_exit(tracker: Tracker) -> None:
    try:
        await trio.sleep_forever()
    finally:
        tracker.cancel()


async def _tracked(work: Callable[[Tracker], T], tracker: Tracker | None) -> T:
    """Run a chain operation in a worker thread; cancelling the caller cancels it and waits."""
    tracker = tracker if tracker is not None else Tracker()
    error: MoverError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_tracker_on_exit, tracker)
        try:
            result = await trio.to_thread.run_sync(work, tracker, limiter=LIMITER)
        except MoverError as e:
            error = e
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        if isinstance(error, CancelledError):
            await trio.lowlevel.checkpoint()
        raise error
    return result


async def checksum(
    source: str,
    *,
    output: str | PathLike[str] | None = None,
    chunk_size: int = 1 << 20,
    tracker: Tracker | None = None,
) -> ChecksumReport:
    """Make a BLAKE3 manifest of any source (saved to ``output`` when given)."""
    return await _tracked(
        lambda t: _mover.checksum(source, output=output, chunk_size=chunk_size, tracker=t), tracker
    )


async def verify(
    image: str, *, manifest: str | PathLike[str] | None = None, tracker: Tracker | None = None
) -> VerifyReport:
    """Re-read ``image`` through its chain and compare it with its manifest."""
    return await _tracked(lambda t: _mover.verify(image, manifest=manifest, tracker=t), tracker)


async def verify_chain(
    top: str | PathLike[str], *, tracker: Tracker | None = None
) -> tuple[list[VerifyReport], list[str]]:
    """Verify every file of a chain against its own manifest; also the files without one."""
    return await _tracked(lambda t: _mover.verify_chain(top, tracker=t), tracker)


async def consolidate(
    top: str | PathLike[str],
    *,
    layers: int | None = None,
    output: str | PathLike[str] | None = None,
    cluster_size: int = 1 << 16,
    tracker: Tracker | None = None,
) -> ConsolidateReport:
    """Merge the oldest ``layers`` layers of the chain of ``top`` in place (crash-safe), or
    flatten the whole chain into the new file ``output``."""
    return await _tracked(
        lambda t: _mover.consolidate(top, layers=layers, output=output, cluster_size=cluster_size,
                                     tracker=t),
        tracker,
    )


async def info(image: str | PathLike[str]) -> dict[str, Any]:
    """The chain of ``image`` (files, sizes, backing formats, manifests) and its allocation map."""
    text = await trio.to_thread.run_sync(_mover.info, image, limiter=LIMITER)
    doc: dict[str, Any] = json.loads(text)
    return doc


class ImageFile(io.RawIOBase):
    """A disk image as a read-only, seekable binary file (QCOW2 chains read through).

    Reads are positioned reads of the Rust reader with the GIL released, so several
    ``ImageFile`` objects over one image may be used from several threads.
    """

    def __init__(self, reader: ImageReader) -> None:
        super().__init__()
        self._reader = reader
        self._pos = 0

    @property
    def name(self) -> str:
        return self._reader.path

    @property
    def size(self) -> int:
        return self._reader.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._reader.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        self._checkClosed()
        view = memoryview(buffer).cast("B")
        data = self._reader.read_at(self._pos, len(view))
        n = len(data)
        view[:n] = data
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        self._checkClosed()
        if size is None or size < 0:
            size = max(0, self._reader.size - self._pos)
        data = self._reader.read_at(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)


def open_image(path: str | PathLike[str]) -> ImageFile:
    """Open a disk image (a QCOW2 image with its backing chain, or a raw file) read-only as a
    seekable binary file object, e.g. for ``dissect.volume`` and ``dissect.extfs``."""
    return ImageFile(ImageReader(path))
