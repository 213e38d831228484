"""The life of an OMA background worker that claims rows: the replication engine, the backup
engine and the copy worker.

Each one runs as a background task of the app and, until stopped:

1. first recovers what a dead OMA process on this host left claimed (:meth:`recover_orphans`);
2. claims up to its free slots of pending rows with ``FOR UPDATE SKIP LOCKED`` (so several OMA
   processes on one database never drive the same row) and drives each in its own task;
3. sleeps until woken (a row was created, a slot freed) or its poll interval passes.

The claim runs shielded: a claim cancelled in flight may have committed, and rows claimed by a
process that then never drives them would stay claimed. Claimed rows are always started; a drive
cancelled at once ends (or re-queues) its row itself.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import trio

from pyapp.logs import log_context

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    """``host:pid:random``: who claimed a row, and whether that process is still alive."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claimant_gone(claimed_by: str) -> bool:
    """True when ``claimed_by`` (a worker id, ``host:pid:nonce``) names an OMA process on this
    host that no longer runs: what it claimed is nobody's now. Claims of other hosts are left to
    their own processes."""
    host, _, rest = claimed_by.partition(":")
    pid = rest.split(":", 1)[0]
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


class ClaimWorker(ABC):
    """Claim, drive, sleep; see the module documentation."""

    #: What the logs call it ("replication engine", …) and the ``action`` of its log records.
    kind: ClassVar[str]
    action: ClassVar[str]

    def __init__(self, *, max_active: int, poll_interval: float) -> None:
        self.worker_id = new_worker_id()
        self.max_active = max_active
        self.poll_interval = poll_interval
        self.stopped = trio.Event()
        self._stop = trio.Event()
        self._wake = trio.Event()

    def wake(self) -> None:
        """Claim at once instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @abstractmethod
    def active_count(self) -> int:
        """Rows this process drives now."""

    @abstractmethod
    async def claim(self, limit: int) -> Sequence[Any]:
        """Claim up to ``limit`` pending rows (one statement, ``SKIP LOCKED``)."""

    @abstractmethod
    def start(self, nursery: trio.Nursery, row: Any) -> None:
        """Start driving one claimed row in ``nursery``."""

    async def recover_orphans(self) -> None:
        """Deal with the rows a dead process on this host left claimed (default: nothing)."""
        return

    async def start_side_tasks(self, nursery: trio.Nursery) -> None:
        """Start tasks that live as long as the worker (default: none)."""
        return

    async def on_stop(self) -> None:
        """The last step of a stop, shielded (default: nothing)."""
        return

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with log_context(action=self.action):
            log.info("%s started", self.kind, extra={"worker_id": self.worker_id})
            try:
                try:
                    await self.recover_orphans()
                except Exception:
                    log.exception("%s: recovering the work of a stopped OMA process failed", self.kind)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._claim_loop, nursery)
                    await self.start_side_tasks(nursery)
                    task_status.started()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await self.on_stop()
                self.stopped.set()
                log.info("%s stopped", self.kind)

    async def _claim_loop(self, nursery: trio.Nursery) -> None:
        while True:
            self._wake = trio.Event()  # reset before claiming: a wake-up during the claim is kept
            free = self.max_active - self.active_count()
            if free > 0:
                try:
                    with trio.CancelScope(shield=True):
                        claimed = await self.claim(free)
                except Exception:
                    log.exception("%s: claiming failed", self.kind)
                    claimed = []
                for row in claimed:
                    self.start(nursery, row)
            with trio.move_on_after(self.poll_interval):
                await self._wake.wait()
