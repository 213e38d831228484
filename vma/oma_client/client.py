"""The VMA's client of the OMA API (through the tunnel, ``http://localhost:8082``).

Authentication: ``POST /api/v1/auth/login`` with the appliance id and secret the OMA issued at
enrollment returns a bearer token and its lifetime (24 h). The client

- logs in lazily before the first request and again when the token is within
  ``renew_margin`` (5 minutes) of its expiry (proactive renewal; the lifetime is counted on this
  machine's monotonic clock from ``expires_in``, so clock skew between the appliances does not
  matter);
- after a 401 logs in again and retries the request once (never more: a second 401 is an error);
- while the OMA is unreachable (connection refused, timeout, 502/503/504) retries with
  exponential backoff (``backoff_initial`` doubling up to ``backoff_max``) until
  ``unreachable_deadline`` has passed, then raises :class:`OmaUnreachable`.

Calls used by the replication workflow: previous change ID, store change ID, replication update,
inventory push. The secret and the token are never logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import quote

import httpx
import trio

log = logging.getLogger(__name__)

RETRY_STATUSES = (502, 503, 504)


class OmaError(Exception):
    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class OmaUnreachable(OmaError):
    pass


class OmaAuthError(OmaError):
    pass


class OmaClient:
    def __init__(
        self,
        base_url: str,
        appliance_id: str,
        secret: str,
        *,
        timeout: float = 30.0,
        renew_margin: float = 300.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        unreachable_deadline: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.appliance_id = appliance_id
        self._secret = secret
        self.renew_margin = renew_margin
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.unreachable_deadline = unreachable_deadline
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)
        self._token: str | None = None
        self._expires_mono = 0.0
        self._lock = trio.Lock()
        self.logins = 0  # how many logins succeeded (for monitoring and tests)

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- transport with backoff ------------------------------------------------------------------

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried with exponential backoff while the OMA cannot be reached."""
        url = f"{self.base_url}{path}"
        deadline = time.monotonic() + self.unreachable_deadline
        delay = self.backoff_initial
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(method, url, **kwargs)
                if response.status_code not in RETRY_STATUSES:
                    return response
                problem = f"HTTP {response.status_code}"
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            left = deadline - time.monotonic()
            if left <= 0:
                raise OmaUnreachable(
                    f"OMA at {self.base_url} unreachable for {self.unreachable_deadline:.0f} s"
                    f" ({attempt} attempts; last: {problem})"
                )
            wait = min(delay, left)
            log.warning(
                "OMA unreachable, retrying in %.1f s: %s",
                wait,
                problem,
                extra={"action": "oma_backoff", "attempt": attempt, "path": path},
            )
            await trio.sleep(wait)
            delay = min(delay * 2, self.backoff_max)

    # -- authentication --------------------------------------------------------------------------

    def token_expires_in(self) -> float:
        return self._expires_mono - time.monotonic() if self._token else 0.0

    async def login(self) -> None:
        before = time.monotonic()
        response = await self._send(
            "POST", "/api/v1/auth/login", json={"username": self.appliance_id, "password": self._secret}
        )
        if response.status_code != 200:
            raise OmaAuthError(
                f"OMA refused the login of {self.appliance_id}: {_message(response)}",
                status=response.status_code,
                code=_code(response),
            )
        body = response.json()
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise OmaAuthError("OMA login answer carries no token")
        expires_in = body.get("expires_in")
        if not isinstance(expires_in, int | float):
            raise OmaAuthError("OMA login answer carries no expires_in")
        self._token = token
        self._expires_mono = before + float(expires_in)
        self.logins += 1
        log.info(
            "authenticated with OMA",
            extra={"action": "oma_login", "expires_at": body.get("expires_at"), "valid_seconds": expires_in},
        )

    async def _valid_token(self, *, force: bool = False, stale: str | None = None) -> str:
        async with self._lock:
            if force and self._token == stale:
                self._token = None  # another task may have renewed it meanwhile: then keep theirs
            if self._token is None or self.token_expires_in() <= self.renew_margin:
                if self._token is not None:
                    log.info("token expires soon, renewing", extra={"action": "oma_token_renew"})
                await self.login()
            assert self._token is not None
            return self._token

    async def request(self, method: str, path: str, *, json: Any = None, params: Any = None) -> Any:
        """An authenticated request; returns the JSON body or raises :class:`OmaError`."""
        token = await self._valid_token()
        response = await self._send(
            method, path, json=json, params=params, headers={"Authorization": f"Bearer {token}"}
        )
        if response.status_code == 401:
            log.warning(
                "received 401 Unauthorized, refreshing the token and retrying once",
                extra={"action": "oma_401", "path": path},
            )
            token = await self._valid_token(force=True, stale=token)
            response = await self._send(
                method, path, json=json, params=params, headers={"Authorization": f"Bearer {token}"}
            )
        if response.status_code >= 400:
            raise OmaError(
                f"OMA refused {method} {path}: {_message(response)}",
                status=response.status_code,
                code=_code(response),
            )
        try:
            return response.json()
        except ValueError as e:
            raise OmaError(f"OMA answered {method} {path} with a body that is not JSON") from e

    # -- the calls the VMA makes -----------------------------------------------------------------

    async def previous_change_id(self, vm_path: str, disk_id: str) -> str | None:
        body = await self.request(
            "GET", "/api/v1/replications/changeid", params={"vm_path": vm_path, "disk_id": disk_id}
        )
        change_id = body.get("change_id") if isinstance(body, dict) else None
        return change_id if isinstance(change_id, str) and change_id else None

    async def store_change_id(self, job_id: str, vm_path: str, disk_id: str, change_id: str) -> None:
        await self.request(
            "POST",
            f"/api/v1/replications/{quote(job_id, safe='')}/changeid",
            json={"disk_id": disk_id, "change_id": change_id, "vm_path": vm_path},
        )

    async def update_replication(self, job_id: str, **fields: Any) -> None:
        await self.request("PUT", f"/api/v1/replications/{quote(job_id, safe='')}", json=fields)

    async def submit_inventory(self, vcenter: str, datacenter: str, vms: list[dict[str, Any]]) -> None:
        await self.request(
            "POST",
            "/api/v1/vms/inventory",
            json={"vcenter": {"host": vcenter, "datacenter": datacenter}, "vms": vms},
        )


def _body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _message(response: httpx.Response) -> str:
    message = _body(response).get("error")
    return str(message) if message else f"HTTP {response.status_code}"


def _code(response: httpx.Response) -> str | None:
    code = _body(response).get("code")
    return str(code) if code else None
