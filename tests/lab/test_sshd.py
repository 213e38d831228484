"""The lab sshd (lab/sshd.py): Debian's real sshd on a free loopback port, letting in only the
tunnel user's keys, and only for what their authorized_keys line allows."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.sshd import TUNNEL_USER, LabSshd


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[LabSshd]:
    with LabSshd(tmp_path / "sshd") as server:
        yield server


def client_key(tmp_path: Path) -> Path:
    key = tmp_path / "client_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def ssh(
    sshd: LabSshd, key: Path, known_hosts: Path, *args: str, user: str = TUNNEL_USER
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "IdentitiesOnly=yes", "-i", str(key), "-p", str(sshd.port), f"{user}@127.0.0.1", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_a_restricted_key_runs_no_command_and_other_users_are_refused(sshd: LabSshd, tmp_path: Path) -> None:
    key = client_key(tmp_path)
    kind, blob = key.with_suffix(".pub").read_text().split()[:2]
    sshd.authorized_keys.write_text(f'restrict,port-forwarding,command="/bin/false" {kind} {blob} vma:t\n')
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key_line()}\n")
    done = ssh(sshd, key, known_hosts, "echo", "reached-a-shell")
    assert "reached-a-shell" not in done.stdout and done.returncode != 0  # the forced /bin/false ran
    assert "Accepted publickey for oma-tunnel" in sshd.log()
    refused = ssh(sshd, key, known_hosts, "true", user="root")
    assert refused.returncode == 255 and "Permission denied" in refused.stderr


def test_an_unknown_key_is_refused(sshd: LabSshd, tmp_path: Path) -> None:
    key = client_key(tmp_path)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key_line()}\n")
    done = ssh(sshd, key, known_hosts, "true")
    assert done.returncode == 255 and "Permission denied (publickey)" in done.stderr
