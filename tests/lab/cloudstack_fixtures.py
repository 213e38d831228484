"""The lab CloudStack started in-process on loopback, and a small client written from CloudStack's
API documentation ("Signing API Requests"): it signs requests itself and does not use the double's
signing code (nor the ``cs`` library), so a mistake shared by the double and a client cannot hide.

The documented recipe: URL-encode each value (spaces as ``%20``, never ``+``), lower-case the whole
command string, sort the pairs by field name, HMAC-SHA1 with the secret key, Base64, and send the
result URL-encoded as ``signature``. "URL-encode" is Java's ``URLEncoder``: letters, digits and
``.-*_`` stay, every other UTF-8 byte is ``%XX``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from lab.cloudstack.app import LabSettings
from lab.cloudstack.cli import serve
from lab.cloudstack.cloud import Options
from lab.cloudstack.seed import Seed, load_seed
from lab.cloudstack.signing import Credentials

API_KEY = "lab-api-key-0123"
SECRET_KEY = "lab-secret-key-4567"
SEED = load_seed()
ZONE1, ZONE2 = SEED.zones[0].id, SEED.zones[1].id
OMA_VM = SEED.omavm.id
SMALL = next(o.id for o in SEED.diskofferings if o.name == "Small")
CUSTOM = next(o.id for o in SEED.diskofferings if o.iscustomized)
MEDIUM_SO = next(o.id for o in SEED.serviceofferings if o.name == "Medium Instance")
TEMPLATE = SEED.templates[0].id
ISOLATED = next(n.id for n in SEED.networks if n.name == "lab-isolated")
SHARED = next(n.id for n in SEED.networks if n.name == "lab-shared")
ZONE2_NET = next(n.id for n in SEED.networks if n.name == "lab-zone2-isolated")
GiB = 1 << 30

_UNRESERVED = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-*_"


def url_encode(value: str) -> str:
    """java.net.URLEncoder.encode with spaces as %20."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in value.encode())


def documented_signature(params: dict[str, str], secret: str) -> str:
    pairs = sorted(f"{name}={url_encode(value)}".lower() for name, value in params.items())
    command_string = "&".join(pairs)
    return base64.b64encode(
        hmac.new(secret.encode(), command_string.encode(), hashlib.sha1).digest()
    ).decode()


def query_string(params: dict[str, str]) -> str:
    return "&".join(f"{url_encode(k)}={url_encode(v)}" for k, v in params.items())


def expires_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S+0000")


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def seed_with(**changes: Any) -> Seed:
    """The default seed with top-level fields replaced (``configuration`` entries are merged)."""
    data = SEED.model_dump()
    if "configuration" in changes:
        changes["configuration"] = {**data["configuration"], **changes["configuration"]}
    data.update(changes)
    return Seed.model_validate(data)


@dataclass
class CloudStackLab:
    url: str
    data_dir: Path
    device_root: Path
    http: httpx.AsyncClient

    @property
    def base(self) -> str:
        return self.url.removesuffix("/client/api")

    def signed(self, command: str, **params: str) -> dict[str, str]:
        out = {"command": command, "apiKey": API_KEY, "response": "json", **params}
        out["signature"] = documented_signature(out, SECRET_KEY)
        return out

    async def send(self, params: dict[str, str], method: str = "GET") -> httpx.Response:
        if method == "GET":
            return await self.http.get(f"{self.url}?{query_string(params)}")
        return await self.http.post(
            self.url,
            content=query_string(params),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )

    async def call(self, command: str, method: str = "GET", **params: str) -> httpx.Response:
        return await self.send(self.signed(command, **params), method)

    async def api(self, command: str, **params: str) -> dict[str, Any]:
        """A call that must succeed: its answer inside ``<command>response``."""
        response = await self.call(command, **params)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json; charset=UTF-8"
        body: dict[str, Any] = response.json()[f"{command.lower()}response"]
        return body

    async def job(self, jobid: str) -> dict[str, Any]:
        """queryAsyncJobResult until the job is no longer pending (10 s at most)."""
        with trio.fail_after(10):
            while True:
                result = await self.api("queryAsyncJobResult", jobid=jobid)
                if result["jobstatus"] != 0:
                    return result
                await trio.sleep(0.02)

    async def run(self, command: str, **params: str) -> dict[str, Any]:
        """An async command and its finished job."""
        accepted = await self.api(command, **params)
        return await self.job(accepted["jobid"])

    async def ok(self, command: str, **params: str) -> dict[str, Any]:
        """An async command whose job must succeed: its jobresult."""
        job = await self.run(command, **params)
        assert job["jobstatus"] == 1, job
        result: dict[str, Any] = job["jobresult"]
        return result

    async def new_volume(self, name: str = "data", zoneid: str = ZONE1, **params: str) -> dict[str, Any]:
        volume: dict[str, Any] = (
            await self.ok("createVolume", name=name, zoneid=zoneid, diskofferingid=SMALL, **params)
        )["volume"]
        return volume

    async def new_vm(self, **params: str) -> dict[str, Any]:
        """A deployed VM (zone 1, lab-isolated, Medium Instance, the seed's template unless
        ``params`` say otherwise), as its job answers it."""
        deploy = {
            "zoneid": ZONE1,
            "serviceofferingid": MEDIUM_SO,
            "templateid": TEMPLATE,
            "networkids": ISOLATED,
        }
        vm: dict[str, Any] = (await self.ok("deployVirtualMachine", **{**deploy, **params}))["virtualmachine"]
        return vm

    async def state(self) -> dict[str, Any]:
        response = await self.http.get(f"{self.base}/lab/state")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def fault(self, **fault: Any) -> httpx.Response:
        return await self.http.post(f"{self.base}/lab/faults", content=json.dumps(fault))

    def link(self, volume_id: str) -> Path:
        return self.device_root / "disk" / "by-id" / f"virtio-{volume_id.replace('-', '')[:20]}"

    def volume_file(self, volume_id: str) -> Path:
        return self.data_dir / "primary" / volume_id


def lab_settings(
    data_dir: Path,
    *,
    seed: Seed = SEED,
    job_delay: float = 0.05,
    oma_mac: str | None = None,
    oma_ip: str | None = None,
) -> LabSettings:
    options = Options(data_dir=data_dir, device_root=data_dir / "dev", oma_mac=oma_mac, oma_ip=oma_ip)
    return LabSettings(seed, options, Credentials(API_KEY, SECRET_KEY), job_delay)


async def start_lab(nursery: trio.Nursery, data_dir: Path, **settings: Any) -> CloudStackLab:
    """The double serving on a free loopback port until ``nursery`` is cancelled."""
    lab_config = lab_settings(data_dir, **settings)
    url: str = await nursery.start(serve, lab_config)
    http = httpx.AsyncClient(timeout=30)
    return CloudStackLab(url, data_dir, lab_config.options.device_root, http)


@pytest.fixture(name="cloudstack")
async def cloudstack_fixture(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[CloudStackLab]:
    """The double with the default seed and 50 ms jobs. Import it into a test module to use it."""
    lab = await start_lab(nursery, tmp_path / "cloudstack")
    yield lab
    await lab.http.aclose()
