"""``oma-api-server`` behaves as a tool: the real console script in a subprocess.

A port in use, an unreadable or invalid configuration, a database refusing the connection and
``--create-admin`` of an existing user end with one line on stderr and exit status 1; the logs
on stderr are JSON lines; the embedded PostgreSQL stops with the OMA (SIGTERM, SIGINT) and a
start after a SIGKILL reuses the orphaned one and still stops it afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

OMA = Path(sys.executable).with_name("oma-api-server")
ADMIN, PASSWORD = "cliadmin", "cli-admin-password"


def oma_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMA_") and k != "DATABASE_URL"}
    env |= {"OMA_DATA_DIR": str(data_dir), "OMA_REPLICATION_ENGINE": "0", "OMA_BACKUP_ENGINE": "0"}
    return env | extra


def run_oma_cli(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    assert OMA.exists(), f"{OMA} is missing: install the project (scripts/bootstrap.sh)"
    return subprocess.run(
        [str(OMA), *args], env=env, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("oma-api-server: "), lines
    assert "Traceback" not in result.stderr and "TrioInternalError" not in result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


async def test_port_in_use(tmp_path: Path, oma_dsn: str, busy_port: int) -> None:
    env = oma_env(tmp_path, DATABASE_URL=oma_dsn)
    for extra in ([], ["--workers", "2"]):
        args = ["--host", "127.0.0.1", "--port", str(busy_port), *extra]
        result = await trio.to_thread.run_sync(run_oma_cli, args, env)
        assert_one_line_failure(result, f"127.0.0.1:{busy_port}", "in use")


def test_database_refuses_connection(tmp_path: Path) -> None:
    port = closed_port()
    env = oma_env(tmp_path, DATABASE_URL=f"postgresql://oma:hunter2pw@127.0.0.1:{port}/oma")
    result = run_oma_cli(["--host", "127.0.0.1", "--port", "0"], env)
    assert_one_line_failure(result, "database", str(port))
    assert "hunter2pw" not in result.stderr


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"OMA_ADMIN_USERNAME": "a", "OMA_ADMIN_PASSWORD_FILE": "/nonexistent/pw"}, "/nonexistent/pw"),
        ({"OMA_PORT": "eighty"}, "OMA_PORT"),
        ({"OMA_WORKERS": "0"}, "OMA_WORKERS"),
    ],
)
def test_bad_configuration(tmp_path: Path, extra: dict[str, str], expected: str) -> None:
    result = run_oma_cli(["--host", "127.0.0.1"], oma_env(tmp_path, **extra))
    assert_one_line_failure(result, expected)


async def test_create_admin_for_an_existing_user(tmp_path: Path, oma_dsn: str) -> None:
    env = oma_env(tmp_path, DATABASE_URL=oma_dsn)
    first = await trio.to_thread.run_sync(run_oma_cli, ["--create-admin", ADMIN], env, PASSWORD + "\n")
    assert first.returncode == 0 and first.stderr == "", first.stderr
    again = await trio.to_thread.run_sync(run_oma_cli, ["--create-admin", ADMIN], env, "another-password\n")
    assert_one_line_failure(again, ADMIN, "already exists")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """Not under pytest's 0700 tmp dir: as root, pgserver runs PostgreSQL as its own user."""
    path = Path(tempfile.mkdtemp(prefix="oma-cli-"))
    yield path
    for pid in postmasters(path / "pgdata"):  # a failed test must not leave a server behind
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def postmasters(pgdata: Path) -> list[int]:
    """PIDs of the PostgreSQL servers (postmasters, ``postgres -D <pgdata>``) of ``pgdata``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and Path(os.fsdecode(args[0])).name == "postgres" and os.fsencode(str(pgdata)) in args:
            found.append(int(entry.name))
    return found


def start_oma(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    env = oma_env(data_dir, OMA_ADMIN_USERNAME=ADMIN, OMA_ADMIN_PASSWORD=PASSWORD)
    proc = subprocess.Popen(
        [str(OMA), "--host", "127.0.0.1", "--port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("OMA listening on "):
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"the OMA did not start: {line!r}\n{err}")
    return proc, line.split()[-1]


def login(url: str) -> None:
    r = httpx.post(f"{url}/api/v1/auth/login", json={"username": ADMIN, "password": PASSWORD}, timeout=30)
    assert r.status_code == 200, r.text


def wait_gone(pgdata: Path, deadline_s: float = 30) -> list[int]:
    deadline = time.monotonic() + deadline_s
    while (left := postmasters(pgdata)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def assert_json_lines(stderr: str) -> None:
    lines = stderr.splitlines()
    assert lines, "no logs at all"
    for line in lines:
        record = json.loads(line)  # raises on any line that is not JSON
        assert isinstance(record, dict) and {"timestamp", "level", "message"} <= record.keys(), line


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_embedded_postgres_and_logs_are_json(data_dir: Path, signum: signal.Signals) -> None:
    pgdata = data_dir / "pgdata"
    proc, url = start_oma(data_dir)
    try:
        assert len(postmasters(pgdata)) == 1
        login(url)
        assert httpx.get(f"{url}/api/v1/no-such-route", timeout=30).status_code == 404
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert wait_gone(pgdata) == []
    assert "Traceback" not in stderr
    assert_json_lines(stderr)


def test_start_after_kill9_reuses_postgres_then_stops_it(data_dir: Path) -> None:
    pgdata = data_dir / "pgdata"
    proc, url = start_oma(data_dir)
    try:
        login(url)
        orphan = postmasters(pgdata)
        assert len(orphan) == 1
        proc.kill()  # SIGKILL: the OMA cannot stop its PostgreSQL
        proc.wait(timeout=30)
        assert postmasters(pgdata) == orphan  # left running
    finally:
        proc.kill()
        proc.communicate(timeout=30)

    proc, url = start_oma(data_dir)
    try:
        assert postmasters(pgdata) == orphan  # reused: one server on the data directory
        login(url)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert wait_gone(pgdata) == [], "the reused PostgreSQL outlived the OMA"
    assert_json_lines(stderr)
