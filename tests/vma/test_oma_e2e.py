"""The VMA against the real OMA (``oma-api-server``), over real HTTP: enrollment credentials,
login, change IDs, replication record updates and the OMA's progress proxy.

The OMA is this repository's (``python -m oma.server``, with an embedded PostgreSQL in the
test's directory); ``OMA_API_SERVER`` may name another ``oma-api-server`` executable to test.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lab import Lab, LabVM
from pyapp.nbd_export import NbdExport, free_tcp_port
from tests.vma.conftest import images_equal, new_target, oma_auth, vma_config
from vma.server import serve_vma

pytestmark = pytest.mark.e2e


def oma_command() -> list[str]:
    named = os.environ.get("OMA_API_SERVER")
    return [named] if named else [sys.executable, "-m", "oma.server"]

ADMIN = ("admin", "admin-pass-e2e")


@pytest.fixture
def vma_port() -> int:
    return free_tcp_port()


@pytest.fixture
def oma_url(tmp_path: Path, vma_port: int) -> Iterator[str]:
    """The OMA, whose progress proxy reaches the VMA at ``vma_port`` (the tunnel's end)."""
    port = free_tcp_port()
    env = {
        **os.environ,
        "OMA_ADMIN_USERNAME": ADMIN[0],
        "OMA_ADMIN_PASSWORD": ADMIN[1],
        # This test plays the OMA's replication engine itself (exports, /replicate): the real one
        # would claim the same jobs. tests/e2e runs the engine.
        "OMA_REPLICATION_ENGINE": "0",
        # The VMA's enrollment secret (vma_config's file): the OMA signs its VMA requests with it.
        "OMA_VMA_SECRET_FILE": str(tmp_path / "oma.secret"),
    }
    log = (tmp_path / "oma.log").open("wb")
    proc = subprocess.Popen(
        [
            *oma_command(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "oma"),
            "--vma-url",
            f"http://127.0.0.1:{vma_port}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (tmp_path / "oma.log").read_text()
            trio.run(trio.sleep, 0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


async def enroll(http: httpx.AsyncClient, api: str, admin: dict[str, str]) -> tuple[str, str]:
    """What the VMA's enrollment does: pairing code, ed25519 proof, approval -> id and secret."""
    code = (await http.post(f"{api}/admin/vma/pairing-code", json={}, headers=admin)).json()["pairing_code"]
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    e = (
        await http.post(
            f"{api}/vma/enroll",
            json={
                "pairing_code": code,
                "vma_public_key": public.decode(),
                "vma_name": "vma-e2e",
                "vma_version": "0.1.0",
                "vma_fingerprint": "SHA256:e2e",
            },
        )
    ).json()
    signature = base64.b64encode(key.sign(e["challenge"].encode())).decode()
    await http.post(
        f"{api}/vma/enroll/verify", json={"enrollment_id": e["enrollment_id"], "signature": signature}
    )
    await http.post(f"{api}/admin/vma/approve/{e['enrollment_id']}", json={}, headers=admin)
    result = (
        await http.get(
            f"{api}/vma/enroll/result", params={"enrollment_id": e["enrollment_id"], "signature": signature}
        )
    ).json()
    return str(result["appliance_id"]), str(result["secret"])


async def test_full_and_incremental_against_the_real_oma(
    tmp_path: Path, oma_url: str, vma_port: int, lab: Lab, vm1: LabVM, nursery: trio.Nursery
) -> None:
    api = f"{oma_url}/api/v1"
    async with httpx.AsyncClient(timeout=60) as http:
        login = await http.post(f"{api}/auth/login", json={"username": ADMIN[0], "password": ADMIN[1]})
        admin = {"Authorization": f"Bearer {login.json()['token']}"}
        appliance_id, secret = await enroll(http, api, admin)
        config = vma_config(tmp_path, lab, None)
        config.oma_url, config.appliance_id, config.port = oma_url, appliance_id, vma_port
        assert config.oma_secret_file is not None
        config.oma_secret_file.write_text(secret)
        vma: str = await nursery.start(
            lambda task_status: serve_vma(config, handle_signals=False, task_status=task_status)
        )
        files = [new_target(tmp_path / f"t{d.key}.raw", d.capacity) for d in vm1.disks]
        with NbdExport(files[0], name="d0", shared=8) as e0, NbdExport(files[1], name="d1", shared=8) as e1:
            for kind in ("initial", "incremental"):
                if kind == "incremental":
                    vm1.disks[0].guest.rewrite_random_chunks(4, chunk=64 * 1024, seed=2)
                source: dict[str, Any] = {
                    "name": "vm1",
                    "path": "/DC0/vm/vm1",
                    "id": vm1.moref,
                    "datacenter": "DC0",
                    "disks": [{"id": f"disk-{d.key}", "capacity_bytes": d.capacity} for d in vm1.disks],
                }
                r = await http.post(
                    f"{api}/replications", json={"source_vm": source, "vcenter_host": lab.url}, headers=admin
                )
                assert r.status_code == 201, r.text
                job = r.json()
                assert job["replication_type"] == kind
                body = {
                    "job_id": job["id"],
                    "vcenter": lab.url,
                    "username": lab.username,
                    "password": lab.password,
                    "vm_paths": ["/DC0/vm/vm1"],
                    "targets": {
                        "/DC0/vm/vm1": {
                            f"disk-{vm1.disks[0].key}": e0.uri,
                            f"disk-{vm1.disks[1].key}": e1.uri,
                        }
                    },
                }
                signed = oma_auth(config)
                assert (await http.post(f"{vma}/api/v1/replicate", json=body, auth=signed)).status_code == 200
                with trio.fail_after(60):
                    while True:
                        p = (await http.get(f"{vma}/api/v1/progress/{job['id']}", auth=signed)).json()
                        if p["status"] in ("completed", "failed"):
                            break
                        await trio.sleep(0.1)
                assert p["status"] == "completed", json.dumps(p)
                # The VMA's own status turns "completed" just before its final report reaches the OMA.
                with trio.fail_after(10):
                    while True:
                        record = (await http.get(f"{api}/replications/{job['id']}", headers=admin)).json()
                        if record["status"] != "replicating":
                            break
                        await trio.sleep(0.05)
                assert record["status"] == "completed" and record["progress_percent"] == 100
                assert all(d["change_id"] for d in record["disks"])
                proxied = await http.get(f"{api}/progress/{job['id']}", headers=admin)
                assert proxied.status_code == 200, proxied.text  # the OMA's proxy of our /progress
                assert proxied.json()["job_id"] == job["id"] and proxied.json()["status"] == "completed"
                for f, d in zip(files, vm1.disks, strict=True):
                    assert images_equal(f, d.image)
