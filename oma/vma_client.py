"""The OMA's HTTP client for the VMA API (reached through the tunnel, ``http://localhost:9081``).

Calls: ``POST /api/v1/discover`` (VMware inventory through the VMA, which holds the vCenter
connection), ``GET /api/v1/progress/{job_id}`` (live figures of a running job), and for the
replication engine ``POST /api/v1/replicate``, ``PUT /api/v1/config``, ``GET /api/v1/status/{job_id}``
and ``POST /api/v1/cleanup``; for the backup engine the same endpoints in ``"mode": "export"``
(:meth:`VmaClient.export`, :func:`exports_of`; see docs/backup.md, "The VMA's export job"); for
the failover engine ``POST /api/v1/vms/{vm_id}/power-off`` and ``power-on`` (:meth:`VmaClient.power_off`,
:meth:`VmaClient.power_on`; docs/vma.md, "Additions to the seed").
Every call has a timeout. Failures are told apart for the operator:

- :class:`VmaUnreachable`: no answer (connection refused, DNS, timeout) — the tunnel or the VMA is
  down;
- :class:`VmaRequestFailed`: the VMA answered with an error (its ``{"error","code"}`` envelope is
  carried through), e.g. vCenter refused the credentials;
- :class:`VmaJobNotFound`: the VMA does not know the job (404);
- :class:`VmaVmNotFound`: vCenter has no VM with that id (404 ``VM_NOT_FOUND``);
- :class:`VmaVmBusy`: jobs of the VMA work on the VM, so it refused to power it off (409
  ``VM_BUSY``; ``active_jobs`` names them).

Every request is signed with the enrolled VMA's secret (``Authorization: Mover-HMAC``,
pyapp/vma_auth.py; docs/vma.md, "Who may call the VMA"). The vCenter password travels in the
request body only; it is never logged (httpx logs URLs only
and its logger is kept at WARNING).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pyapp.vma_auth import SecretFile, SignedAuth

log = logging.getLogger(__name__)
#: Seconds a power call may take beyond the guest's shutdown: vCenter's power task.
POWER_TASK_WAIT = 300.0
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)


class VmaError(Exception):
    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class VmaUnreachable(VmaError):
    pass


class VmaRequestFailed(VmaError):
    pass


class VmaJobNotFound(VmaError):
    pass


class VmaVmNotFound(VmaError):
    """vCenter has no VM with the id a power call named."""


class VmaVmBusy(VmaRequestFailed):
    """The VMA refused to power a VM off while its jobs ``active_jobs`` work on it."""

    def __init__(self, message: str, active_jobs: list[str], *, code: str | None, status: int) -> None:
        super().__init__(message, code=code, status=status)
        self.active_jobs = active_jobs


class PowerResult(BaseModel):
    """The VMA's answer to a power call. ``outcome``: ``already_off``, ``guest_shutdown`` (the guest
    shut down through VMware Tools), ``forced`` (``PowerOffVM_Task``), ``already_on``,
    ``powered_on``."""

    model_config = ConfigDict(extra="allow")
    vm_id: str
    name: str
    action: Literal["power_off", "power_on"]
    outcome: Literal["already_off", "guest_shutdown", "forced", "already_on", "powered_on"]
    previous_power_state: str
    power_state: str
    tools_running: bool
    guest_shutdown_attempted: bool
    elapsed_seconds: float
    message: str


class DiscoveredVM(BaseModel):
    """One VM of the VMA's discover answer (the VMA seed's fields; extra fields are kept)."""

    model_config = ConfigDict(extra="allow")
    id: str
    name: str
    path: str
    power_state: str | None = None
    guest_os: str | None = None
    memory_mb: int | None = None
    num_cpu: int | None = None
    disks: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []


class DiscoveredVCenter(BaseModel):
    model_config = ConfigDict(extra="allow")
    host: str
    datacenter: str = ""


class DiscoverResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    vcenter: DiscoveredVCenter
    vms: list[DiscoveredVM]


class ExportedDisk(BaseModel):
    """One disk served by a VMA export job (``exports`` of its ``/status`` once ``phase`` is
    ``"exported"``). ``extents`` are ``(offset, length)`` pairs: the allocated areas (``full``), the
    changed areas since the change ID the OMA sent (``incremental``), or ``None``
    (``full-cbt-reset``: the reader asks the export's own allocation map)."""

    model_config = ConfigDict(extra="allow")
    vm_path: str
    disk_id: str
    uri: str = Field(min_length=1)
    capacity: int = Field(ge=0)
    mode: Literal["full", "incremental", "full-cbt-reset"]
    change_id: str | None = None
    extents: list[tuple[int, int]] | None = None


def exports_of(status: dict[str, Any]) -> list[ExportedDisk]:
    """The exports of an export job's ``/status`` answer (empty before ``phase`` is ``"exported"``).
    Raises :class:`VmaRequestFailed` when they do not match the contract."""
    raw = status.get("exports")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise VmaRequestFailed("VMA status answer: exports is not a list")
    try:
        return [ExportedDisk.model_validate(item) for item in raw]
    except ValidationError as exc:
        raise VmaRequestFailed(
            f"VMA export description does not match the contract: {exc.error_count()} errors"
            f" ({exc.errors(include_url=False, include_input=False)[0]['msg']})"
        ) from exc


def tls_fields(tls_mode: str, tls_thumbprint: str) -> dict[str, str]:
    """How the VMA checks vCenter's certificate, sent with the login (the credential's
    ``tls_mode``; ``tls_thumbprint`` only with ``thumbprint``)."""
    return {"tls_mode": tls_mode, **({"tls_thumbprint": tls_thumbprint} if tls_thumbprint else {})}


def login_fields(
    vcenter: str, username: str, password: str, tls_mode: str, tls_thumbprint: str
) -> dict[str, str]:
    """A vCenter login as the VMA's calls take it (``/discover``, the power calls)."""
    login = {"vcenter": vcenter, "username": username, "password": password}
    return {**login, **tls_fields(tls_mode, tls_thumbprint)}


class VmaClient:
    """``secret_file``: the enrolled VMA's secret (``OMA_VMA_SECRET_FILE``), re-read when it
    changes; every request is signed with it (pyapp/vma_auth.py). Without it the VMA answers 401."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, secret_file: Path | None = None) -> None:
        self._http = http
        self.base_url = base_url.rstrip("/")
        self._auth = SignedAuth(SecretFile(secret_file).read)

    async def _request(self, method: str, path: str, json: Any = None, *, wait_s: float | None = None) -> Any:
        url = f"{self.base_url}{path}"
        try:
            if wait_s is None:
                response = await self._http.request(method, url, json=json, auth=self._auth)
            else:
                response = await self._http.request(method, url, json=json, auth=self._auth, timeout=wait_s)
        except httpx.TimeoutException as exc:
            raise VmaUnreachable(
                f"VMA at {self.base_url} did not answer in time ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise VmaUnreachable(
                f"VMA at {self.base_url} is unreachable: {exc or type(exc).__name__}"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            message = body.get("error") if isinstance(body, dict) else None
            code = body.get("code") if isinstance(body, dict) else None
            text = message or f"HTTP {response.status_code}"
            if response.status_code == 404:
                if code == "VM_NOT_FOUND":
                    raise VmaVmNotFound(text, code=code, status=404)
                raise VmaJobNotFound(text, code=code, status=404)
            if response.status_code == 409 and code == "VM_BUSY":
                jobs = body.get("active_jobs") if isinstance(body, dict) else None
                active = [str(j) for j in jobs] if isinstance(jobs, list) else []
                raise VmaVmBusy(f"VMA refused {method} {path}: {text}", active, code=code, status=409)
            if response.status_code == 401:
                text += " (the OMA signs its VMA requests with the secret in OMA_VMA_SECRET_FILE)"
            raise VmaRequestFailed(
                f"VMA refused {method} {path}: {text}", code=code, status=response.status_code
            )
        if body is None:
            raise VmaRequestFailed(f"VMA answered {method} {path} with a body that is not JSON")
        return body

    async def discover(
        self,
        *,
        vcenter: str,
        username: str,
        password: str,
        datacenter: str,
        filter: str = "",
        tls_mode: str = "verify",
        tls_thumbprint: str = "",
    ) -> DiscoverResult:
        payload = {
            "vcenter": vcenter,
            "username": username,
            "password": password,
            **tls_fields(tls_mode, tls_thumbprint),
            "datacenter": datacenter,
            "filter": filter,
        }
        body = await self._request("POST", "/api/v1/discover", payload)
        try:
            return DiscoverResult.model_validate(body)
        except ValidationError as exc:
            raise VmaRequestFailed(
                f"VMA discover answer does not match the contract: {exc.error_count()} errors"
            ) from exc

    async def progress(self, job_id: str) -> dict[str, Any]:
        body = await self._request("GET", f"/api/v1/progress/{quote(job_id, safe='')}")
        if not isinstance(body, dict):
            raise VmaRequestFailed("VMA progress answer is not a JSON object")
        return body

    async def replicate(
        self,
        *,
        job_id: str,
        vcenter: str,
        username: str,
        password: str,
        vm_paths: list[str],
        targets: dict[str, dict[str, str]],
        bases: dict[str, dict[str, str | None]],
        vm_ids: dict[str, str] | None = None,
        tls_mode: str = "verify",
        tls_thumbprint: str = "",
    ) -> dict[str, Any]:
        """Start a job on the VMA: ``targets`` maps vm_path -> disk id -> NBD URI of its target,
        ``bases`` vm_path -> disk id -> the change ID the target volume holds (None: a full pass);
        each disk goes as ``{"uri", "base_change_id"}`` (docs/vma.md). ``vm_ids``: vm_path -> the
        managed object id the job was made for (the VMA refuses another VM at that path).
        ``oma_url`` is not sent: the VMA reports to the OMA of its own configuration and refuses
        the field (422); the parameter stays for callers that still pass it."""
        payload: dict[str, Any] = {
            "job_id": job_id,
            "vcenter": vcenter,
            "username": username,
            "password": password,
            **tls_fields(tls_mode, tls_thumbprint),
            "vm_paths": vm_paths,
            "targets": {
                vm_path: {
                    disk_id: {"uri": uri, "base_change_id": bases.get(vm_path, {}).get(disk_id)}
                    for disk_id, uri in per_vm.items()
                }
                for vm_path, per_vm in targets.items()
            },
        }
        if vm_ids:
            payload["vm_ids"] = vm_ids
        body = await self._request("POST", "/api/v1/replicate", payload)
        if not isinstance(body, dict) or body.get("status") != "started":
            raise VmaRequestFailed(f"VMA did not start job {job_id}: {body!r}"[:500])
        return body

    async def export(
        self,
        *,
        job_id: str,
        vcenter: str,
        username: str,
        password: str,
        disks: dict[str, list[str]],
        previous_change_ids: dict[str, dict[str, str | None]],
        export_timeout: float | None = None,
        tls_mode: str = "verify",
        tls_thumbprint: str = "",
    ) -> dict[str, Any]:
        """Start an export job (``POST /api/v1/replicate``, ``"mode": "export"``): the VMA snapshots
        each VM of ``disks`` (vm_path -> disk ids) and serves those disks read-only over NBD, with
        the changed areas since ``previous_change_ids`` (vm_path -> disk id -> change ID, None for a
        full pass). It never calls the OMA back: follow it with :meth:`status` and release it with
        :meth:`cleanup`."""
        payload: dict[str, Any] = {
            "job_id": job_id,
            "mode": "export",
            "vcenter": vcenter,
            "username": username,
            "password": password,
            **tls_fields(tls_mode, tls_thumbprint),
            "vm_paths": list(disks),
            "disks": disks,
            "previous_change_ids": previous_change_ids,
        }
        if export_timeout is not None:
            payload["export_timeout"] = export_timeout
        body = await self._request("POST", "/api/v1/replicate", payload)
        if not isinstance(body, dict) or body.get("status") != "started":
            raise VmaRequestFailed(f"VMA did not start export job {job_id}: {body!r}"[:500])
        return body

    async def put_config(self, *, nbd_port: int, export_name: str, target_device: str) -> dict[str, Any]:
        """The seed's dynamic allocation (``PUT /api/v1/config``): the target of a single-disk job."""
        body = await self._request(
            "PUT",
            "/api/v1/config",
            {"nbd_port": nbd_port, "export_name": export_name, "target_device": target_device},
        )
        if not isinstance(body, dict):
            raise VmaRequestFailed("VMA config answer is not a JSON object")
        return body

    async def status(self, job_id: str) -> dict[str, Any]:
        body = await self._request("GET", f"/api/v1/status/{quote(job_id, safe='')}")
        if not isinstance(body, dict):
            raise VmaRequestFailed("VMA status answer is not a JSON object")
        return body

    async def cleanup(
        self, job_id: str, action: str = "cleanup_all", *, wait_s: float = 120.0
    ) -> dict[str, Any]:
        """Stop the VMA's job (if it runs) and remove its snapshot (``delete_snapshot``) or all its
        artifacts (``cleanup_all``). Stopping a copy takes a while: its own, longer timeout."""
        body = await self._request(
            "POST", "/api/v1/cleanup", {"job_id": job_id, "action": action}, wait_s=wait_s
        )
        if not isinstance(body, dict):
            raise VmaRequestFailed("VMA cleanup answer is not a JSON object")
        return body

    async def _power(self, vm_id: str, action: str, payload: dict[str, Any], wait_s: float) -> PowerResult:
        path = f"/api/v1/vms/{quote(vm_id, safe='')}/{action}"
        try:
            body = await self._request("POST", path, payload, wait_s=wait_s)
        except VmaJobNotFound as exc:  # a 404 that is not VM_NOT_FOUND: no such endpoint
            raise VmaRequestFailed(
                f"VMA refused POST {path}: {exc.message} (a VMA without the power endpoints?)",
                code=exc.code,
                status=exc.status,
            ) from exc
        try:
            return PowerResult.model_validate(body)
        except ValidationError as exc:
            raise VmaRequestFailed(
                f"VMA {action} answer does not match the contract: {exc.error_count()} errors"
            ) from exc

    async def power_off(
        self,
        vm_id: str,
        *,
        vcenter: str,
        username: str,
        password: str,
        force: bool = True,
        shutdown_timeout: float = 120.0,
        final_pass: bool = False,
        tls_mode: str = "verify",
        tls_thumbprint: str = "",
        wait_s: float | None = None,
    ) -> PowerResult:
        """Power the VM ``vm_id`` (its managed object id) off: a guest shutdown when VMware Tools
        run, waited for up to ``shutdown_timeout`` s, then ``PowerOffVM_Task`` if ``force``. A VM
        already off is a success (``outcome`` ``already_off``): retry freely. ``final_pass``: the
        caller is a live failover whose final pass follows, so the VMA's active jobs on the VM do
        not refuse it (else :class:`VmaVmBusy`). The request waits ``shutdown_timeout`` plus the
        power task: ``wait_s`` defaults to that plus 300 s."""
        payload = {
            **login_fields(vcenter, username, password, tls_mode, tls_thumbprint),
            "force": force,
            "shutdown_timeout": shutdown_timeout,
            "final_pass": final_pass,
        }
        return await self._power(
            vm_id, "power-off", payload, wait_s if wait_s is not None else shutdown_timeout + POWER_TASK_WAIT
        )

    async def power_on(
        self,
        vm_id: str,
        *,
        vcenter: str,
        username: str,
        password: str,
        tls_mode: str = "verify",
        tls_thumbprint: str = "",
        wait_s: float = POWER_TASK_WAIT,
    ) -> PowerResult:
        """Power the VM ``vm_id`` on (a live failover's rollback); a VM already on is a success
        (``outcome`` ``already_on``)."""
        payload = login_fields(vcenter, username, password, tls_mode, tls_thumbprint)
        return await self._power(vm_id, "power-on", payload, wait_s)
