"""Serving a disk image over NBD with ``qemu-nbd``, for the OMA's target volumes, the demo, the
tests and the benchmarks.

An :class:`NbdExport` is a ``qemu-nbd`` child process on a Unix socket or a loopback TCP port.
It is ready when a connection is accepted, and stopped (SIGTERM, then SIGKILL) when its context
exits. ``shared`` must cover the mover's connections: qemu-nbd's default of one client makes a
second connection wait forever.

Given a ``record_dir``, an export is recorded durably there *before* ``qemu-nbd`` starts (a JSON
file: the owning process, the command line, then the export's :class:`~pyapp.process.ProcessRef`)
and the record goes when the export is stopped. A service killed with its exports running leaves
their records: :func:`reap_orphaned_exports`, run at the next start (or by a live peer sharing the
directory), stops every ``qemu-nbd`` whose owner is gone and removes the records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from pyapp.atomic_file import write_atomic
from pyapp.process import ProcessRef, cmdline, pids, terminate

log = logging.getLogger(__name__)


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
        record_dir: str | os.PathLike[str] | None = None,
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
        self.record_dir = Path(record_dir) if record_dir is not None else None
        self._record: Path | None = None

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
        argv = self.argv()
        if self.record_dir is not None:
            self._record = self.record_dir / f"{uuid.uuid4().hex}.json"
            write_record(self._record, {"owner": str(ProcessRef.self()), "argv": argv, "process": None})
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if self._record is not None:
            ref = ProcessRef.of(self.process.pid)
            write_record(
                self._record,
                {"owner": str(ProcessRef.self()), "argv": argv, "process": str(ref) if ref else None},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                code = self.process.returncode
                self.stop()
                raise ExportError(f"qemu-nbd exited with {code}: {err.strip()}")
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
        if self.process is not None:
            terminate(self.process)
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None
        if self._record is not None:
            self._record.unlink(missing_ok=True)
            self._record = None

    def __enter__(self) -> NbdExport:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def write_record(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` durably (:func:`pyapp.atomic_file.write_atomic`)."""
    write_atomic(path, json.dumps(data).encode("utf-8"))


def _is_qemu_nbd(argv: list[str]) -> bool:
    return bool(argv) and Path(argv[0]).name == "qemu-nbd"


def reap_orphaned_exports(record_dir: Path) -> list[str]:
    """Stop the ``qemu-nbd`` exports recorded in ``record_dir`` whose owning process is gone, and
    remove their records (blocking). Returns the images whose exports were stopped.

    The export is found by its :class:`ProcessRef` (never a bare PID); a record written before its
    process started names no process, so the command line is looked for among the host's processes
    instead. Records of live owners are left alone: they are that process's running exports."""
    stopped: list[str] = []
    if not record_dir.is_dir():
        return stopped
    for path in sorted(record_dir.iterdir()):
        if path.suffix == ".tmp":
            path.unlink(missing_ok=True)
            continue
        if path.suffix != ".json":
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            owner = ProcessRef.parse(str(data["owner"]))
            argv = [str(a) for a in data["argv"]]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("unreadable export record %s removed", path, extra={"action": "recover_exports"})
            path.unlink(missing_ok=True)
            continue
        if owner is not None and owner.alive():
            continue
        refs: list[ProcessRef] = []
        recorded = ProcessRef.parse(str(data.get("process") or ""))
        if recorded is not None:
            if recorded.alive() and _is_qemu_nbd(cmdline(recorded.pid)):
                refs.append(recorded)
        else:
            for pid in pids():
                ref = ProcessRef.of(pid)
                if ref is not None and _is_qemu_nbd(argv) and cmdline(pid) == argv:
                    refs.append(ref)
        for ref in refs:
            if ref.terminate():
                stopped.append(argv[-1])
                log.warning(
                    "orphaned export stopped",
                    extra={"action": "recover_exports", "image": argv[-1], "export_process": str(ref)},
                )
        path.unlink(missing_ok=True)
    return stopped
