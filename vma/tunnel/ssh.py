"""The tunnel's ``ssh`` command line and its supervisor (see :mod:`vma.tunnel`)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio

from vma.config import VmaConfig

log = logging.getLogger(__name__)

#: A connection that stayed up this long resets the backoff to its first delay.
STABLE_AFTER = 60.0
HOST_KEY_CHANGED = "REMOTE HOST IDENTIFICATION HAS CHANGED"
#: What ssh prints (LogLevel VERBOSE) once it is in: the forwards follow at once, and with
#: ExitOnForwardFailure a forward that cannot be made ends it.
AUTHENTICATED = "Authenticated to "


def ssh_fingerprint(public_key: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a ``type base64 [comment]`` public key."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def ssh_argv(cfg: VmaConfig) -> list[str]:
    """``ssh -N`` with the pinned host key, this VMA's key only, keep-alives and the forwards."""
    assert cfg.tunnel_key_file is not None and cfg.tunnel_known_hosts is not None
    api_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    argv = [
        cfg.ssh,
        "-N",
        "-T",
        "-F", "/dev/null",
        "-o", "BatchMode=yes",
        "-o", "LogLevel=VERBOSE",
        "-o", "ExitOnForwardFailure=yes",
        "-o", f"ServerAliveInterval={max(1, round(cfg.tunnel_keepalive))}",
        "-o", "ServerAliveCountMax=3",
        "-o", "ConnectTimeout=15",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={cfg.tunnel_known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", f"Ciphers={cfg.tunnel_cipher}",
        "-i", str(cfg.tunnel_key_file),
        "-p", str(cfg.tunnel_port),
        "-R", f"127.0.0.1:{cfg.tunnel_remote_port}:{api_host}:{cfg.port}",
    ]  # fmt: skip
    for port in cfg.tunnel_forward_ports:
        argv += ["-L", f"{cfg.tunnel_local_address}:{port}:127.0.0.1:{port}"]
    return [*argv, f"{cfg.tunnel_user}@{cfg.tunnel_host}"]


def explain(stderr: str, returncode: int) -> str:
    """One line for an operator out of what ssh said before it ended."""
    if HOST_KEY_CHANGED in stderr or "Host key verification failed" in stderr:
        if HOST_KEY_CHANGED in stderr:
            return (
                "the OMA's host key changed and no longer matches the key pinned at enrollment"
                " (tunnel_known_hosts): connection refused; re-enroll if the OMA's key really changed"
            )
        return (
            "the OMA's host key is not the one pinned at enrollment (tunnel_known_hosts): connection refused"
        )
    if "Permission denied" in stderr:
        return "the OMA refused this VMA's key (revoked, or never approved?): Permission denied"
    for marker in ("forwarding failed", "Could not request local forwarding", "cannot listen"):
        if marker in stderr:
            line = next(ln for ln in stderr.splitlines() if marker in ln)
            return f"a forward could not be made: {line.strip()}"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Authenticated")]
    return f"ssh exited with {returncode}: {lines[-1] if lines else 'no message'}"


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Tunnel:
    """Keeps one ssh child up; its state is :meth:`health`."""

    cfg: VmaConfig
    status: str = "disabled"
    since: str = field(default_factory=_now_iso)
    last_error: str | None = None
    connections: int = 0
    pid: int | None = None
    _process: trio.Process | None = None
    _stderr: deque[str] = field(default_factory=lambda: deque(maxlen=50))

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.tunnel_host)

    def _set(self, status: str, error: str | None = None) -> None:
        if status != self.status:
            self.since = _now_iso()
        self.status = status
        if error is not None:
            self.last_error = error

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "since": self.since}
        if self.enabled:
            body.update(
                oma=f"{self.cfg.tunnel_user}@{self.cfg.tunnel_host}:{self.cfg.tunnel_port}",
                connections=self.connections,
                pid=self.pid,
                last_error=self.last_error,
            )
        return body

    def kill(self) -> None:
        """End the ssh child abruptly (tests: a lost connection); the supervisor starts another."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the tunnel up until cancelled; ``started`` at once (the tunnel comes up later)."""
        if not self.enabled:
            task_status.started()
            return
        if self.cfg.port == 0:
            self._set("down", "the tunnel needs the API on a fixed port (port 0 picks one at random)")
            task_status.started()
            return
        task_status.started()
        delay = self.cfg.tunnel_backoff_initial
        while True:
            started = time.monotonic()
            await self._run_once()
            if time.monotonic() - started >= STABLE_AFTER:
                delay = self.cfg.tunnel_backoff_initial
            log.warning(
                "tunnel down: %s; reconnecting in %.1f s",
                self.last_error,
                delay,
                extra={"action": "tunnel", "tunnel_status": self.status},
            )
            await trio.sleep(delay)
            delay = min(delay * 2, self.cfg.tunnel_backoff_max)

    async def _run_once(self) -> None:
        self._set("connecting")
        self._stderr.clear()
        argv = ssh_argv(self.cfg)
        async with trio.open_nursery() as nursery:
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            self._process, self.pid = process, process.pid
            try:
                assert process.stderr is not None
                nursery.start_soon(self._read_stderr, process.stderr)
                await process.wait()
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.terminate()
                        with trio.move_on_after(5):
                            await process.wait()
                        if process.returncode is None:
                            process.kill()
                            await process.wait()
                self._process, self.pid = None, None
        self._set("down", explain("\n".join(self._stderr), process.returncode or 0))

    async def _read_stderr(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").rstrip()
                self._stderr.append(line)
                if line.startswith(AUTHENTICATED):
                    self.connections += 1
                    self.last_error = None
                    self._set("up")
                    log.info(
                        "tunnel up",
                        extra={"action": "tunnel", "oma": self.cfg.tunnel_host, "pid": self.pid},
                    )
