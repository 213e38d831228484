"""Stopping the helper processes the project starts (``qemu-nbd``, ``nbdkit``, the vSphere lab):
SIGTERM, a grace period, then SIGKILL, and always reaped.

A process that is not our child (one a killed service left behind, named in a durable record) is
known by a :class:`ProcessRef`: its PID *and* its start time (field 22 of ``/proc/<pid>/stat``,
clock ticks since boot). A bare PID may be reused by an unrelated process once the first one is
gone; the pair may not. Signals to such a process go through a pidfd (``os.pidfd_open``) opened
before the start time is checked again, so the check and the signal are about one process.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import trio

#: How long a process may take to exit after SIGTERM before it is killed.
GRACE_S = 10.0


def terminate(proc: subprocess.Popen[bytes], timeout: float = GRACE_S) -> None:
    """Stop ``proc`` if it still runs (blocking)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def aterminate(proc: trio.Process) -> None:
    """Stop ``proc`` if it still runs, under trio (SIGKILL after :data:`GRACE_S`). Callers on a
    cleanup path shield it."""
    if proc.returncode is None:
        proc.terminate()
        with trio.move_on_after(GRACE_S):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` of ``pid`` from ``/proc/<pid>/stat``; None when there is no such
    process. The command name (field 2) may hold spaces and parentheses: fields are counted from
    the last ``)``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime)


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid`` (empty when it is gone or a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def pids() -> Iterator[int]:
    """Every process ID of this host (of this PID namespace)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


@dataclass(frozen=True)
class ProcessRef:
    """One process, for as long as it lives: PID and start time. ``str()`` is ``pid@start``."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        """The process running as ``pid`` now (None: none, or a zombie)."""
        stat = _stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return None
        return cls(pid, stat[1])

    @classmethod
    def self(cls) -> ProcessRef:
        ref = cls.of(os.getpid())
        assert ref is not None
        return ref

    @classmethod
    def parse(cls, text: str) -> ProcessRef | None:
        """``pid@start`` back into a reference (None when malformed)."""
        pid, sep, start = text.partition("@")
        if not (sep and pid.isdigit() and start.isdigit()):
            return None
        return cls(int(pid), int(start))

    def __str__(self) -> str:
        return f"{self.pid}@{self.start_time}"

    def alive(self) -> bool:
        """Whether this very process still runs (a reused PID is another process: False)."""
        return ProcessRef.of(self.pid) == self

    @contextlib.contextmanager
    def _pidfd(self) -> Iterator[int | None]:
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            yield None
            return
        try:
            # Checked after the pidfd is open: from here on the PID cannot name another process.
            yield fd if self.alive() else None
        finally:
            os.close(fd)

    def signal(self, signum: int) -> bool:
        """Send ``signum`` to this process if it still runs; False when it was gone."""
        with self._pidfd() as fd:
            if fd is None:
                return False
            try:
                signal.pidfd_send_signal(fd, signum)
            except ProcessLookupError:
                return False
            return True

    def terminate(self, timeout: float = GRACE_S) -> bool:
        """SIGTERM, up to ``timeout`` seconds for it to exit, then SIGKILL (blocking). Works for a
        process that is not our child: its pidfd becomes readable when it exits. False: it was
        already gone."""
        with self._pidfd() as fd:
            if fd is None:
                return False
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGTERM)
            if not select.select([fd], [], [], timeout)[0]:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                select.select([fd], [], [], GRACE_S)
            # Readable means exited; a zombie of another parent counts as gone.
            deadline = time.monotonic() + 1.0
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            return True
