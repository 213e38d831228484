"""Only the enrolled OMA may call the VMA: every route but ``/health`` wants its signature, targets
are NBD exports only, and the OMA the VMA reports to is configuration, not a request field."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from pyapp.vma_auth import sign
from tests.vma.conftest import Vma
from vma.app import create_app

ENVELOPE = {"error", "code", "timestamp"}
#: The routes anyone may call: the health check and Prometheus' scrape (docs/vma.md, "Metrics").
PUBLIC = ("/api/v1/health", "/metrics")


def routes(api: Vma) -> list[tuple[str, str]]:
    """(method, path) of every route of the VMA's app (its url_map), path parameters filled in."""
    app = create_app(api.config)
    out: list[tuple[str, str]] = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<job_id>", "repl-auth-1").replace("<vm_id>", "vm-1")
        assert "<" not in path, f"fill in the parameters of {rule.rule}"
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            out.append((method, path))
    assert len(out) >= 7, out  # health, cleanup, status, progress, config (GET, PUT), discover, replicate
    return out


def assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    body = r.json()
    assert set(body) >= ENVELOPE, body
    assert body["code"] == "UNAUTHORIZED"
    assert r.headers["WWW-Authenticate"] == "Mover-HMAC"


BODY = b'{"job_id": "repl-auth-1"}'
JSON_TYPE = {"Content-Type": "application/json"}


async def test_every_route_but_health_refuses_a_request_without_the_omas_signature(api: Vma) -> None:
    secret = api.config.oma_secret()
    assert secret
    async with httpx.AsyncClient(timeout=30) as http:
        for method, path in routes(api):
            url = f"{api.url}{path}"
            if path in PUBLIC:
                assert (await http.request(method, url)).status_code == 200
                continue
            content = BODY if method in ("POST", "PUT") else b""

            def signed(auth: str) -> dict[str, str]:
                return {**JSON_TYPE, "Authorization": auth}

            cases: dict[str, dict[str, str]] = {
                "none": JSON_TYPE,
                "bearer secret": signed(f"Bearer {secret}"),
                "malformed": signed("Mover-HMAC ts=1,nonce=zz,sig=00"),
                "other secret": signed(sign("not-the-secret", method, path, "", content)),
                "other method": signed(sign(secret, "DELETE", path, "", content)),
                "other path": signed(sign(secret, method, "/api/v1/health", "", content)),
                "other body": signed(sign(secret, method, path, "", content + b" ")),
                "expired": signed(sign(secret, method, path, "", content, now=time.time() - 3600)),
                "future": signed(sign(secret, method, path, "", content, now=time.time() + 3600)),
            }
            for name, headers in cases.items():
                r = await http.request(method, url, content=content, headers=headers)
                assert r.status_code == 401, (method, path, name, r.text)
                assert_401(r)
            # The right signature passes the check (whatever the route then answers).
            r = await http.request(
                method, url, content=content, headers=signed(sign(secret, method, path, "", content))
            )
            assert r.status_code != 401, (method, path, r.text)


async def test_a_signed_request_is_accepted_once(api: Vma) -> None:
    secret = api.config.oma_secret()
    path = "/api/v1/config"
    headers = {"Authorization": sign(secret, "GET", path, "", b"")}
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(f"{api.url}{path}", headers=headers)).status_code == 200
        assert_401(await http.get(f"{api.url}{path}", headers=headers))  # replayed


async def test_a_vma_without_an_enrollment_secret_accepts_nothing(api: Vma) -> None:
    assert api.config.oma_secret_file is not None
    api.config.oma_secret_file.write_text("")
    r = await api.get("/api/v1/config")
    assert_401(r)
    assert "no enrollment secret" in r.json()["error"]
    assert (await api.get("/api/v1/health")).status_code == 200


def _replicate(**fields: Any) -> dict[str, Any]:
    return {
        "job_id": "repl-auth-2",
        "vcenter": "https://vcenter.invalid/sdk",
        "username": "u",
        "password": "p",
        "vm_paths": ["/DC0/vm/vm1"],
        **fields,
    }


@pytest.mark.parametrize(
    "uri",
    [
        "/var/lib/vma/evil.raw",
        "/dev/sda",
        "file:///etc/passwd",
        "http://127.0.0.1:1/x",
        "nbds://127.0.0.1:1/x",
        "ssh://host/x",
        "relative/path.raw",
    ],
)
async def test_replicate_refuses_targets_that_are_not_nbd_exports(api: Vma, uri: str) -> None:
    for target in (uri, {"uri": uri, "base_change_id": None}):
        r = await api.post("/api/v1/replicate", _replicate(targets={"/DC0/vm/vm1": {"disk-2000": target}}))
        assert r.status_code == 422, r.text
        assert set(r.json()) >= ENVELOPE
        assert "NBD export" in r.json()["error"]


async def test_replicate_refuses_an_oma_url_field(api: Vma) -> None:
    body = _replicate(
        oma_url="http://attacker.invalid:8082", targets={"/DC0/vm/vm1": {"0": "nbd://127.0.0.1:1/x"}}
    )
    r = await api.post("/api/v1/replicate", body)
    assert r.status_code == 422, r.text
    assert set(r.json()) >= ENVELOPE
    assert "oma_url" in r.json()["error"]
    assert (await api.get("/api/v1/status/repl-auth-2")).status_code == 404  # nothing started
