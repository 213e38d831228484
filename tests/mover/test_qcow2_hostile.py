"""Hostile QCOW2 sources through the ``mover copy`` command.

A backing file name is data inside the image: whoever made the image chooses it. An absolute name,
one that climbs out with ``..`` or a symlink leading elsewhere must not make the mover copy a host
file into the target; ``--backing-root DIR`` is how an operator admits a directory on purpose. A
header that claims a huge L1 table must be refused by name, in a child whose address space is
bounded so that an attempt to allocate it shows as an abort rather than as a slow machine.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import MiB, images_equal

pytestmark = pytest.mark.interop

SECRET = b"host secret: this file must never reach a target disk"
EXIT_FAILED = 1


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def mover(*args: str, limit_as: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    def bound() -> None:
        if limit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

    return subprocess.run([sys.executable, "-m", "pyapp.cli", *args], capture_output=True, text=True,
                          check=False, timeout=timeout, preexec_fn=bound)


@pytest.fixture
def host_secret(tmp_path: Path) -> Path:
    host = tmp_path / "host"
    host.mkdir()
    p = host / "secret.raw"
    p.write_bytes(SECRET.ljust(MiB, b"\0"))
    return p


def overlay(image: Path, backing_name: str) -> Path:
    image.parent.mkdir(parents=True, exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing_name, "-F", "raw", str(image), "1M")
    return image


def assert_refused(r: subprocess.CompletedProcess[str], target: Path, what: str) -> None:
    assert r.returncode == EXIT_FAILED, r.stdout + r.stderr
    err = json.loads(r.stdout.splitlines()[-1])
    assert err["code"] == "FormatError", err
    assert what in err["error"], err
    assert not target.exists() or SECRET not in target.read_bytes()


def test_copy_refuses_an_absolute_backing_name(tmp_path: Path, host_secret: Path) -> None:
    top = overlay(tmp_path / "images" / "top.qcow2", str(host_secret))
    out = tmp_path / "out.raw"
    assert_refused(mover("copy", str(top), str(out), "--json"), out, "outside")


def test_copy_refuses_a_backing_name_climbing_out(tmp_path: Path, host_secret: Path) -> None:
    top = overlay(tmp_path / "repo" / "vm" / "top.qcow2", "../../host/secret.raw")
    out = tmp_path / "out.raw"
    assert_refused(mover("copy", str(top), str(out), "--json"), out, "outside")


def test_copy_refuses_a_backing_symlink_leading_out(tmp_path: Path, host_secret: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "base.raw").symlink_to(host_secret)
    top = overlay(images / "top.qcow2", "base.raw")
    out = tmp_path / "out.qcow2"
    assert_refused(mover("copy", str(top), str(out), "--json"), out, "outside")


def test_backing_root_admits_a_directory_on_purpose(tmp_path: Path, host_secret: Path) -> None:
    top = overlay(tmp_path / "repo" / "vm" / "top.qcow2", "../../host/secret.raw")
    out = tmp_path / "out.raw"
    r = mover("copy", str(top), str(out), "--json", "--backing-root", str(host_secret.parent))
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_bytes()[: len(SECRET)] == SECRET
    assert images_equal(top, out, fmt_a="qcow2")


def test_huge_l1_size_is_refused_by_name_within_a_memory_limit(tmp_path: Path) -> None:
    image = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(image), "1G")
    b = bytearray(image.read_bytes())
    b[36:40] = (1 << 31).to_bytes(4, "big")  # l1_size: a 16 GiB table in a 200 KiB file
    image.write_bytes(bytes(b))
    out = tmp_path / "out.raw"
    r = mover("copy", str(image), str(out), "--json", limit_as=2 << 30, timeout=60)
    assert r.returncode == EXIT_FAILED, f"status {r.returncode}: {r.stderr[-2000:]}"
    assert "l1_size" in json.loads(r.stdout.splitlines()[-1])["error"]
    assert not out.exists()
