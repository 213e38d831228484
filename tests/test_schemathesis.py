"""Schemathesis against the OpenAPI documents both services serve: no request it makes may be
answered with a server error, and every answer must conform to the document (declared status,
content type and body schema — the error envelope is declared for every operation).

The services run in this process on loopback (the OMA on its own PostgreSQL database with the VMA
double behind it, the VMA without a vCenter); schemathesis runs as its command line against them
with a bounded number of examples and a time budget (examples, coverage, fuzzing and stateful
phases; the stateful phase runs where schemathesis finds links between operations).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from pyapp.vma_auth import sign
from tests.oma.oma_harness import Oma
from tests.vma.conftest import vma_config
from vma.api.errors import OPENAPI_PATH as VMA_OPENAPI_PATH
from vma.server import serve_vma

pytestmark = pytest.mark.slow

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
# A 5xx is a server error, except the two the documents declare for a peer that failed: 502 (the
# VMA, vCenter) and 503 (a repository, the database). A fuzzer's vCenter host names are refused
# by no vCenter, so discovery answers 502; a 500 or a 504 always fails the run.
CONFIG = """
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "502", "503"]
"""


def schemathesis_command() -> list[str]:
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(exe).exists():
        raise AssertionError("schemathesis is not installed (pip install -e '.[dev]')")
    return [exe]


async def run_schemathesis(
    schema_url: str,
    tmp_path: Path,
    *,
    headers: dict[str, str],
    max_examples: int,
    max_time: int,
    exclude: str | None = None,
) -> None:
    reports = tmp_path / "schemathesis"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [
        *schemathesis_command(),
        "--config-file",
        str(config),
        "run",
        schema_url,
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(max_examples),
        "--max-time",
        str(max_time),
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-shrink",
        "--continue-on-failure",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(reports),
        "--warnings",
        "off",
    ]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    if exclude:
        cmd += ["--exclude-name-regex", exclude]
    # in tmp_path: schemathesis keeps its example cache (.schemathesis/) in its working directory
    result = await trio.run_process(cmd, cwd=tmp_path, capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    (reports / "output.txt").write_text(out)
    assert "Server error" not in out, out[-20000:]
    assert result.returncode == 0, out[-20000:]
    # it did test something: operations were run, not skipped for want of a schema
    assert "passed" in out.lower(), out[-5000:]


# Operations that would lock the run's own administrator out (log out, revoke its token, disable
# or delete it, reset its password): every later request would be a 401 and test nothing.
SELF_LOCKOUT = (
    r"^(POST /api/v1/auth/logout|DELETE /api/v1/auth/tokens/|PUT /api/v1/users/"
    r"|DELETE /api/v1/users/|POST /api/v1/users/\{user_id\}/password)"
)


async def test_oma_openapi_has_no_server_errors(oma_service: Oma, tmp_path: Path) -> None:
    await run_schemathesis(
        oma_service.url("/swagger/openapi.json"),
        tmp_path,
        headers=oma_service.auth,
        max_examples=8,
        max_time=100,
        exclude=SELF_LOCKOUT,
    )
    # the run kept its principal to the end: its requests were not all refused with 401
    r = await oma_service.get("/vms")
    assert r.status_code == 200, r.text


#: The enrollment secret of a VMA configured without an OMA (tests/vma/conftest.py vma_config).
VMA_SECRET = "none"
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "authorization"}

Asgi = Callable[
    [dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


def signing_proxy(upstream: str, secret: str, http: httpx.AsyncClient) -> Asgi:
    """An ASGI app that forwards every request to ``upstream`` signed as the enrolled OMA signs
    it (the VMA refuses anything else): schemathesis's requests reach the VMA's handlers."""

    async def app(
        scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope["query_string"].decode("latin-1")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        forwarded = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        forwarded.append(("Authorization", sign(secret, scope["method"], scope["path"], query, body)))
        target = scope["raw_path"].decode("latin-1") + (f"?{query}" if query else "")
        answer = await http.request(scope["method"], f"{upstream}{target}", content=body, headers=forwarded)
        out = [(k.encode(), v.encode()) for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP]
        out.append((b"content-length", str(len(answer.content)).encode()))
        await send({"type": "http.response.start", "status": answer.status_code, "headers": out})
        await send({"type": "http.response.body", "body": answer.content})

    return app


async def test_vma_openapi_has_no_server_errors(tmp_path: Path, nursery: trio.Nursery) -> None:
    config = vma_config(tmp_path, None, None)
    url: str = await nursery.start(
        lambda task_status: serve_vma(config, handle_signals=False, task_status=task_status)
    )
    async with httpx.AsyncClient(timeout=60) as http:
        proxy = HypercornConfig()
        proxy.bind = ["127.0.0.1:0"]
        proxy.accesslog = None
        bound: list[str] = await nursery.start(
            lambda task_status: serve(signing_proxy(url, VMA_SECRET, http), proxy, task_status=task_status)  # type: ignore[arg-type]
        )
        # through the proxy a request reaches the handlers: an unknown job, not a refused signature
        probe = await http.get(f"{bound[0]}/api/v1/status/no-such-job")
        assert probe.status_code == 404 and probe.json()["code"] == "JOB_NOT_FOUND", probe.text
        await run_schemathesis(
            f"{bound[0]}{VMA_OPENAPI_PATH}", tmp_path, headers={}, max_examples=8, max_time=30
        )
