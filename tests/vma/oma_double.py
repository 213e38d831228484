"""A TEST DOUBLE of the OMA API — not the OMA (that is ``oma/``, on its own branch).

Real HTTP (quart-trio on hypercorn, loopback) speaking the shapes of the OMA's calls the VMA makes
(read from the OMA's code: ``oma/api/auth.py``, ``oma/api/replications.py``, ``oma/api/vms.py``):

- ``POST /api/v1/auth/login`` ``{"username": <appliance id>, "password": <secret>}`` ->
  ``{"token", "token_type", "expires_at", "expires_in", "role"}``; tokens expire after ``ttl``
  seconds (short in tests), a wrong login answers 401;
- ``GET /api/v1/replications/changeid?vm_path=&disk_id=`` -> ``{"vm_path", "disk_id", "change_id"}``
  (``null``: no base). The double answers the last one stored for the path, as the seed's OMA
  did; the real OMA answers for the VM's current volume, and its engine sends each target's base
  in the replicate request, which the VMA uses instead (docs/vma.md);
- ``POST /api/v1/replications/{job_id}/changeid`` ``{"disk_id", "change_id", "vm_path"}`` -> 201
  (with ``volume_id`` and ``volume_generation``: null here, no volume of the double received it);
  refused (409) once the job is failed, as the OMA does;
- ``PUT /api/v1/replications/{job_id}`` -> the job's record (status, progress, error...);
- ``POST /api/v1/vms/inventory``.

Every call but login needs a valid bearer token, else 401. The test can make the next N requests
answer 401 (``fail_next_401``), revoke every token, and stop and restart the server on the same
port (the OMA "unreachable"). Every request is recorded in ``requests``.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart import Response, jsonify, request
from quart_trio import QuartTrio

from pyapp.nbd_export import free_tcp_port


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class OmaDouble:
    appliance_id: str = "vma-test-0001"
    secret: str = "s3cret-enrolled"
    ttl: float = 3600.0
    port: int = field(default_factory=free_tcp_port)
    tokens: dict[str, float] = field(default_factory=dict)  # token -> monotonic expiry
    change_ids: dict[tuple[str, str], str] = field(default_factory=dict)  # (vm_path, disk_id) -> id
    change_id_posts: list[dict[str, Any]] = field(default_factory=list)
    replications: dict[str, dict[str, Any]] = field(default_factory=dict)
    updates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    inventory: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # method, path, status
    logins: int = 0
    fail_next_401: int = 0
    _stop: trio.Event | None = None
    _stopped: trio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def revoke_all(self) -> None:
        self.tokens.clear()

    def app(self) -> QuartTrio:
        app = QuartTrio("oma_double")

        def error(status: int, code: str, message: str) -> Response:
            response = jsonify({"error": message, "code": code, "timestamp": _now()})
            response.status_code = status
            return response

        @app.after_request
        async def record(response: Response) -> Response:
            self.requests.append((request.method, request.path, response.status_code))
            return response

        @app.before_request
        async def authenticate() -> Response | None:
            if request.path == "/api/v1/auth/login":
                return None
            if self.fail_next_401 > 0:
                self.fail_next_401 -= 1
                return error(401, "UNAUTHORIZED", "invalid, expired or revoked token")
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            expiry = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            if expiry is None or expiry <= time.monotonic():
                return error(401, "UNAUTHORIZED", "invalid, expired or revoked token")
            return None

        @app.post("/api/v1/auth/login")
        async def login() -> Any:
            body = await request.get_json(silent=True) or {}
            if body.get("username") != self.appliance_id or body.get("password") != self.secret:
                return error(401, "UNAUTHORIZED", "invalid credentials")
            token = secrets.token_urlsafe(32)
            self.tokens[token] = time.monotonic() + self.ttl
            self.logins += 1
            expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.ttl)
            return {
                "token": token,
                "token_type": "Bearer",
                "expires_at": expires_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "expires_in": self.ttl,
                "role": "vma",
            }

        @app.get("/api/v1/replications/changeid")
        async def get_change_id() -> Any:
            vm_path, disk_id = request.args.get("vm_path"), request.args.get("disk_id")
            if not vm_path or not disk_id:
                return error(400, "INVALID_REQUEST", "vm_path and disk_id are required")
            return {
                "vm_path": vm_path,
                "disk_id": disk_id,
                "change_id": self.change_ids.get((vm_path, disk_id)),
            }

        @app.post("/api/v1/replications/<job_id>/changeid")
        async def store_change_id(job_id: str) -> Any:
            body = await request.get_json(silent=True) or {}
            job = self.replications.get(job_id, {})
            if job.get("status") in ("failed", "cancelled"):
                return error(409, "CONFLICT", f"job {job_id} is {job['status']}")
            if not body.get("disk_id") or not body.get("change_id"):
                return error(400, "INVALID_REQUEST", "disk_id and change_id are required")
            self.change_id_posts.append({"job_id": job_id, **body})
            self.change_ids[(body.get("vm_path", ""), body["disk_id"])] = body["change_id"]
            answer = {"job_id": job_id, **body, "volume_id": None, "volume_generation": None}
            return {**answer, "recorded_at": _now()}, 201

        @app.put("/api/v1/replications/<job_id>")
        async def update_replication(job_id: str) -> Any:
            body = await request.get_json(silent=True) or {}
            job = self.replications.setdefault(job_id, {"id": job_id, "status": "pending"})
            if job["status"] in ("completed", "failed", "cancelled"):
                return error(
                    409, "CONFLICT", f"job {job_id} is {job['status']}; a finished job cannot change"
                )
            self.updates.append((job_id, body))
            job.update({k: v for k, v in body.items() if v is not None})
            return job

        @app.post("/api/v1/vms/inventory")
        async def inventory() -> Any:
            body = await request.get_json(silent=True) or {}
            self.inventory.append(body)
            return {"received": len(body.get("vms", []))}

        return app

    async def serve(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        config = HypercornConfig()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        config.errorlog = None
        self._stop, self._stopped = trio.Event(), trio.Event()
        try:
            await serve(self.app(), config, shutdown_trigger=self._stop.wait, task_status=task_status)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        """Stop serving (the port refuses connections) until :meth:`serve` is started again."""
        assert self._stop is not None and self._stopped is not None
        self._stop.set()
        await self._stopped.wait()


@asynccontextmanager
async def run_oma_double(double: OmaDouble | None = None) -> AsyncIterator[OmaDouble]:
    double = double or OmaDouble()
    async with trio.open_nursery() as nursery:
        await nursery.start(double.serve)
        try:
            yield double
        finally:
            nursery.cancel_scope.cancel()
