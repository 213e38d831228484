"""The OMA test harness: serve the OMA on a free loopback port and drive it over real HTTP.

(Imported by the tests as ``oma_harness``: pytest puts ``tests/oma`` on ``sys.path``.)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from oma.app import create_app
from oma.config import OmaConfig
from pyapp.logs import RecentRecords
from tests.oma.vma_double import double_secret_file

ADMIN_USER = "admin"
ADMIN_PASSWORD = "correct-horse-battery"


@dataclass
class Oma:
    base_url: str
    config: OmaConfig
    client: httpx.AsyncClient
    token: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"{self.base_url}/api/v1{path}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def login(self, username: str = ADMIN_USER, password: str = ADMIN_PASSWORD) -> str:
        r = await self.client.post(self.url("/auth/login"), json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        return str(r.json()["token"])

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.get(self.url(path), headers=kw.pop("headers", self.auth), **kw)

    async def post(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.post(self.url(path), headers=kw.pop("headers", self.auth), **kw)

    async def put(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.put(self.url(path), headers=kw.pop("headers", self.auth), **kw)

    async def delete(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.delete(self.url(path), headers=kw.pop("headers", self.auth), **kw)


def own_secret_file(tmp_path: Path) -> Path:
    """A copy of :func:`double_secret_file` for one OMA."""
    path = tmp_path / "vma-double.secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(double_secret_file().read_bytes())
    path.chmod(0o600)
    return path


def make_config(tmp_path: Path, dsn: str, vma_url: str, **overrides: Any) -> OmaConfig:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "oma-data",
        "host": "127.0.0.1",
        "port": 0,
        "database_url": dsn,
        "vma_url": vma_url,
        "vma_timeout": 3.0,
        # its own copy: approving an enrollment writes the new VMA's secret into this file, which
        # must not change what the next test's OMA signs with
        "vma_secret_file": own_secret_file(tmp_path),
        "admin_username": ADMIN_USER,
        "admin_password": ADMIN_PASSWORD,
        "db_pool_size": 5,
        # The API tests drive job states by hand against the VMA double; the engine is tested
        # against the real VMA in tests/e2e.
        "run_replications": False,
    }
    values.update(overrides)
    return OmaConfig(**values)


@asynccontextmanager
async def run_oma(config: OmaConfig) -> AsyncIterator[Oma]:
    """Serve the OMA on a free loopback port until the block exits (graceful shutdown)."""
    recent = RecentRecords(500)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(recent)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    app = create_app(config, recent_logs=recent)
    hc = HypercornConfig()
    hc.bind = [f"127.0.0.1:{config.port}"]  # 0 (make_config): a free port
    hc.accesslog = None
    hc.graceful_timeout = 5
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
            await serve(app, hc, shutdown_trigger=stop.wait, task_status=task_status)

        binds: list[str] = await nursery.start(run)
        async with httpx.AsyncClient(timeout=30) as client:
            oma = Oma(base_url=binds[0], config=config, client=client, extra={"app": app, "stop": stop})
            oma.token = await oma.login()
            try:
                yield oma
            finally:
                stop.set()
                root.removeHandler(recent)
                root.setLevel(old_level)
