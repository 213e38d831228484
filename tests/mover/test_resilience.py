"""Lost connections, crashed movers, cancellation and bounded memory, against real servers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from pyapp import mover
from pyapp.nbd_export import NbdExport

from .conftest import MiB, Nbdkit, images_equal, write_disk

pytestmark = pytest.mark.interop

SIZE = 96 * MiB
#: Data in every other MiB: 48 MiB to move, enough for a slowed target to be caught mid-copy.
DATA = [(i * MiB, MiB) for i in range(0, SIZE // MiB, 2)]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.raw"
    write_disk(path, SIZE, DATA)
    return path


def target_file(tmp_path: Path) -> Path:
    path = tmp_path / "target.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


def slow_target(nbdkit: Callable[..., Nbdkit], path: Path, mbit: int = 160) -> Nbdkit:
    """nbdkit's file plugin behind a bandwidth limit (160 Mbit/s: 48 MiB take about 2.5 s)."""
    return nbdkit("--filter=rate", "file", str(path), f"rate={mbit}M")


async def wait_for(job_progress: Callable[[], mover.CopyProgress], fraction: float) -> None:
    with trio.fail_after(60):
        while True:
            p = job_progress()
            if p.bytes_planned and p.bytes_written >= fraction * p.bytes_planned / 2:
                return
            await trio.sleep(0.01)


async def test_server_killed_and_restarted_mid_copy_reconnects(
    source: Path, tmp_path: Path, nbdkit: Callable[..., Nbdkit]
) -> None:
    target = target_file(tmp_path)
    server = slow_target(nbdkit, target)
    job = mover.Copy(str(source), server.uri, allocated_only=True, connections=2, requests=4)
    async with trio.open_nursery() as n:
        result: list[mover.CopyProgress] = []

        async def run() -> None:
            result.append(await trio.to_thread.run_sync(job.run))

        n.start_soon(run)
        await wait_for(job.progress, 0.3)
        assert server.process is not None
        server.process.kill()
        server.process.wait()
        await trio.sleep(0.5)
        server.start()
    assert images_equal(source, target)
    assert result[0].bytes_written >= sum(length for _, length in DATA)


async def test_server_down_fails_then_checkpoint_resumes(
    source: Path, tmp_path: Path, nbdkit: Callable[..., Nbdkit]
) -> None:
    target = target_file(tmp_path)
    checkpoint = tmp_path / "copy.checkpoint"
    server = slow_target(nbdkit, target)
    job = mover.Copy(str(source), server.uri, allocated_only=True, checkpoint=checkpoint,
                     checkpoint_interval=0.1, reconnect_timeout=1.0)
    async with trio.open_nursery() as n:
        failure: list[BaseException] = []

        async def run() -> None:
            try:
                await trio.to_thread.run_sync(job.run)
            except mover.MoverError as e:
                failure.append(e)

        n.start_soon(run)
        await wait_for(job.progress, 0.4)
        with trio.fail_after(30):
            while not checkpoint.exists():  # a checkpoint needs one successful flush first
                await trio.sleep(0.01)
        assert server.process is not None
        server.process.kill()
        server.process.wait()
    assert failure, "the copy must fail while the server stays down"
    assert isinstance(failure[0], mover.TargetWriteError | mover.ConnectError)
    assert checkpoint.exists()

    server.start()
    resumed = await mover.copy(str(source), server.uri, allocated_only=True, checkpoint=checkpoint)
    assert resumed.bytes_resumed > 0
    # Exactly what the checkpoint did not name is done again, nothing more.
    assert resumed.bytes_written + resumed.bytes_zeroed == resumed.bytes_planned - resumed.bytes_resumed
    assert images_equal(source, target)


async def test_killed_mover_resumes_from_checkpoint(
    source: Path, tmp_path: Path, qemu_nbd: Callable[..., NbdExport], nbdkit: Callable[..., Nbdkit]
) -> None:
    target = target_file(tmp_path)
    checkpoint = tmp_path / "copy.checkpoint"
    server = slow_target(nbdkit, target, 80)
    proc = subprocess.Popen([sys.executable, "-m", "pyapp.cli", "copy", str(source), server.uri,
                             "--allocated-only", "--checkpoint", str(checkpoint)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not checkpoint.exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = json.loads(checkpoint.read_text())
    assert saved["done"], "the checkpoint names completed work"
    result = await mover.copy(str(source), server.uri, allocated_only=True, checkpoint=checkpoint)
    assert result.bytes_resumed > 0
    assert result.bytes_written + result.bytes_zeroed == result.bytes_planned - result.bytes_resumed
    assert images_equal(source, target)


async def test_trio_cancellation_stops_the_copy_promptly(
    source: Path, tmp_path: Path, nbdkit: Callable[..., Nbdkit]
) -> None:
    server = slow_target(nbdkit, target_file(tmp_path), 80)
    seen: list[mover.CopyProgress] = []
    started = trio.current_time()
    with trio.move_on_after(1.0) as scope:
        await mover.copy(str(source), server.uri, allocated_only=True, on_progress=seen.append,
                         progress_interval=0.05)
    assert scope.cancelled_caught
    assert trio.current_time() - started < 5, "cancellation waits only for in-flight requests"
    assert seen and seen[-1].bytes_written < sum(length for _, length in DATA)
    assert [p.bytes_written for p in seen] == sorted(p.bytes_written for p in seen)


def test_cli_json_summary_and_interrupt(source: Path, tmp_path: Path, nbdkit: Callable[..., Nbdkit]) -> None:
    out = subprocess.run([sys.executable, "-m", "pyapp.cli", "copy", str(source), str(tmp_path / "c.raw"),
                          "--allocated-only", "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    for key in ("bytes_planned", "bytes_written", "bytes_zeroed", "seconds", "throughput_bytes_per_s"):
        assert key in summary
    assert summary["bytes_written"] == sum(length for _, length in DATA)

    server = slow_target(nbdkit, target_file(tmp_path), 80)
    proc = subprocess.Popen([sys.executable, "-m", "pyapp.cli", "copy", str(source), server.uri,
                             "--allocated-only"], stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "extents.json"
    bad.write_text('[[0, "x"]]')
    r = subprocess.run([sys.executable, "-m", "pyapp.cli", "copy", "a", "b", "--extents", str(bad)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "integer" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pyapp.cli", "copy", "nbd://:99999/x", "b", "--json"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1
    assert json.loads(r.stdout)["code"] == "InvalidEndpointError"


def peak_rss_of_copy(source: Path, target_uri: str) -> int:
    """The mover process's own peak RSS, as its JSON summary reports it (VmHWM)."""
    out = subprocess.run([sys.executable, "-m", "pyapp.cli", "copy", str(source), target_uri,
                          "--allocated-only", "--json"], capture_output=True, text=True, check=True)
    peak: int = json.loads(out.stdout)["peak_rss_bytes"]
    return peak


def test_peak_rss_does_not_grow_with_disk_size(tmp_path: Path, qemu_nbd: Callable[..., NbdExport]) -> None:
    rss = {}
    for size in (1 << 30, 64 << 30):
        src = tmp_path / f"src-{size}.raw"
        step = size // 64
        write_disk(src, size, [(i * step, MiB) for i in range(64)])
        dst = tmp_path / f"dst-{size}.raw"
        with open(dst, "wb") as f:
            f.truncate(size)
        export = qemu_nbd(dst, name=f"d{size}")
        rss[size] = peak_rss_of_copy(src, export.uri)
        export.stop()
        assert images_equal(src, dst)
        src.unlink()
        dst.unlink()
    assert rss[64 << 30] < 256 * MiB, rss
    assert rss[64 << 30] < rss[1 << 30] + 32 * MiB, rss


#: Short deadlines for servers that stop answering: each request 1 s, each connection attempt
#: 1 s, and 1 s of re-sending on new connections.
DEADLINES = {"request_timeout": 1.0, "connect_timeout": 1.0, "reconnect_timeout": 1.0}


async def test_a_server_that_stops_answering_fails_the_copy_in_time(
    source: Path, tmp_path: Path, nbdkit: Callable[..., Nbdkit]
) -> None:
    """The target accepts the connection and the handshake, then answers no write (nbdkit's
    delay filter, an hour per write): the copy fails within its deadlines, naming the request."""
    server = nbdkit("--filter=delay", "file", str(target_file(tmp_path)), "wdelay=3600")
    started = time.monotonic()
    pattern = r"NBD_CMD_WRITE(_ZEROES)? at offset \d+ \(\d+ bytes\): no reply within 1s"
    with trio.fail_after(30), pytest.raises(mover.MoverError, match=pattern):
        await mover.copy(str(source), server.uri, allocated_only=True, **DEADLINES)
    assert time.monotonic() - started < 15


async def test_a_stopped_server_fails_the_copy_in_time(
    source: Path, tmp_path: Path, nbdkit: Callable[..., Nbdkit]
) -> None:
    """A stopped (SIGSTOP) server: its socket still accepts, nothing answers the handshake."""
    server = nbdkit("file", str(target_file(tmp_path)))
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with trio.fail_after(30), pytest.raises(mover.ConnectError, match="no NBD session within 1s"):
            await mover.copy(str(source), server.uri, allocated_only=True, **DEADLINES)
        assert time.monotonic() - started < 5
    finally:
        server.process.send_signal(signal.SIGCONT)


def test_cli_deadline_flags(source: Path, tmp_path: Path, nbdkit: Callable[..., Nbdkit]) -> None:
    server = nbdkit("--filter=delay", "file", str(target_file(tmp_path)), "wdelay=3600")
    started = time.monotonic()
    deadlines = ["--request-timeout", "1", "--connect-timeout", "1", "--reconnect-timeout", "1"]
    command = [sys.executable, "-m", "pyapp.cli", "copy", str(source), server.uri, "--json", *deadlines]
    r = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "no reply within 1s" in json.loads(r.stdout)["error"]
    assert time.monotonic() - started < 20
