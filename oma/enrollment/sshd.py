"""The OMA's end of the tunnel: the VMAs' keys in the tunnel user's ``authorized_keys``, and ending
a revoked VMA's open session (docs/tunnel.md).

The OMA's ``sshd`` (the host's, or :mod:`lab.sshd` in the lab) lets in one unprivileged user
(``tunnel_user``) by public key only. Approving an enrollment adds the VMA's ed25519 key with
options that allow nothing but the tunnel's forwards::

    restrict,port-forwarding,permitlisten="127.0.0.1:9081",permitopen="127.0.0.1:8082",
    permitopen="127.0.0.1:10809",...,command="/bin/false" ssh-ed25519 AAAA... vma:enr-...

``restrict`` turns off every forwarding, pty, agent, X11 and rc; ``port-forwarding`` turns TCP
forwards back on, bounded by ``permitlisten`` (the one remote forward: the VMA's API on the OMA's
loopback port the OMA calls the VMA at) and ``permitopen`` (the OMA's API and its NBD export ports);
a session that asks for a command gets ``/bin/false``. The line's comment names the enrollment, so
revoking removes exactly that line. The file is rewritten whole (a temporary file, fsynced, renamed)
under an exclusive lock, root-owned and 0644: sshd reads it as the tunnel user, and it holds only
public keys.

A revoked VMA's session already open is not ended by the key's removal: :func:`end_sessions` finds
it in sshd's log (``Accepted publickey for <user> from <ip> port <port> ssh2: ED25519 SHA256:<fp>``)
and ends the sshd processes that hold that connection (found with ``ss``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from oma.config import OmaConfig
from pyapp.api import ApiError
from pyapp.atomic_file import write_atomic

log = logging.getLogger(__name__)

COMMENT_PREFIX = "vma:"


@dataclass(frozen=True)
class TunnelSettings:
    """What the OMA's sshd and the VMAs' keys need (from :class:`oma.config.OmaConfig`)."""

    authorized_keys: Path
    user: str
    #: The OMA's loopback port the VMA's API is forwarded to (the port of ``vma_url``).
    vma_listen_port: int
    #: The OMA's loopback ports a VMA may open: the OMA's API, the NBD export ports.
    open_ports: tuple[int, ...]
    #: sshd's log (the lab sshd's ``-E`` file, or the host's ``/var/log/auth.log``); None: open
    #: sessions of a revoked VMA are not looked for.
    sshd_log: Path | None = None


def key_fingerprint(public_key: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of ``type base64 [comment]``."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def authorized_line(settings: TunnelSettings, enrollment_id: str, public_key: str) -> str:
    kind, blob = public_key.split()[:2]
    options = [
        "restrict",
        "port-forwarding",
        f'permitlisten="127.0.0.1:{settings.vma_listen_port}"',
        *(f'permitopen="127.0.0.1:{port}"' for port in settings.open_ports),
        'command="/bin/false"',
    ]
    return f"{','.join(options)} {kind} {blob} {COMMENT_PREFIX}{enrollment_id}"


def _is_line_of(line: str, enrollment_id: str) -> bool:
    return line.rstrip().endswith(f" {COMMENT_PREFIX}{enrollment_id}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _rewrite(path: Path, lines: list[str]) -> None:
    write_atomic(path, "".join(f"{line}\n" for line in lines).encode("ascii"), 0o644)


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="ascii").splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def install_key(settings: TunnelSettings, enrollment_id: str, public_key: str) -> None:
    """Add (or replace) the enrollment's line (blocking)."""
    path = settings.authorized_keys
    with _locked(path):
        lines = [line for line in _lines(path) if not _is_line_of(line, enrollment_id)]
        _rewrite(path, [*lines, authorized_line(settings, enrollment_id, public_key)])
    log.info(
        "VMA key installed for the tunnel",
        extra={"action": "tunnel_key_install", "enrollment_id": enrollment_id, "file": str(path)},
    )


def remove_key(settings: TunnelSettings, enrollment_id: str) -> bool:
    """Remove the enrollment's line (blocking); whether there was one."""
    path = settings.authorized_keys
    with _locked(path):
        lines = _lines(path)
        kept = [line for line in lines if not _is_line_of(line, enrollment_id)]
        if len(kept) == len(lines):
            return False
        _rewrite(path, kept)
    log.info(
        "VMA key removed from the tunnel",
        extra={"action": "tunnel_key_remove", "enrollment_id": enrollment_id, "file": str(path)},
    )
    return True


def _accepted_ports(log_text: str, user: str, fingerprint: str) -> set[int]:
    """The client ports of the connections accepted for ``fingerprint``; a port whose latest
    acceptance is another key's is not one of them (ports are reused)."""
    pattern = re.compile(
        rf"Accepted publickey for {re.escape(user)} from \S+ port (\d+) ssh2: \S+ (\S+)$", re.MULTILINE
    )
    latest = {int(m.group(1)): m.group(2) for m in pattern.finditer(log_text)}
    return {port for port, fp in latest.items() if fp == fingerprint}


def _sshd_pids_of_connection(client_port: int) -> set[int]:
    done = subprocess.run(
        ["ss", "-Htnp", "state", "established", "dport", "=", f":{client_port}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    pids: set[int] = set()
    for line in done.stdout.splitlines():
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if name.startswith("sshd"):
                pids.add(int(pid))
    return pids


def end_sessions(settings: TunnelSettings, public_key: str) -> list[int]:
    """End the open sessions authenticated with ``public_key`` (blocking): the sshd processes
    holding each connection sshd's log shows accepted for it get SIGTERM. Returns their pids."""
    if settings.sshd_log is None:
        return []
    try:
        text = settings.sshd_log.read_text(errors="replace")
    except OSError as e:
        log.warning("cannot read sshd's log %s: %s", settings.sshd_log, e, extra={"action": "tunnel_revoke"})
        return []
    ended: list[int] = []
    for port in _accepted_ports(text, settings.user, key_fingerprint(public_key)):
        for pid in _sshd_pids_of_connection(port):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                ended.append(pid)
    if ended:
        log.warning(
            "revoked VMA's tunnel session ended",
            extra={"action": "tunnel_revoke", "pids": ended, "fingerprint": key_fingerprint(public_key)},
        )
    return ended


def settings_from(config: OmaConfig) -> TunnelSettings | None:
    """The tunnel's settings, or None when the OMA keeps no ``authorized_keys`` (no tunnel)."""
    if config.tunnel_authorized_keys is None:
        return None
    vma_port = urlsplit(config.vma_url).port or 80
    api_port = config.tunnel_api_port or config.port
    return TunnelSettings(
        authorized_keys=config.tunnel_authorized_keys,
        user=config.tunnel_user,
        vma_listen_port=vma_port,
        open_ports=tuple(dict.fromkeys(p for p in (api_port, *config.nbd_ports) if p)),
        sshd_log=config.tunnel_sshd_log,
    )


def tunnel_for_vma(config: OmaConfig, settings: TunnelSettings) -> dict[str, Any]:
    """What an approved VMA needs to dial the tunnel (its enrollment result's ``tunnel``): where
    and as whom, the host key to pin, the remote forward and the ports it may open."""
    try:
        kind, blob = config.tunnel_host_key_file.read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError) as e:
        raise ApiError(
            500, "OPERATION_FAILED", f"the tunnel's host key {config.tunnel_host_key_file} is unreadable"
        ) from e
    return {
        "ssh_host": config.tunnel_ssh_host or None,
        "ssh_port": config.tunnel_ssh_port,
        "user": settings.user,
        "host_key": f"{kind} {blob}",
        "host_key_fingerprint": key_fingerprint(f"{kind} {blob}"),
        "vma_listen_port": settings.vma_listen_port,
        "oma_api_port": config.tunnel_api_port or config.port,
        "open_ports": list(settings.open_ports),
    }
