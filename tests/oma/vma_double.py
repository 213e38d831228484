"""A TEST DOUBLE of the VMA API — not the VMA.

The real VMA (``vma/``) is not built yet; until it is, the OMA tests talk to this double over real
HTTP (quart-trio on hypercorn, loopback, free port). It speaks the VMA seed's JSON exactly for the
calls the OMA makes:

- ``GET /api/v1/health`` -> ``{"status", "timestamp", "uptime"}``;
- ``POST /api/v1/discover`` with ``{"vcenter", "username", "password", "datacenter", "filter"}`` ->
  ``{"vcenter": {"host", "datacenter"}, "vms": [{"id", "name", "path", "power_state", "guest_os",
  "memory_mb", "num_cpu"}]}`` — plus, per VM, the optional ``disks`` list the OMA documents as its
  one extension of that answer (docs/oma.md); ``filter`` is a case-insensitive substring of the
  VM name.
  A login other than the configured one answers 500 ``{"error", "code": "OPERATION_FAILED",
  "timestamp"}`` as the VMA does when vCenter refuses;
- ``GET /api/v1/progress/{job_id}`` -> the progress the test set for that job (fields documented
  in docs/oma.md), or 404 ``JOB_NOT_FOUND``.

Every request body is recorded so tests can check what the OMA sent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import jsonify, request
from quart_trio import QuartTrio


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class VmaDouble:
    vcenter_host: str = "vcsim.lab.local"
    datacenter: str = "LabDC"
    username: str = "administrator@vsphere.local"
    password: str = "vcenter-pass"
    vms: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    base_url: str = ""

    def add_vm(
        self, vm_id: str, name: str, *, power_state: str = "poweredOn", disks: int = 1
    ) -> dict[str, Any]:
        vm = {
            "id": vm_id,
            "name": name,
            "path": f"/{self.datacenter}/vm/{name}",
            "power_state": power_state,
            "guest_os": "debian12_64Guest",
            "memory_mb": 2048,
            "num_cpu": 2,
            "disks": [
                {"id": f"disk-{2000 + i}", "path": f"[ds1] {name}/{name}_{i}.vmdk", "capacity_bytes": 1 << 30}
                for i in range(disks)
            ],
        }
        self.vms.append(vm)
        return vm

    def app(self) -> QuartTrio:
        app = QuartTrio("vma_double")

        def error(status: int, code: str, message: str) -> Any:
            response = jsonify({"error": message, "code": code, "timestamp": _now()})
            response.status_code = status
            return response

        @app.get("/api/v1/health")
        async def health() -> Any:
            return {"status": "healthy", "timestamp": _now(), "uptime": "1s"}

        @app.post("/api/v1/discover")
        async def discover() -> Any:
            body = await request.get_json()
            self.requests.append(("POST", "/api/v1/discover", body))
            if not isinstance(body, dict) or not body.get("vcenter"):
                return error(400, "INVALID_REQUEST", "vcenter, username and password are required")
            if body.get("username") != self.username or body.get("password") != self.password:
                return error(500, "OPERATION_FAILED", f"vCenter {body['vcenter']} refused the login")
            wanted = str(body.get("filter") or "").lower()
            return {
                "vcenter": {"host": body["vcenter"], "datacenter": body.get("datacenter") or self.datacenter},
                "vms": [vm for vm in self.vms if wanted in vm["name"].lower()],
            }

        @app.get("/api/v1/progress/<job_id>")
        async def progress(job_id: str) -> Any:
            self.requests.append(("GET", f"/api/v1/progress/{job_id}", None))
            if job_id not in self.progress:
                return error(404, "JOB_NOT_FOUND", f"job {job_id} not found")
            return self.progress[job_id]

        return app


@asynccontextmanager
async def run_vma_double(double: VmaDouble | None = None) -> AsyncIterator[VmaDouble]:
    double = double or VmaDouble()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
            await serve(double.app(), config, shutdown_trigger=stop.wait, task_status=task_status)

        binds: list[str] = await nursery.start(run)
        double.base_url = binds[0]
        try:
            yield double
        finally:
            stop.set()
