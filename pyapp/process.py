"""Stopping the helper processes the project starts (``qemu-nbd``, ``nbdkit``, the vSphere lab):
SIGTERM, a grace period, then SIGKILL, and always reaped."""

from __future__ import annotations

import subprocess

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
