"""The lab CloudStack as the OMA's tests use it: the ``cloudstack-lab`` command started as its own
process on a free loopback port with a temporary data directory, ready once it prints its
address; its lab-only endpoints (``/lab/state``, ``/lab/faults``) for what the tests check and
inject.

(Imported by the tests as ``cloudstack_lab``: pytest puts ``tests/oma`` on ``sys.path``.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from pyapp.process import aterminate

API_KEY = "oma-test-api-key-Ab3_-9"
SECRET_KEY = "oma-test-secret-key-Zz8_-1"
READY = "CloudStack lab listening on "
# The default seed of the double (lab/cloudstack/default_seed.json).
ZONE1 = "4e83869a-fa8b-40a7-9053-4f9f96862929"
ZONE2 = "4093d122-2390-4fa6-8dcb-7baf14eec8be"
OMA_VM = "012331bc-6a5f-48a2-93a6-e41c3c450777"
OMA_VM_MAC = "02:00:4f:4d:41:01"
OMA_VM_IP = "10.1.1.10"
CUSTOM_DISK = "a7d7c4d3-1c90-4554-b697-f7b879a4bf9b"
SMALL_DISK = "f7ce30b9-8479-4e38-9e3c-938430379c66"
MEDIUM_SO = "931d1675-8e16-4f1c-b0b7-4dd6c96be462"
TEMPLATE = "e582ab15-a062-4d2a-8086-df6d74360836"
ISOLATED = "c558a44d-7a1b-4a55-bcc7-a5ebed238c16"
SHARED = "95863323-3d2b-4ce7-b146-2e276f148dc6"
TEST_NET = "253b3c39-cbb7-431f-8c67-93794d82978e"
ZONE2_NET = "ab232c96-8c07-4821-864e-1b356f46e61f"
GIB = 1 << 30


def lab_command() -> str:
    """The ``cloudstack-lab`` command of this environment (the test fails when it is missing)."""
    beside = Path(sys.executable).parent / "cloudstack-lab"
    found = str(beside) if beside.exists() else shutil.which("cloudstack-lab")
    assert found, "cloudstack-lab is not installed: run ./scripts/bootstrap.sh"
    return found


@dataclass
class LabCloudStack:
    url: str  # http://127.0.0.1:PORT/client/api
    data_dir: Path
    device_root: Path
    http: httpx.AsyncClient
    stderr: Path
    api_key: str = API_KEY
    secret_key: str = SECRET_KEY

    @property
    def base(self) -> str:
        return self.url.removesuffix("/client/api")

    def login(self, **changes: str) -> dict[str, str]:
        """The body fields of a request that names this CloudStack."""
        return {"api_url": self.url, "api_key": self.api_key, "secret_key": self.secret_key, **changes}

    async def state(self) -> dict[str, Any]:
        r = await self.http.get(f"{self.base}/lab/state")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def fault(self, **fault: Any) -> None:
        r = await self.http.post(f"{self.base}/lab/faults", content=json.dumps(fault))
        assert r.status_code == 201, r.text

    async def pending_faults(self) -> list[dict[str, Any]]:
        r = await self.http.get(f"{self.base}/lab/faults")
        assert r.status_code == 200, r.text
        pending: list[dict[str, Any]] = r.json()["pending"]
        return pending

    def link(self, volume_id: str) -> Path:
        return self.device_root / "disk" / "by-id" / f"virtio-{volume_id.replace('-', '')[:20]}"


@asynccontextmanager
async def run_cloudstack_lab(
    data_dir: Path,
    *,
    oma_vm_mac: str | None = None,
    oma_vm_ip: str | None = None,
    job_delay: float = 0.05,
    api_key: str = API_KEY,
    secret_key: str = SECRET_KEY,
) -> AsyncIterator[LabCloudStack]:
    """``cloudstack-lab`` serving until the block exits (SIGTERM, then waited for)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    device_root = data_dir / "dev"
    cmd = [
        lab_command(),
        *("--port", "0", "--data-dir", str(data_dir / "cloud"), "--device-root", str(device_root)),
        *("--api-key", api_key, "--secret-key", secret_key, "--job-delay", str(job_delay)),
    ]
    if oma_vm_mac is not None:
        cmd += ["--oma-vm-mac", oma_vm_mac]
    if oma_vm_ip is not None:
        cmd += ["--oma-vm-ip", oma_vm_ip]
    stderr_path = data_dir / "cloudstack-lab.log"
    with stderr_path.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=stderr)
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, f"cloudstack-lab exited before listening: {stderr_path.read_text()[-2000:]}"
                line += chunk
        text = line.decode().strip()
        assert text.startswith(READY), text
        async with httpx.AsyncClient(timeout=30) as http:
            yield LabCloudStack(
                text.removeprefix(READY),
                data_dir / "cloud",
                device_root,
                http,
                stderr_path,
                api_key,
                secret_key,
            )
    finally:
        with trio.CancelScope(shield=True):
            await aterminate(proc)
