"""Disk sources: the production ``nbdkit vddk`` command line (VDDK is not installable here, so its
exact argv is the check) and the lab's ``nbdkit file`` source actually serving a disk."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pyapp.nbd_export import free_tcp_port
from vma.config import VmaConfig
from vma.replication.source import (
    SourceError,
    SourceSpec,
    TcpListen,
    certificate_thumbprint,
    resolve_datastore_path,
    serve_source,
    socket_path,
    source_argv,
)
from vma.vsphere.client import VCenterLogin


def test_vddk_argv(tmp_path: Path) -> None:
    config = VmaConfig(
        source="vddk",
        vddk_libdir=Path("/opt/vmware-vix-disklib-distrib"),
        vddk_thumbprint="AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD",
        vddk_transports="nbd:nbdssl:hotadd",
    )
    login = VCenterLogin("vcenter.example.com", "administrator@vsphere.local", "pa ss'word")
    spec = SourceSpec("vm-143233", "snapshot-61", "[DS1] PGWIN/PGWIN_1.vmdk")
    sock = socket_path(tmp_path, "repl-vm-143233-1754407216", "vm-143233-disk-2001")
    argv = source_argv(config, login, spec, tmp_path, sock, threads=64)
    password_file = tmp_path / "vcenter.pass"
    assert argv == [
        "nbdkit",
        "--exit-with-parent",
        "--foreground",
        "--readonly",
        "--unix",
        str(sock),
        "--threads",
        "64",
        "vddk",
        "libdir=/opt/vmware-vix-disklib-distrib",
        "server=vcenter.example.com",
        "port=443",
        "user=administrator@vsphere.local",
        f"password=+{password_file}",
        "thumbprint=AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD",
        "vm=moref=vm-143233",
        "snapshot=snapshot-61",
        "transports=nbd:nbdssl:hotadd",
        "file=[DS1] PGWIN/PGWIN_1.vmdk",
    ]
    # The password is in a private file, never in argv.
    assert password_file.read_text() == "pa ss'word"
    assert stat.S_IMODE(os.stat(password_file).st_mode) == 0o600
    assert not any("pa ss'word" in a for a in argv)


def test_resolve_datastore_path(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "vm1").mkdir(parents=True)
    (root / "vm1" / "vm1-flat.vmdk").write_bytes(b"\0" * 512)
    (root / "vm1" / "vm1.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\nRW 1 FLAT "vm1-flat.vmdk" 0\n'
    )
    roots = {"LocalDS_0": root}
    assert resolve_datastore_path("[LocalDS_0] vm1/vm1.vmdk", roots) == root / "vm1" / "vm1-flat.vmdk"
    with pytest.raises(SourceError, match="no local directory"):
        resolve_datastore_path("[Other] vm1/vm1.vmdk", roots)
    with pytest.raises(SourceError, match="leaves"):
        resolve_datastore_path("[LocalDS_0] ../etc/passwd", roots)
    with pytest.raises(SourceError, match="no such file"):
        resolve_datastore_path("[LocalDS_0] vm2/vm2.vmdk", roots)


async def test_file_source_serves_the_image(tmp_path: Path) -> None:
    image = tmp_path / "ds" / "vm1" / "vm1-flat.vmdk"
    image.parent.mkdir(parents=True)
    image.write_bytes(os.urandom(1 << 20) + b"\0" * (3 << 20))
    config = VmaConfig(source="file", datastore_roots={"LocalDS_0": tmp_path / "ds"})
    login = VCenterLogin("127.0.0.1:1", "u", "p")
    spec = SourceSpec("vm-1", "snapshot-1", "[LocalDS_0] vm1/vm1-flat.vmdk")
    sock = tmp_path / "disk.sock"
    argv = source_argv(config, login, spec, tmp_path, sock, threads=8)
    assert argv[-3:] == ["file", f"file={image}", "cache=none"]
    async with serve_source(argv, tmp_path / "disk.log") as uri:
        assert uri == f"nbd+unix:///?socket={sock}"
        out = tmp_path / "copy.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)], check=True)
        assert out.read_bytes() == image.read_bytes()
    assert not (tmp_path / "disk.sock").exists()
    assert not (tmp_path / "vcenter.pass").exists()  # the file source needs no password


async def test_file_source_on_tcp_serves_several_clients(tmp_path: Path) -> None:
    """An export job's source: TCP, read-only, several clients at once (the OMA's mover opens
    several connections); ready only once nbdkit wrote its pid file, gone with the block."""
    image = tmp_path / "ds" / "vm1" / "vm1-flat.vmdk"
    image.parent.mkdir(parents=True)
    image.write_bytes(os.urandom(1 << 20) + b"\0" * (1 << 20))
    config = VmaConfig(source="file", datastore_roots={"LocalDS_0": tmp_path / "ds"})
    spec = SourceSpec("vm-1", "snapshot-1", "[LocalDS_0] vm1/vm1-flat.vmdk")
    listen = TcpListen("127.0.0.1", free_tcp_port())
    argv = source_argv(config, VCenterLogin("127.0.0.1:1", "u", "p"), spec, tmp_path, listen, threads=8)
    common = ["nbdkit", "--exit-with-parent", "--foreground", "--readonly"]
    assert argv[:8] == [*common, "--ipaddr", "127.0.0.1", "--port", str(listen.port)]
    async with serve_source(argv, tmp_path / "disk.log") as uri:
        assert uri == f"nbd://127.0.0.1:{listen.port}/"
        assert (tmp_path / "disk.pid").exists()
        copies = [tmp_path / f"copy{i}.raw" for i in range(3)]
        readers = [
            subprocess.Popen(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(c)]) for c in copies
        ]
        assert [r.wait(timeout=30) for r in readers] == [0, 0, 0]
        assert all(c.read_bytes() == image.read_bytes() for c in copies)
        write = subprocess.run(["nbdcopy", str(image), uri], capture_output=True)
        assert write.returncode != 0  # read-only
    assert not (tmp_path / "disk.pid").exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", listen.port)) != 0


async def test_source_that_cannot_start(tmp_path: Path) -> None:
    argv = [
        "nbdkit",
        "--exit-with-parent",
        "--foreground",
        "--unix",
        str(tmp_path / "s.sock"),
        "nosuchplugin",
    ]
    with pytest.raises(SourceError, match="nbdkit exited"):
        async with serve_source(argv, tmp_path / "s.log"):
            pass
    assert "nosuchplugin" in (tmp_path / "s.log").read_text()


def test_socket_paths_stay_short(tmp_path: Path) -> None:
    long_job = "repl-" + "x" * 190
    path = socket_path(Path("/tmp/vma-abcdefgh"), long_job, "vm-1-disk-2000")
    assert len(str(path)) < 60 and path.suffix == ".sock"
    assert path != socket_path(Path("/tmp/vma-abcdefgh"), long_job, "vm-1-disk-2001")
    with pytest.raises(SourceError, match="too long"):
        socket_path(tmp_path / ("d" * 120), "j", "n")


def test_certificate_thumbprint_of_a_tls_server(tmp_path: Path) -> None:
    """Without ``vddk_thumbprint`` the VMA reads vCenter's certificate thumbprint (SHA-1, as VDDK
    wants it); here from a real TLS server on loopback with a fresh self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vcenter.lab")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve_one() -> None:
        conn, _ = server.accept()
        with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    thread = threading.Thread(target=serve_one)
    thread.start()
    try:
        thumbprint = certificate_thumbprint("127.0.0.1", port)
    finally:
        thread.join(timeout=10)
        server.close()
    expected = cert.fingerprint(hashes.SHA1()).hex().upper()
    assert thumbprint == ":".join(expected[i : i + 2] for i in range(0, 40, 2))
    config = VmaConfig(source="vddk")
    login = VCenterLogin("127.0.0.1", "u", "p")
    spec = SourceSpec("vm-1", "snapshot-1", "[ds] a/a.vmdk")
    argv = source_argv(config, login, spec, tmp_path, tmp_path / "s.sock", 8, thumbprint=thumbprint)
    assert f"thumbprint={thumbprint}" in argv
