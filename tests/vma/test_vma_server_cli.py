"""``vma-api-server`` behaves as a tool: the real console script in a subprocess.

A port in use and an unreadable or invalid configuration end with one line on stderr and exit
status 1; while it serves, every line on stderr is a JSON log record.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

VMA = Path(sys.executable).with_name("vma-api-server")


def run_vma_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    assert VMA.exists(), f"{VMA} is missing: install the project (scripts/bootstrap.sh)"
    return subprocess.run([str(VMA), *args], capture_output=True, text=True, timeout=60, check=False)


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vma-api-server: "), lines
    assert "Traceback" not in result.stderr and "TrioInternalError" not in result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def write_config(tmp_path: Path, **fields: object) -> Path:
    path = tmp_path / "vma.json"
    path.write_text(json.dumps({"work_dir": str(tmp_path / "work"), **fields}))
    return path


def test_port_in_use(tmp_path: Path, busy_port: int) -> None:
    config = write_config(tmp_path)
    result = run_vma_cli(["--config", str(config), "--host", "127.0.0.1", "--port", str(busy_port)])
    assert_one_line_failure(result, f"127.0.0.1:{busy_port}", "in use")


def test_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_one_line_failure(run_vma_cli(["--config", str(bad), "--port", "0"]), "configuration")


def test_unreadable_config(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    assert_one_line_failure(run_vma_cli(["--config", str(missing), "--port", "0"]), str(missing))
    if os.geteuid() != 0:  # root reads any file
        locked = write_config(tmp_path)
        locked.chmod(0)
        assert_one_line_failure(run_vma_cli(["--config", str(locked), "--port", "0"]), str(locked))


def test_logs_on_stderr_are_json_lines(tmp_path: Path) -> None:
    config = write_config(tmp_path, log_level="debug")
    proc = subprocess.Popen(
        [str(VMA), "--config", str(config), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = json.loads(proc.stdout.readline())["url"]
        assert httpx.get(f"{url}/api/v1/health", timeout=30).status_code in (200, 503)
        assert httpx.post(f"{url}/api/v1/replicate", content=b"{", timeout=30).status_code < 500
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    lines = stderr.splitlines()
    assert lines, "no logs at all"
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict) and {"timestamp", "level", "message"} <= record.keys(), line
