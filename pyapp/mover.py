"""The typed facade over the Rust data plane (``pyapp._mover``).

Services import this module, never the extension. Long calls run in a worker thread under the
mover's own :class:`trio.CapacityLimiter`, with the GIL released by the extension, so a trio
caller awaits them without blocking its event loop. Cancelling the awaiting trio task asks the
copy to stop and waits for it: a thread that is writing is never abandoned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os import PathLike

import trio

from pyapp._mover import (
    CancelledError,
    ConnectError,
    Copy,
    CopyProgress,
    FormatError,
    InvalidEndpointError,
    InvalidPlanError,
    MoverError,
    ProtocolError,
    SourceReadError,
    TargetWriteError,
)

__all__ = [
    "CancelledError",
    "ConnectError",
    "Copy",
    "CopyProgress",
    "FormatError",
    "InvalidEndpointError",
    "InvalidPlanError",
    "MoverError",
    "ProtocolError",
    "SourceReadError",
    "TargetWriteError",
    "copy",
]

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
    on_progress: Callable[[CopyProgress], None] | None = None,
    progress_interval: float = 0.5,
) -> CopyProgress:
    """Copy ``source`` to ``target`` (NBD URIs or paths) and return the final counters.

    ``extents`` is an explicit list of ``(offset, length)`` (e.g. CBT changed areas);
    ``allocated_only`` copies what the source's allocation map reports as data. Raises a
    :class:`MoverError` subclass naming the failing range on failure.
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
    )
    error: MoverError | None = None
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
    if error is not None:
        if isinstance(error, CancelledError):
            await trio.lowlevel.checkpoint()  # raises trio.Cancelled when that was the cause
        raise error
    if on_progress is not None:
        on_progress(result)
    return result
