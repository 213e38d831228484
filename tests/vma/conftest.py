"""Fixtures for the VMA's tests: the vSphere lab, the OMA double, a VMA served on loopback."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from lab import Lab
from pyapp.nbd_export import free_tcp_port
from pyapp.vma_auth import SecretFile, SignedAuth
from tests.vma.oma_double import OmaDouble, run_oma_double
from vma.config import VmaConfig
from vma.server import serve_vma
from vma.vsphere.client import VCenterLogin, VSphere

VM_PATH = "/DC0/vm/vm1"


def replicate_body(lab: Lab, job_id: str, **fields: Any) -> dict[str, Any]:
    """A ``POST /api/v1/replicate`` body for the lab's vm1 with the lab's login, plus ``fields``."""
    return {
        "job_id": job_id,
        "vcenter": lab.url,
        "username": lab.username,
        "password": lab.password,
        "vm_paths": [VM_PATH],
        **fields,
    }


def oma_auth(config: VmaConfig) -> SignedAuth:
    """Requests signed as the enrolled OMA signs them (the VMA's own enrollment secret)."""
    return SignedAuth(SecretFile(config.oma_secret_file).read)


def signed_client(config: VmaConfig, timeout: float = 60) -> httpx.AsyncClient:
    """An HTTP client whose every request carries the enrolled OMA's signature."""
    return httpx.AsyncClient(timeout=timeout, auth=oma_auth(config))


@pytest.fixture
async def oma() -> AsyncIterator[OmaDouble]:
    async with run_oma_double() as double:
        yield double


@dataclass
class Vma:
    url: str
    config: VmaConfig
    http: httpx.AsyncClient

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(f"{self.url}{path}")

    async def post(self, path: str, body: Any) -> httpx.Response:
        return await self.http.post(f"{self.url}{path}", json=body)

    async def put(self, path: str, body: Any) -> httpx.Response:
        return await self.http.put(f"{self.url}{path}", json=body)

    async def wait_job(self, job_id: str, within: float = 60.0) -> dict[str, Any]:
        """Poll ``/status`` until the job is completed or failed; returns its ``/progress``."""
        with trio.fail_after(within):
            while True:
                status = (await self.get(f"/api/v1/status/{job_id}")).json()
                if status["status"] in ("completed", "failed"):
                    body: dict[str, Any] = (await self.get(f"/api/v1/progress/{job_id}")).json()
                    return body
                await trio.sleep(0.05)

    async def wait_phase(self, job_id: str, phase: str, within: float = 30.0) -> dict[str, Any]:
        with trio.fail_after(within):
            while True:
                body: dict[str, Any] = (await self.get(f"/api/v1/progress/{job_id}")).json()
                if body["phase"] == phase:
                    return body
                assert body["status"] not in ("completed", "failed"), body
                await trio.sleep(0.02)


def vma_config(tmp_path: Path, lab: Lab | None, oma: OmaDouble | None) -> VmaConfig:
    secret = tmp_path / "oma.secret"
    secret.write_text((oma.secret if oma else "none") + "\n")
    return VmaConfig(
        host="127.0.0.1",
        port=0,
        work_dir=tmp_path / "work",
        oma_url=oma.url if oma else "http://127.0.0.1:9",
        appliance_id=oma.appliance_id if oma else "vma-none",
        oma_secret_file=secret,
        oma_backoff_initial=0.05,
        oma_backoff_max=0.5,
        oma_unreachable_deadline=20.0,
        source="file",
        datastore_roots=dict(lab.datastores.dirs) if lab else {},
        reconnect_timeout=2.0,
        progress_report_interval=0.2,
    )


StartVma = Callable[..., Awaitable[Vma]]


@pytest.fixture
async def start_vma(
    tmp_path: Path, lab: Lab, oma: OmaDouble, nursery: trio.Nursery
) -> AsyncIterator[StartVma]:
    """Start a VMA on the lab and the OMA double, with configuration overrides."""
    async with signed_client(vma_config(tmp_path, lab, oma)) as http:

        async def start(**overrides: Any) -> Vma:
            config = vma_config(tmp_path, lab, oma)
            for key, value in overrides.items():
                assert hasattr(config, key), key
                setattr(config, key, value)
            url: str = await nursery.start(
                lambda task_status: serve_vma(config, handle_signals=False, task_status=task_status)
            )
            return Vma(url, config, http)

        yield start


@pytest.fixture
async def vma(start_vma: StartVma) -> Vma:
    return await start_vma()


@pytest.fixture
async def api(tmp_path: Path, oma: OmaDouble, nursery: trio.Nursery) -> AsyncIterator[Vma]:
    """A VMA without the lab, for the API's own checks."""
    config = vma_config(tmp_path, None, oma)
    url: str = await nursery.start(
        lambda task_status: serve_vma(config, handle_signals=False, task_status=task_status)
    )
    async with signed_client(config) as http:
        yield Vma(url, config, http)


# -- lab helpers (blocking; call through trio.to_thread.run_sync) ----------------------------------


def snapshot_names(lab: Lab, vm_name: str) -> list[tuple[str, str]]:
    """(name, moref) of every snapshot of the lab VM."""
    vs = VSphere.connect(VCenterLogin(lab.url, lab.username, lab.password))
    try:
        vm = vs.find_vm(f"/DC0/vm/{vm_name}")
        return sorted((s.name, s.snapshot._moId) for s in vs.snapshot_tree(vm))
    finally:
        vs.disconnect()


def make_snapshot(lab: Lab, vm_name: str, name: str) -> str:
    """A snapshot made by someone else than the VMA (an operator, a backup tool)."""
    vs = VSphere.connect(VCenterLogin(lab.url, lab.username, lab.password))
    try:
        return vs.create_snapshot(vs.find_vm(f"/DC0/vm/{vm_name}"), name, "not the VMA's").moref
    finally:
        vs.disconnect()


def images_equal(a: Path, b: Path) -> bool:
    r = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)], capture_output=True
    )
    return r.returncode == 0


def new_target(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


@contextmanager
def slow_export(image: Path, wdelay: str = "500ms") -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """nbdkit serving ``image`` read-write on a loopback port, each write delayed ``wdelay`` s."""
    port = free_tcp_port()
    proc = subprocess.Popen(
        [
            "nbdkit",
            "--foreground",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
            str(port),
            "--filter=delay",
            "file",
            str(image),
            f"wdelay={wdelay}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and proc.poll() is None, "nbdkit did not start"
            time.sleep(0.02)
        yield f"nbd://127.0.0.1:{port}/", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
