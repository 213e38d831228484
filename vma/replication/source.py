"""Disk sources: an ``nbdkit`` process per disk serving the snapshot's bytes.

A replication's source listens on a Unix socket (only the VMA's own mover reads it); an export
job's listens on TCP (:class:`TcpListen`), because the OMA's mover reads it through the tunnel.
Both come from the same argv builders; only the listening arguments differ.

- production (``source = "vddk"``): ``nbdkit vddk`` against the snapshot, through vCenter: the
  password goes through a file (``password=+FILE``, mode 0600, removed with the job's artifacts),
  never argv; the thumbprint pins the host certificate; ``vm=moref=``, ``snapshot=`` and
  ``transports=`` come from the job;
- lab and tests (``source = "file"``): ``nbdkit file`` over the raw image behind the snapshot
  disk's datastore path, found through the ``datastore_roots`` mapping (datastore name -> local
  directory) and, for a monolithicFlat descriptor, its ``FLAT`` extent.

Both are read-only and die with the VMA (``--exit-with-parent``). ``--threads`` covers the
mover's connections times their requests in flight; nbdkit serves any number of connections at
once, so the several connections of a mover need nothing more.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from pyapp.datastore import DatastorePathError, parse_datastore_path, raw_extent
from pyapp.process import aterminate
from vma.config import WILDCARD_ADDRESSES, VmaConfig
from vma.vsphere.client import VCenterLogin


class SourceError(Exception):
    """A disk source could not be prepared or did not start."""


@dataclass(frozen=True)
class SourceSpec:
    """What the source serves: one disk of one snapshot."""

    vm_moref: str
    snapshot_moref: str
    file_name: str  # datastore path of the snapshot's disk backing


def resolve_datastore_path(ds_path: str, roots: Mapping[str, Path]) -> Path:
    """``[ds] dir/x.vmdk`` -> the local raw image, through the datastore -> directory mapping."""
    try:
        ds, rel = parse_datastore_path(ds_path)
    except DatastorePathError as e:
        raise SourceError(str(e)) from e
    root = roots.get(ds)
    if root is None:
        raise SourceError(f"datastore {ds!r} has no local directory in datastore_roots")
    path = Path(root, *rel.parts)
    if not path.exists():
        raise SourceError(f"{ds_path} -> {path}: no such file")
    try:
        return raw_extent(path)
    except DatastorePathError as e:
        raise SourceError(f"{e} (only flat disks can be served locally)") from e


@dataclass(frozen=True)
class TcpListen:
    """Where an export's nbdkit listens: an IPv4 address and a port."""

    host: str
    port: int

    @property
    def connect_host(self) -> str:
        """Where a local client reaches it (a wildcard address is reached on loopback)."""
        return "127.0.0.1" if self.host in WILDCARD_ADDRESSES else self.host


#: A Unix socket path (replication) or a TCP address (export).
Listen = Path | TcpListen


def _listen_args(listen: Listen) -> list[str]:
    if isinstance(listen, TcpListen):
        return ["--ipaddr", listen.host, "--port", str(listen.port)]
    return ["--unix", str(listen)]


def _listen_of(argv: list[str]) -> Listen:
    """Where the nbdkit ``argv`` (as :func:`_listen_args` wrote it) listens."""
    if "--unix" in argv:
        return Path(argv[argv.index("--unix") + 1])
    if "--port" in argv and "--ipaddr" in argv:
        return TcpListen(argv[argv.index("--ipaddr") + 1], int(argv[argv.index("--port") + 1]))
    raise SourceError("the nbdkit command names neither --unix nor --ipaddr and --port")


def _common(nbdkit: str, listen: Listen, threads: int) -> list[str]:
    return [
        nbdkit,
        "--exit-with-parent",
        "--foreground",
        "--readonly",
        *_listen_args(listen),
        "--threads",
        str(threads),
    ]


def vddk_argv(
    config: VmaConfig,
    login: VCenterLogin,
    spec: SourceSpec,
    listen: Listen,
    password_file: Path,
    threads: int,
    thumbprint: str = "",
) -> list[str]:
    """The production command line: ``nbdkit vddk`` reading ``spec``'s disk as of its snapshot.
    ``thumbprint`` (else ``vddk_thumbprint`` from the configuration) pins vCenter's certificate."""
    _, host, port = login.endpoint()
    argv = [
        *_common(config.nbdkit, listen, threads),
        "vddk",
        f"libdir={config.vddk_libdir}",
        f"server={host}",
        f"port={port}",
        f"user={login.username}",
        f"password=+{password_file}",
    ]
    thumbprint = thumbprint or config.vddk_thumbprint
    if thumbprint:
        argv.append(f"thumbprint={thumbprint}")
    argv += [
        f"vm=moref={spec.vm_moref}",
        f"snapshot={spec.snapshot_moref}",
        f"transports={config.vddk_transports}",
        f"file={spec.file_name}",
    ]
    return argv


def file_argv(config: VmaConfig, image: Path, listen: Listen, threads: int) -> list[str]:
    """The lab's command line: ``nbdkit file`` over a local raw image."""
    return [*_common(config.nbdkit, listen, threads), "file", f"file={image}", "cache=none"]


def write_password_file(path: Path, password: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password)


def socket_path(socket_dir: Path, job_id: str, name: str) -> Path:
    """A short socket path for one disk of one job. Unix socket paths are limited to 107 bytes,
    so the name is a digest of job and disk, in a short private directory."""
    digest = hashlib.sha256(f"{job_id}/{name}".encode()).hexdigest()[:20]
    path = socket_dir / f"{digest}.sock"
    if len(str(path).encode()) > 107:
        raise SourceError(f"socket directory {socket_dir} is too long for a Unix socket path")
    return path


def certificate_thumbprint(host: str, port: int, timeout: float = 10.0) -> str:
    """The SHA-1 thumbprint of the certificate ``host:port`` presents, as VDDK wants it
    (``AA:BB:...``). Blocking: call it in a thread."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we are reading the certificate, not trusting it
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise SourceError(f"{host}:{port} presented no certificate")
    digest = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def source_argv(
    config: VmaConfig,
    login: VCenterLogin,
    spec: SourceSpec,
    work_dir: Path,
    listen: Listen,
    threads: int,
    thumbprint: str = "",
) -> list[str]:
    """The argv serving this disk on ``listen``, preparing what it needs in ``work_dir`` (the
    password file)."""
    if config.source == "vddk":
        password_file = work_dir / "vcenter.pass"
        if not password_file.exists():
            write_password_file(password_file, login.password)
        return vddk_argv(config, login, spec, listen, password_file, threads, thumbprint)
    return file_argv(config, resolve_datastore_path(spec.file_name, config.datastore_roots), listen, threads)


async def prepare_source(
    config: VmaConfig,
    login: VCenterLogin,
    spec: SourceSpec,
    work_dir: Path,
    listen: Listen,
    threads: int,
) -> list[str]:
    """:func:`source_argv`, after reading the certificate thumbprint vCenter presents when the
    vddk source needs one and none is configured (trust on first use, per job)."""
    thumbprint = ""
    if config.source == "vddk" and not config.vddk_thumbprint:
        _, host, port = login.endpoint()
        try:
            thumbprint = await trio.to_thread.run_sync(certificate_thumbprint, host, port)
        except OSError as e:
            raise SourceError(f"cannot read the certificate thumbprint of {host}:{port}: {e}") from e
    return source_argv(config, login, spec, work_dir, listen, threads, thumbprint)


def _accepts(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
        s.settimeout(1)
        with contextlib.suppress(OSError):
            s.recv(8)  # let nbdkit send its greeting so the probe is a clean disconnect
        return True


def _pid_file_names(path: Path, pid: int) -> bool:
    try:
        return path.read_text().strip() == str(pid)
    except OSError:
        return False


def local_uri(listen: Listen) -> str:
    """The NBD URI a client on this host uses for ``listen``."""
    if isinstance(listen, TcpListen):
        return f"nbd://{listen.connect_host}:{listen.port}/"
    return f"nbd+unix:///?socket={listen}"


@contextlib.asynccontextmanager
async def serve_source(argv: list[str], log_path: Path, *, start_timeout: float = 60.0) -> AsyncIterator[str]:
    """Run the nbdkit ``argv`` (which names its ``--unix`` socket, or its ``--ipaddr`` and
    ``--port``) until the block exits; yields the NBD URI of the served disk for a client on this
    host. nbdkit's messages go to ``log_path``.

    Readiness: a Unix socket (in the VMA's private directory) is ready when it accepts a
    connection. A TCP port was only free when it was picked: another process may take it before
    nbdkit binds, and a probe would then reach that process. So on TCP nbdkit writes a pid file
    (``<log_path>.pid``), which it does only once it listens itself."""
    listen = _listen_of(argv)
    pid_file = log_path.with_suffix(".pid")
    if isinstance(listen, TcpListen):
        await trio.Path(pid_file).unlink(missing_ok=True)
        argv = [argv[0], f"--pidfile={pid_file}", *argv[1:]]
    else:
        await trio.Path(listen).unlink(missing_ok=True)
    log_file = await trio.to_thread.run_sync(log_path.open, "ab")
    try:
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file
        )
    finally:
        log_file.close()

    def ready() -> bool:
        if isinstance(listen, TcpListen):
            return _pid_file_names(pid_file, proc.pid)
        return _accepts(listen)

    try:
        with trio.move_on_after(start_timeout) as scope:
            while True:
                if proc.poll() is not None:
                    err = (await trio.Path(log_path).read_text(errors="replace"))[-2000:]
                    raise SourceError(f"nbdkit exited with {proc.returncode}: {err.strip()}")
                if await trio.to_thread.run_sync(ready):
                    break
                await trio.sleep(0.02)
        if scope.cancelled_caught:
            raise SourceError(f"nbdkit did not serve {local_uri(listen)} within {start_timeout} s")
        yield local_uri(listen)
    finally:
        with trio.CancelScope(shield=True):
            await aterminate(proc)
            if isinstance(listen, TcpListen):
                await trio.Path(pid_file).unlink(missing_ok=True)
            else:
                await trio.Path(listen).unlink(missing_ok=True)
