"""Fixtures for the data plane's tests: disk images with known content and real NBD servers
(``qemu-nbd`` and ``nbdkit``) on Unix sockets in the test's directory."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyapp.nbd_export import NbdExport
from pyapp.process import terminate

MiB = 1 << 20


def write_disk(path: Path, size: int, extents: list[tuple[int, int]], seed: int = 7) -> None:
    """A sparse raw image of ``size`` bytes with random data in ``extents``."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in extents:
            f.seek(offset)
            f.write(rng.randbytes(length))


def images_equal(a: Path, b: Path, fmt_a: str = "raw", fmt_b: str = "raw") -> bool:
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt_a, "-F", fmt_b, str(a), str(b)], check=False)
    return r.returncode == 0


def allocated_bytes(path: Path) -> int:
    """Bytes the file occupies on disk (what a sparse copy must not inflate)."""
    return os.stat(path).st_blocks * 512


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Callable[..., NbdExport]]:
    started: list[NbdExport] = []

    def start(image: Path, name: str = "disk", **kw: object) -> NbdExport:
        sock = tmp_path / f"{name}-{len(started)}.sock"
        export = NbdExport(image, name=name, socket_path=sock, **kw)  # type: ignore[arg-type]
        started.append(export.start())
        return export

    yield start
    for e in started:
        e.stop()


class Nbdkit:
    def __init__(self, sock: Path, args: list[str]) -> None:
        self.sock = sock
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> Nbdkit:
        self.sock.unlink(missing_ok=True)  # left behind by a killed server
        self.process = subprocess.Popen(
            ["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(self.sock), *self.args],
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read() if self.process.stderr else ""
            with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
                s.connect(str(self.sock))
                return self
            time.sleep(0.02)
        raise TimeoutError("nbdkit did not start")

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
            if self.process.stderr is not None:
                self.process.stderr.close()


def flushless_nbdkit_args(path: Path) -> list[str]:
    """nbdkit arguments for a writable export over ``path`` that cannot flush: the ``eval`` plugin
    without a ``can_flush`` script, so nbdkit does not advertise NBD_FLAG_SEND_FLUSH."""
    return [
        "eval",
        f"get_size=echo {path.stat().st_size}",
        f"pread=dd if={path} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        f"pwrite=dd of={path} seek=$4 conv=notrunc oflag=seek_bytes status=none",
        "can_write=exit 0",
    ]


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Callable[..., Nbdkit]]:
    started: list[Nbdkit] = []

    def start(*args: str) -> Nbdkit:
        server = Nbdkit(tmp_path / f"nbdkit-{len(started)}.sock", list(args))
        started.append(server.start())
        return server

    yield start
    for s in started:
        s.stop()
