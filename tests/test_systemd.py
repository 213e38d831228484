"""The shipped systemd units (``deploy/systemd``) and the services' side of ``Type=notify``.

The units are checked by ``systemd-analyze verify`` (which must say nothing at all: an unknown
or misspelt setting is only a warning to systemd). The notification protocol is driven for real:
each console script runs with ``NOTIFY_SOCKET`` naming a datagram socket this test owns and
``WATCHDOG_USEC`` set, and must send ``READY=1`` only once it answers ``/health``, then
``WATCHDOG=1`` every half ``WATCHDOG_USEC``, then ``STOPPING=1`` at SIGTERM.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
BIN = Path(sys.executable).parent
WATCHDOG_USEC = 400_000  # pings every 0.2 s


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("unit", ["oma-api.service", "vma-api.service"])
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: install the Debian package systemd (scripts/bootstrap.sh)"
    # The units name the install location (/opt/mover); verify runs them against this checkout,
    # whose console scripts exist (verify checks that ExecStart is executable).
    copy = tmp_path / unit
    copy.write_text((UNITS / unit).read_text().replace("/opt/mover", str(BIN.parent.parent)))
    assert (BIN / ("oma-api-server" if unit.startswith("oma") else "vma-api-server")).exists()
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize("unit", ["oma-api.service", "vma-api.service"])
def test_unit_settings(unit: str) -> None:
    s = unit_settings(UNITS / unit)
    assert s["Type"] == ["notify"]
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] and int(s["WatchdogSec"][0]) > 0
    for hardening in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert s[hardening] == ["yes"], hardening
    assert s["ProtectSystem"] == ["strict"]
    state = "/var/lib/oma" if unit.startswith("oma") else "/var/lib/vma"
    assert s["ReadWritePaths"] == [state]
    if unit.startswith("vma"):  # the VMA mounts nothing: no capabilities, no root
        assert s["User"] == ["vma"] and s["CapabilityBoundingSet"] == [""]


def test_install_script_syntax() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "deploy" / "install.sh")], check=True, timeout=30)


# -- the notification protocol, for real ------------------------------------------------------------


class NotifySocket:
    """The manager's end: a datagram socket receiving the service's notifications."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[tuple[float, str]] = []

    def wait_for(self, state: str, timeout: float) -> float:
        """Receive until a datagram holds ``state`` (a line); returns when it came."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {state} within {timeout} s; received {self.received}")
            self.sock.settimeout(left)
            data = self.sock.recv(4096).decode()
            now = time.monotonic()
            self.received.append((now, data))
            if state in data.splitlines():
                return now

    def drain(self) -> None:
        self.sock.setblocking(False)
        try:
            while True:
                self.received.append((time.monotonic(), self.sock.recv(4096).decode()))
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


def drive_notify(
    command: list[str], env: dict[str, str], tmp_path: Path, url_of: Callable[[str], str | None]
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    env = env | {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = None
        # The address line comes before READY=1.
        while url is None:
            line = proc.stdout.readline()
            assert line, f"the service exited: {proc.wait(5)} {proc.stderr.read() if proc.stderr else ''}"
            url = url_of(line)
        notify.wait_for("READY=1", 120)
        # READY=1 is sent only once the service answers: /health at once, no retry.
        health = httpx.get(f"{url}/api/v1/health", timeout=10)
        assert health.status_code == 200, health.text
        ready_messages = [d for _, d in notify.received if "READY=1" in d]
        assert len(ready_messages) == 1 and "STATUS=" in ready_messages[0]

        # WATCHDOG=1 every half WATCHDOG_USEC (0.2 s), as sd_watchdog_enabled(3) advises.
        notify.drain()  # pings queued while /health was asked: their arrival times say nothing
        pings = [notify.wait_for("WATCHDOG=1", 5) for _ in range(6)]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.05 < g < 1.0 for g in gaps), gaps
        assert 0.1 < sum(gaps) / len(gaps) < 0.5, gaps

        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 30)
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        states = [line for _, d in notify.received for line in d.splitlines()]
        assert states.index("READY=1") < states.index("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_vma_notifies_systemd(tmp_path: Path) -> None:
    config = tmp_path / "vma.json"
    config.write_text(json.dumps({"work_dir": str(tmp_path / "work")}))

    def url_of(line: str) -> str | None:
        event = json.loads(line)
        return str(event["url"]) if event.get("event") == "listening" else None

    drive_notify(
        [str(BIN / "vma-api-server"), "--port", "0", "--config", str(config)],
        dict(os.environ),
        tmp_path,
        url_of,
    )


def oma_command_env(tmp_path: Path, dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMA_") and k != "DATABASE_URL"}
    return env | {
        "OMA_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": dsn,
        "OMA_REPLICATION_ENGINE": "0",
        "OMA_BACKUP_ENGINE": "0",
    }


def oma_url(line: str) -> str | None:
    found = re.match(r"OMA listening on (http://\S+)", line)
    return found[1] if found else None


async def test_oma_notifies_systemd(tmp_path: Path, oma_dsn: str) -> None:
    await trio.to_thread.run_sync(
        drive_notify,
        [str(BIN / "oma-api-server"), "--host", "127.0.0.1", "--port", "0"],
        oma_command_env(tmp_path, oma_dsn),
        tmp_path,
        oma_url,
    )


async def test_oma_workers_notify_systemd(tmp_path: Path, oma_dsn: str) -> None:
    """With worker processes the supervising parent (systemd's main PID) notifies, once every
    worker serves."""
    await trio.to_thread.run_sync(
        drive_notify,
        [str(BIN / "oma-api-server"), "--host", "127.0.0.1", "--port", "0", "--workers", "2"],
        oma_command_env(tmp_path, oma_dsn),
        tmp_path,
        oma_url,
    )
