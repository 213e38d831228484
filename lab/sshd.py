"""A project-owned OpenSSH ``sshd`` for the tunnel's tests, the demo and the benchmark: the real
server from Debian's ``openssh-server``, on a free loopback port, with its own configuration, host
key, log and ``authorized_keys`` file, in a directory of its own.

It runs as root (sshd needs it to switch to the connecting user) and lets in one dedicated
unprivileged user only (``AllowUsers``): :data:`TUNNEL_USER`, made by :func:`ensure_tunnel_user`
when absent (a system account without a home or a usable shell, its password ``*``: not locked,
which sshd would refuse without PAM, yet no password matches it). Only public keys are accepted,
and what each key may do is said by its line in ``authorized_keys`` (oma/enrollment/sshd.py).

``StrictModes no``: the lab's directories live under ``/tmp`` (world-writable), which strict
modes refuse; the host's sshd of a real OMA keeps ``StrictModes yes`` (docs/tunnel.md).
"""

from __future__ import annotations

import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from pyapp.nbd_export import free_tcp_port
from pyapp.process import terminate

TUNNEL_USER = "oma-tunnel"
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


class SshdError(RuntimeError):
    """sshd could not be configured or did not start."""


def ensure_tunnel_user(name: str = TUNNEL_USER) -> str:
    """The dedicated tunnel user, created (``useradd --system``) when absent."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        done = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", "--password", "*", name],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0 and "already exists" not in done.stderr:
            raise SshdError(f"cannot create the tunnel user {name!r}: {done.stderr.strip()}") from None
    return name


def host_key_line(public_key_file: Path) -> str:
    """``type base64`` of an OpenSSH public key file (its comment dropped)."""
    kind, blob, *_ = public_key_file.read_text().split()
    return f"{kind} {blob}"


class LabSshd:
    """``sshd -D`` on ``127.0.0.1:<port>`` configured from ``directory``; a context manager."""

    def __init__(self, directory: Path, *, user: str = TUNNEL_USER, port: int | None = None) -> None:
        self.directory = directory
        self.user = user
        self.port = port or free_tcp_port()
        self.host_key = directory / "ssh_host_ed25519_key"
        self.config_file = directory / "sshd_config"
        # sshd reads authorized_keys as the connecting user, so every directory above it must be
        # traversable by that user: not so under pytest's private (0700) temporary directories.
        self.keys_dir = Path(tempfile.mkdtemp(prefix="lab-sshd-keys-"))
        self.keys_dir.chmod(0o755)
        self.authorized_keys = self.keys_dir / "authorized_keys"
        self.log_file = directory / "sshd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host_public_key(self) -> Path:
        return self.host_key.with_suffix(".pub")

    def host_key_line(self) -> str:
        return host_key_line(self.host_public_key)

    def new_host_key(self) -> None:
        """Make (or replace) the ed25519 host key: a replaced one is what a VMA pinning the old
        one must refuse."""
        for path in (self.host_key, self.host_public_key):
            path.unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lab-oma", "-f", str(self.host_key)],
            check=True, capture_output=True,
        )  # fmt: skip

    def write_config(self) -> None:
        self.config_file.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.directory / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    f"AllowUsers {self.user}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin no",
                    "UsePAM no",
                    "StrictModes no",
                    "AllowTcpForwarding yes",
                    "GatewayPorts no",
                    "X11Forwarding no",
                    "AllowAgentForwarding no",
                    "PermitTunnel no",
                    "ClientAliveInterval 15",
                    "ClientAliveCountMax 3",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )

    def start(self, timeout: float = 10.0) -> LabSshd:
        if shutil.which(SSHD) is None:
            raise SshdError(f"{SSHD} is missing: install Debian's openssh-server")
        ensure_tunnel_user(self.user)
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.host_key.exists():
            self.new_host_key()
        self.authorized_keys.touch()
        self.authorized_keys.chmod(0o644)
        self.write_config()
        check = subprocess.run([SSHD, "-t", "-f", str(self.config_file)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SshdError(f"sshd refuses its configuration: {check.stderr.strip()}")
        self.process = subprocess.Popen(
            [SSHD, "-D", "-f", str(self.config_file), "-E", str(self.log_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SshdError(f"sshd exited with {self.process.returncode}: {self.log()[-2000:]}")
            if self._greets():
                return self
            time.sleep(0.02)
        self.stop()
        raise SshdError(f"sshd did not answer on 127.0.0.1:{self.port} within {timeout} s")

    def restart(self) -> None:
        """Stop and start again on the same port (a new host key takes effect)."""
        self.stop()
        self.start()

    def _greets(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            try:
                s.connect(("127.0.0.1", self.port))
                return s.recv(8).startswith(b"SSH-2.0")
            except OSError:
                return False

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop the listener. Sessions already open are separate processes and stay (as with the
        host's sshd); the tests end them through revocation or their client."""
        if self.process is not None:
            terminate(self.process)
            self.process = None

    def close(self) -> None:
        """Stop, and remove the keys' directory (outside ``directory``)."""
        self.stop()
        shutil.rmtree(self.keys_dir, ignore_errors=True)

    def __enter__(self) -> LabSshd:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
