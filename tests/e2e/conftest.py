"""The whole product on loopback: the vSphere lab, the real OMA (in process, its own PostgreSQL
database, the replication engine on) and the real VMA, enrolled with the OMA as an operator
would enrol it, and a default VMware credential for the lab stored in the OMA."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lab import Lab, LabVM
from oma.cloudstack.omavm import os_addresses
from oma.replication.engine import ReplicationEngine
from oma.state import STATE_KEY, OmaState
from pyapp.db import create_database, with_database
from pyapp.nbd_export import free_tcp_port
from tests.oma.cloudstack_lab import LabCloudStack, run_cloudstack_lab
from tests.oma.oma_harness import Oma, make_config, run_oma
from tests.vma.conftest import signed_client, vma_config
from vma.config import VmaConfig
from vma.server import serve_vma

TERMINAL = ("completed", "failed", "cancelled")


async def enroll(oma: Oma, name: str = "vma-e2e") -> tuple[str, str]:
    """The VMA's enrollment: pairing code, ed25519 proof of the key, approval -> id and secret."""
    http = oma.client
    code = (await oma.post("/admin/vma/pairing-code", json={})).json()["pairing_code"]
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    e = (
        await http.post(
            oma.url("/vma/enroll"),
            json={
                "pairing_code": code,
                "vma_public_key": public.decode(),
                "vma_name": name,
                "vma_version": "0.1.0",
                "vma_fingerprint": "SHA256:e2e",
            },
        )
    ).json()
    signature = base64.b64encode(key.sign(e["challenge"].encode())).decode()
    r = await http.post(
        oma.url("/vma/enroll/verify"), json={"enrollment_id": e["enrollment_id"], "signature": signature}
    )
    assert r.status_code == 200, r.text
    r = await oma.post(f"/admin/vma/approve/{e['enrollment_id']}", json={})
    assert r.status_code == 200, r.text
    result = (
        await http.get(
            oma.url("/vma/enroll/result"),
            params={"enrollment_id": e["enrollment_id"], "signature": signature},
        )
    ).json()
    return str(result["appliance_id"]), str(result["secret"])


@dataclass
class Product:
    oma: Oma
    vma_url: str
    vma: VmaConfig
    lab: Lab

    @property
    def engine(self) -> ReplicationEngine:
        st: OmaState = self.oma.extra["app"].extensions[STATE_KEY]
        assert st.engine is not None
        return st.engine

    async def replicate(self, vm: LabVM, **extra: Any) -> dict[str, Any]:
        """Create a replication of ``vm`` (disks from the inventory); the engine takes it from there."""
        body = {"source_vm": {"name": vm.name, "path": f"/DC0/vm/{vm.name}", "id": vm.moref}, **extra}
        r = await self.oma.post("/replications", json=body)
        assert r.status_code == 201, r.text
        job: dict[str, Any] = r.json()
        return job

    async def job(self, job_id: str) -> dict[str, Any]:
        r = await self.oma.get(f"/replications/{job_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def wait(self, job_id: str, within: float = 60.0) -> dict[str, Any]:
        """Poll the OMA until the job is terminal and the engine has let it go (exports closed)."""
        with trio.fail_after(within):
            while True:
                job = await self.job(job_id)
                if job["status"] in TERMINAL and job_id not in self.engine.jobs:
                    return job
                await trio.sleep(0.05)

    async def change_id(self, vm: LabVM, disk_id: str) -> str | None:
        r = await self.oma.get(
            "/replications/changeid", params={"vm_path": f"/DC0/vm/{vm.name}", "disk_id": disk_id}
        )
        value: str | None = r.json()["change_id"]
        return value


@pytest.fixture
async def oma_dsn(postgres_admin_dsn: str) -> str:
    name = f"oma_e2e_{uuid.uuid4().hex[:12]}"
    await create_database(postgres_admin_dsn, name)
    return with_database(postgres_admin_dsn, name)


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[LabCloudStack]:
    """The lab CloudStack, its OMA VM holding this host's first MAC (so detection finds it); the
    device links of volumes attached to it under ``<tmp_path>/cloudstack/dev``."""
    host = os_addresses()
    assert host.macs, "this host has no MAC address for the OMA VM to have"
    async with run_cloudstack_lab(tmp_path / "cloudstack", oma_vm_mac=host.macs[0]) as lab_cloud:
        yield lab_cloud


@pytest.fixture
def oma_overrides() -> dict[str, Any]:
    """More configuration of the product's OMA (a test module overrides this fixture)."""
    return {}


@pytest.fixture
async def product(
    tmp_path: Path, oma_dsn: str, lab: Lab, nursery: trio.Nursery, oma_overrides: dict[str, Any]
) -> AsyncIterator[Product]:
    vma_port = free_tcp_port()
    config = make_config(
        tmp_path,
        oma_dsn,
        f"http://127.0.0.1:{vma_port}",
        run_replications=True,
        engine_poll_interval=0.2,
        vma_timeout=10.0,
        # The secret the VMA gets at enrollment (below): the OMA signs its requests to it with it.
        vma_secret_file=tmp_path / "oma.secret",
        **oma_overrides,
    )
    async with run_oma(config) as oma:
        appliance_id, secret = await enroll(oma)
        vc = vma_config(tmp_path, lab, None)
        vc.oma_url, vc.appliance_id, vc.port = oma.base_url, appliance_id, vma_port
        assert vc.oma_secret_file is not None
        assert vc.oma_secret_file == config.vma_secret_file
        vc.oma_secret_file.write_text(secret)
        vma_url: str = await nursery.start(
            lambda task_status: serve_vma(vc, handle_signals=False, task_status=task_status)
        )
        r = await oma.post(
            "/vmware-credentials",
            json=lab_credential(lab),
        )
        assert r.status_code == 201, r.text
        yield Product(oma, vma_url, vc, lab)


def lab_credential(lab: Lab) -> dict[str, Any]:
    """The lab vCenter's login as the default VMware credential (``POST /vmware-credentials``)."""
    return {
        "credential_name": "lab",
        "vcenter_host": lab.url,
        "username": lab.username,
        "password": lab.password,
        "datacenter": "DC0",
        "is_default": True,
    }


async def vma_progress(product: Product, job_id: str) -> dict[str, Any]:
    async with signed_client(product.vma, timeout=10) as http:
        body: dict[str, Any] = (await http.get(f"{product.vma_url}/api/v1/progress/{job_id}")).json()
        return body


async def hold_copy(product: Product, job_id: str) -> subprocess.Popen[bytes]:
    """Stop (SIGSTOP) the job's first qemu-nbd and wait until the VMA is copying into it: the copy
    is then in flight and cannot end by itself. Returns the export's process."""
    with trio.fail_after(30):
        while True:
            running = product.engine.jobs.get(job_id)
            if running and running.targets and running.targets[0].export is not None:
                process = running.targets[0].export.process
                if process is not None:
                    break
            await trio.sleep(0.005)
        os.kill(process.pid, signal.SIGSTOP)
        while (await vma_progress(product, job_id)).get("phase") != "copying":
            await trio.sleep(0.01)
    return process
