"""Serving a disk image over NBD with ``qemu-nbd``, for the OMA's target volumes, the demo, the
tests and the benchmarks.

An :class:`NbdExport` is a ``qemu-nbd`` child process on a Unix socket or a loopback TCP port.
It is ready when a connection is accepted, and stopped (SIGTERM, then SIGKILL) when its context
exits. ``shared`` must cover the mover's connections: qemu-nbd's default of one client makes a
second connection wait forever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from pyapp.process import terminate


class ExportError(RuntimeError):
    """qemu-nbd did not start or exited early."""


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class NbdExport:
    def __init__(
        self,
        image: str | os.PathLike[str],
        *,
        name: str = "disk",
        fmt: str = "raw",
        socket_path: str | os.PathLike[str] | None = None,
        port: int | None = None,
        read_only: bool = False,
        shared: int = 8,
        cache: str = "none",
        extra_args: list[str] | None = None,
    ) -> None:
        self.image = Path(image)
        self.name = name
        self.fmt = fmt
        self.read_only = read_only
        self.shared = shared
        self.cache = cache
        self.extra_args = extra_args or []
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.port = port if socket_path is None else None
        if self.socket_path is None and self.port is None:
            self.port = free_tcp_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        if self.socket_path is not None:
            return f"nbd+unix:///{self.name}?socket={self.socket_path}"
        return f"nbd://127.0.0.1:{self.port}/{self.name}"

    def argv(self) -> list[str]:
        args = [
            "qemu-nbd",
            "--persistent",
            f"--shared={self.shared}",
            f"--export-name={self.name}",
            f"--format={self.fmt}",
            f"--cache={self.cache}",
            "--aio=threads",
        ]
        if self.read_only:
            args.append("--read-only")
        else:
            args.append("--discard=unmap")
        if self.socket_path is not None:
            args.append(f"--socket={self.socket_path}")
        else:
            args += ["--bind=127.0.0.1", f"--port={self.port}"]
        return [*args, *self.extra_args, str(self.image)]

    def _accepts(self) -> bool:
        family = socket.AF_UNIX if self.socket_path is not None else socket.AF_INET
        address: str | tuple[str, int] = (
            str(self.socket_path) if self.socket_path is not None else ("127.0.0.1", self.port or 0)
        )
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(address)
            except OSError:
                return False
            # Let qemu-nbd finish the handshake greeting so the probe is not logged as an error.
            s.settimeout(1)
            with contextlib.suppress(OSError):
                s.recv(8)
            return True

    def start(self, timeout: float = 10.0) -> NbdExport:
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        self.process = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise ExportError(f"qemu-nbd exited with {self.process.returncode}: {err.strip()}")
            if self._accepts():
                return self
            time.sleep(0.02)
        self.stop()
        raise ExportError(f"qemu-nbd did not accept connections within {timeout} s")

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is None:
            return
        terminate(self.process)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def __enter__(self) -> NbdExport:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
