"""A minimal, blocking QMP client: how the lab learns that a qemu it started is up.

QMP (qemu's machine protocol, ``docs/interop/qmp-spec.rst`` in qemu) is JSON over a socket: the
server greets (``{"QMP": {...}}``), the client leaves capabilities negotiation with
``qmp_capabilities``, then each ``{"execute": ...}`` gets one ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}``; ``{"event": ...}`` messages may come in between and are
skipped here. qemu runs commands from its main loop, which starts only once the machine is built
and its disks are open: an answer to a command means the VM is up, and a qemu that failed to start
closes the socket by exiting.

Hand-written rather than qemu's own ``qemu.qmp`` package because that one is asyncio-based (its
synchronous wrapper runs an asyncio loop), and the project keeps asyncio out of everything but
``pyapp/db.py``; the lab needs three commands of a line-based protocol.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

_POLL_S = 0.02


class QmpError(RuntimeError):
    """The QMP socket closed, answered an error, or did not answer in time."""


class Qmp:
    """One QMP session on a Unix socket. :meth:`connect` waits for the socket to accept."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    @classmethod
    def connect(cls, path: Path, timeout: float, alive: Callable[[], bool] = lambda: True) -> Qmp:
        """Connect to ``path`` and negotiate capabilities, retrying while the socket does not
        exist or refuses yet; :class:`QmpError` when ``alive()`` turns false (the process behind it
        exited) or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if not alive():
                    raise QmpError(f"{path}: the process exited before QMP answered") from None
                if time.monotonic() >= deadline:
                    raise QmpError(f"{path}: no QMP socket after {timeout:.0f} s") from None
                time.sleep(_POLL_S)
                continue
            except OSError as e:
                sock.close()
                raise QmpError(f"{path}: {e}") from e
            session = cls(sock)
            try:
                greeting = session._message(deadline)
                if "QMP" not in greeting:
                    raise QmpError(f"{path}: not a QMP greeting: {greeting}")
                session.execute("qmp_capabilities", deadline=deadline)
            except BaseException:
                session.close()
                raise
            return session

    def _message(self, deadline: float) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if sep:
                self._buffer = rest
                if not line.strip():
                    continue
                message: dict[str, Any] = json.loads(line)
                if "event" in message:
                    continue
                return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("QMP did not answer in time")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QmpError("QMP did not answer in time") from None
            except OSError as e:
                raise QmpError(f"QMP connection lost: {e}") from e
            if not chunk:
                raise QmpError("QMP connection closed (qemu exited)")
            self._buffer += chunk

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, deadline: float | None = None
    ) -> Any:
        """Run ``command``; its ``return`` value. :class:`QmpError` for an ``error`` answer."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise QmpError(f"QMP connection lost: {e}") from e
        answer = self._message(deadline if deadline is not None else time.monotonic() + 10.0)
        if "error" in answer:
            error = answer["error"]
            raise QmpError(f"{command}: {error.get('class')}: {error.get('desc')}")
        return answer.get("return")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
