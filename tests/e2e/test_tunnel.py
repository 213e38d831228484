"""The tunnel on real OpenSSH: a project-owned sshd (lab/sshd.py), the VMA enrolled with
``vma-enroll`` (its key installed in authorized_keys at approval, the OMA's host key pinned), the
OMA calling the VMA only through the remote forward and the VMA copying into the OMA's NBD exports
only through the local forwards (the exports' URIs name 127.0.0.2, where only the tunnel listens);
the tunnel comes back after its ssh child is killed; revoking the VMA removes its key and
ends its session; a changed host key is refused with a clear error."""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from lab import Lab, LabVM
from lab.sshd import LabSshd
from oma.enrollment.sshd import COMMENT_PREFIX
from pyapp.nbd_export import free_tcp_port
from tests.e2e.conftest import lab_credential
from tests.e2e.test_replication_flow import assert_targets_equal
from tests.oma.oma_harness import Oma, make_config, run_oma
from tests.vma.conftest import vma_config
from vma.config import VmaConfig
from vma.enroll_cli import enroll
from vma.server import serve_vma

pytestmark = pytest.mark.e2e

#: The VMA side's forwards listen here; the OMA's exports and API listen on 127.0.0.1 only, so
#: a VMA reaching them at 127.0.0.2 goes through the tunnel.
VMA_SIDE = "127.0.0.2"


@dataclass
class Tunnelled:
    oma: Oma
    sshd: LabSshd
    vma: VmaConfig
    lab: Lab
    enrollment_id: str

    async def health(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            body: dict[str, Any] = (await http.get(f"http://127.0.0.1:{self.vma.port}/api/v1/health")).json()
            return body

    async def wait_tunnel(self, status: str, within: float = 20.0) -> dict[str, Any]:
        with trio.fail_after(within):
            while True:
                tunnel: dict[str, Any] = (await self.health())["tunnel"]
                if tunnel["status"] == status:
                    return tunnel
                await trio.sleep(0.05)


async def approve_when_pending(oma: Oma, fingerprint_out: io.StringIO) -> str:
    """The administrator's side: the pending enrollment shows the fingerprint vma-enroll printed."""
    with trio.fail_after(20):
        while True:
            pending = (await oma.get("/admin/vma/pending")).json()["enrollments"]
            ready = [e for e in pending if e["status"] == "awaiting_approval"]
            if ready:
                break
            await trio.sleep(0.05)
    enrollment = ready[0]
    assert f"key fingerprint: {enrollment['vma_fingerprint']}" in fingerprint_out.getvalue()
    r = await oma.post(f"/admin/vma/approve/{enrollment['id']}", json={})
    assert r.status_code == 200, r.text
    return str(enrollment["id"])


@pytest.fixture
async def tunnelled(
    tmp_path: Path, oma_dsn: str, lab: Lab, nursery: trio.Nursery
) -> AsyncIterator[Tunnelled]:
    sshd = await trio.to_thread.run_sync(LabSshd(tmp_path / "sshd").start)
    try:
        vma_port, remote_port, oma_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
        config = make_config(
            tmp_path,
            oma_dsn,
            f"http://127.0.0.1:{remote_port}",
            port=oma_port,
            run_replications=True,
            engine_poll_interval=0.2,
            vma_timeout=10.0,
            vma_secret_file=tmp_path / "oma-side" / "vma.secret",
            nbd_host=VMA_SIDE,
            nbd_ports=tuple(free_tcp_port() for _ in range(4)),
            tunnel_authorized_keys=sshd.authorized_keys,
            tunnel_host_key_file=sshd.host_public_key,
            tunnel_sshd_log=sshd.log_file,
            tunnel_ssh_host="127.0.0.1",
            tunnel_ssh_port=sshd.port,
        )
        async with run_oma(config) as oma:
            code = (await oma.post("/admin/vma/pairing-code", json={})).json()["pairing_code"]
            out = io.StringIO()
            base = vma_config(tmp_path, lab, None)
            config_path = tmp_path / "vma" / "vma.json"
            config_path.parent.mkdir()
            config_path.write_text(
                json.dumps(
                    {
                        "host": "127.0.0.1",
                        "port": vma_port,
                        "work_dir": str(base.work_dir),
                        "source": "file",
                        "datastore_roots": {k: str(v) for k, v in base.datastore_roots.items()},
                        "reconnect_timeout": 30.0,
                        "progress_report_interval": 0.2,
                        "oma_backoff_initial": 0.05,
                        "oma_backoff_max": 0.5,
                        "tunnel_backoff_initial": 0.2,
                        "tunnel_backoff_max": 1.0,
                    }
                )
            )
            approved: list[str] = []

            async def administrator() -> None:
                approved.append(await approve_when_pending(oma, out))

            async with trio.open_nursery() as n:
                n.start_soon(administrator)
                await enroll(
                    oma.base_url,
                    code,
                    config_path=config_path,
                    state_dir=tmp_path / "vma",
                    name="vma-tunnel",
                    approval_timeout=30,
                    interval=0.1,
                    local_address=VMA_SIDE,
                    out=out,
                )
            vc = VmaConfig.load(config_path)
            assert vc.tunnel_host == "127.0.0.1" and vc.oma_url == f"http://{VMA_SIDE}:{oma_port}"
            await nursery.start(
                lambda task_status: serve_vma(vc, handle_signals=False, task_status=task_status)
            )
            r = await oma.post("/vmware-credentials", json=lab_credential(lab))
            assert r.status_code == 201, r.text
            product = Tunnelled(oma, sshd, vc, lab, approved[0])
            await product.wait_tunnel("up")
            yield product
    finally:
        await trio.to_thread.run_sync(sshd.close)


def file_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_enrollment_installs_a_restricted_key_and_pins_the_host_key(tunnelled: Tunnelled) -> None:
    vc = tunnelled.vma
    assert vc.tunnel_key_file is not None and vc.tunnel_known_hosts is not None
    assert vc.oma_secret_file is not None
    assert file_mode(vc.tunnel_key_file) == 0o600 and file_mode(vc.oma_secret_file) == 0o600
    # the OMA signs with the secret enrollment delivered to both ends: no manual copy
    assert tunnelled.oma.config.vma_secret_file is not None
    assert tunnelled.oma.config.vma_secret_file.read_text() == vc.oma_secret_file.read_text()
    (line,) = tunnelled.sshd.authorized_keys.read_text().splitlines()
    options, kind, blob, comment = line.split(" ")
    assert comment == f"{COMMENT_PREFIX}{tunnelled.enrollment_id}"
    assert vc.tunnel_key_file.with_suffix(".pub").read_text().split()[:2] == [kind, blob]
    assert options.startswith("restrict,port-forwarding,")
    assert f'permitlisten="127.0.0.1:{vc.tunnel_remote_port}"' in options
    assert 'command="/bin/false"' in options
    assert sorted(
        int(p.split(":")[1].rstrip('"')) for p in options.split(",") if p.startswith("permitopen")
    ) == sorted(vc.tunnel_forward_ports)
    assert tunnelled.sshd.host_key_line() in vc.tunnel_known_hosts.read_text()
    # the OMA reaches the VMA through the remote forward only
    r = await tunnelled.oma.get("/debug/health")
    assert r.status_code == 200, r.text


async def test_replication_through_the_tunnel_after_the_ssh_child_was_killed(
    tunnelled: Tunnelled, vm1: LabVM
) -> None:
    before = (await tunnelled.health())["tunnel"]
    os.kill(before["pid"], signal.SIGKILL)  # the connection drops; the supervisor dials again
    tunnel = await tunnelled.wait_tunnel("up")
    assert tunnel["connections"] == before["connections"] + 1 and tunnel["pid"] != before["pid"]
    r = await tunnelled.oma.post("/discovery/add-vms", json={"vm_names": [vm1.name]})
    assert r.status_code == 200, r.text
    source = {"name": vm1.name, "path": f"/DC0/vm/{vm1.name}", "id": vm1.moref}
    r = await tunnelled.oma.post("/replications", json={"source_vm": source})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    with trio.fail_after(120):
        while True:
            job = (await tunnelled.oma.get(f"/replications/{job_id}")).json()
            if job["status"] in ("completed", "failed", "cancelled"):
                break
            await trio.sleep(0.1)
    assert job["status"] == "completed", job.get("error_message")
    # the VMA copied through the local forwards: the exports' URIs name the VMA side's address
    assert all(d["nbd_uri"].startswith(f"nbd://{VMA_SIDE}:") for d in job["disks"])
    assert_targets_equal(job, vm1)


async def test_revoking_removes_the_key_and_ends_the_session(tunnelled: Tunnelled) -> None:
    r = await tunnelled.oma.delete(f"/admin/vma/revoke/{tunnelled.enrollment_id}")
    assert r.status_code == 200, r.text
    assert tunnelled.sshd.authorized_keys.read_text() == ""
    tunnel = await tunnelled.wait_tunnel("down", within=10)
    assert tunnel["connections"] == 1
    with trio.fail_after(10):  # and it cannot come back
        while "Permission denied" not in str((await tunnelled.health())["tunnel"]["last_error"]):
            await trio.sleep(0.1)
    assert (await tunnelled.health())["tunnel"]["status"] != "up"


async def test_a_changed_host_key_is_refused(tunnelled: Tunnelled) -> None:
    await trio.to_thread.run_sync(tunnelled.sshd.stop)
    tunnelled.sshd.new_host_key()
    await trio.to_thread.run_sync(tunnelled.sshd.start)
    os.kill((await tunnelled.health())["tunnel"]["pid"], signal.SIGKILL)
    with trio.fail_after(15):
        while "host key changed" not in str((await tunnelled.health())["tunnel"]["last_error"]):
            await trio.sleep(0.1)
    assert (await tunnelled.health())["tunnel"]["status"] != "up"
