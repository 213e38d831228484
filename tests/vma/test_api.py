"""The seed's endpoints over real HTTP: shapes, validation and the error envelope."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from pyapp.vma_auth import sign
from tests.vma.conftest import Vma, vma_config
from vma.api.health import format_uptime
from vma.app import create_app
from vma.replication.jobs import Job, JobConflict, JobNotFound, JobTracker
from vma.server import parse_args, serve_vma
from vma.state import VmaState
from vma.vsphere.client import VCenterLogin

ENVELOPE = {"error", "code", "timestamp"}


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= ENVELOPE, body
    assert body["code"] == code
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", body["timestamp"])


async def test_health_reports_real_uptime(api: Vma) -> None:
    first = (await api.get("/api/v1/health")).json()
    await trio.sleep(0.3)
    second = (await api.get("/api/v1/health")).json()
    assert first["status"] == second["status"] == "healthy"
    assert second["uptime_seconds"] >= first["uptime_seconds"] + 0.29
    assert re.match(r"^[0-9hm.]+s$|^\d+ms$", second["uptime"])


def test_uptime_format() -> None:
    assert format_uptime(0.000691) == "1ms"
    assert format_uptime(4.25) == "4.25s"
    assert format_uptime(3723.5) == "1h2m3.5s"
    assert format_uptime(60) == "1m0s"


async def test_config_put_and_validation(api: Vma) -> None:
    body = {"nbd_port": 10813, "export_name": "migration-repl-1", "target_device": "/dev/vdi"}
    r = await api.put("/api/v1/config", body)
    assert r.status_code == 200
    assert r.json()["status"] == "updated"
    assert {k: r.json()["config"][k] for k in body} == body
    assert (await api.get("/api/v1/config")).json()["config"]["nbd_port"] == 10813
    assert_error(await api.put("/api/v1/config", {"nbd_port": 0}), 400, "INVALID_REQUEST")
    assert_error(await api.put("/api/v1/config", {"nbd_port": "10813"}), 400, "INVALID_REQUEST")
    assert_error(await api.put("/api/v1/config", {"bogus": 1}), 400, "INVALID_REQUEST")
    assert_error(await api.put("/api/v1/config", []), 400, "INVALID_REQUEST")


async def test_unknown_job_is_job_not_found(api: Vma) -> None:
    assert_error(await api.get("/api/v1/status/repl-nope"), 404, "JOB_NOT_FOUND")
    assert_error(await api.get("/api/v1/progress/repl-nope"), 404, "JOB_NOT_FOUND")
    r = await api.post("/api/v1/cleanup", {"job_id": "repl-nope", "action": "delete_snapshot"})
    assert_error(r, 404, "JOB_NOT_FOUND")


def test_the_tracker_refuses_an_unfinished_job_id_and_names_an_unknown_one(tmp_path: Path) -> None:
    tracker = JobTracker()
    login = VCenterLogin("http://127.0.0.1:9/sdk", "u", "p")
    tracker.add(Job("repl-1", ["/DC0/vm/vm1"], login, "http://127.0.0.1:9", tmp_path / "repl-1"))
    with pytest.raises(JobConflict, match="job repl-1 is already pending"):
        tracker.add(Job("repl-1", ["/DC0/vm/vm1"], login, "http://127.0.0.1:9", tmp_path / "repl-1"))
    with pytest.raises(JobNotFound, match="job repl-2 not found"):
        tracker.get("repl-2")


async def test_a_job_id_that_has_not_finished_is_refused_in_the_envelope(tmp_path: Path) -> None:
    """The tracker's :class:`JobConflict` becomes the seed's 400 (through the app's test client:
    a job that stays pending needs its state at hand)."""
    config = vma_config(tmp_path, None, None)
    app = create_app(config)
    st = app.extensions["vma"]
    assert isinstance(st, VmaState)
    login = VCenterLogin("http://127.0.0.1:9/sdk", "u", "p")
    st.tracker.add(Job("repl-busy", ["/DC0/vm/vm1"], login, config.oma_url, config.work_dir / "repl-busy"))
    body = json.dumps(
        {
            "job_id": "repl-busy",
            "vcenter": "http://127.0.0.1:9/sdk",
            "username": "u",
            "password": "p",
            "vm_paths": ["/DC0/vm/vm1"],
            "targets": {"/DC0/vm/vm1": {"disk-2000": "nbd://127.0.0.1:1/x"}},
        }
    ).encode()
    path = "/api/v1/replicate"
    async with app.test_app() as test_app:
        r = await test_app.test_client().post(
            path,
            data=body,
            headers={
                "Content-Type": "application/json",
                "Authorization": sign(config.oma_secret(), "POST", path, "", body),
            },
        )
        answer = await r.get_json()
    assert r.status_code == 400, answer
    assert answer["code"] == "INVALID_REQUEST"
    assert answer["error"] == "job repl-busy is already pending"
    assert st.tracker.get("repl-busy").status == "pending"


async def test_request_validation(api: Vma) -> None:
    assert_error(
        await api.post("/api/v1/cleanup", {"job_id": "a b", "action": "delete_snapshot"}),
        400,
        "INVALID_REQUEST",
    )
    assert_error(
        await api.post("/api/v1/cleanup", {"job_id": "j1", "action": "format_disk"}), 400, "INVALID_REQUEST"
    )
    r = await api.http.post(
        f"{api.url}/api/v1/cleanup", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "INVALID_REQUEST")
    base = {"job_id": "j1", "vcenter": "vc", "username": "u", "password": "p", "vm_paths": ["/DC0/vm/vm1"]}
    assert_error(await api.post("/api/v1/replicate", {**base, "vm_paths": []}), 400, "INVALID_REQUEST")
    assert_error(await api.post("/api/v1/replicate", {**base, "vm_paths": ["vm1"]}), 400, "INVALID_REQUEST")
    assert_error(await api.post("/api/v1/replicate", {**base, "password": ""}), 400, "INVALID_REQUEST")
    # no target anywhere: neither targets nor PUT /config
    assert_error(await api.post("/api/v1/replicate", base), 400, "INVALID_REQUEST")
    bad_targets = {**base, "targets": {"/DC0/vm/other": {"0": "nbd://127.0.0.1:1/x"}}}
    assert_error(await api.post("/api/v1/replicate", bad_targets), 400, "INVALID_REQUEST")
    assert_error(await api.post("/api/v1/discover", {"vcenter": "vc"}), 400, "INVALID_REQUEST")
    assert_error(await api.get("/api/v1/nothing-here"), 404, "INVALID_REQUEST")


async def test_unknown_fields_are_refused_naming_them(api: Vma) -> None:
    base = {"job_id": "j1", "vcenter": "vc", "username": "u", "password": "p", "vm_paths": ["/DC0/vm/vm1"]}
    for path, body in (
        ("/api/v1/replicate", {**base, "targets": {}, "priority": 9}),
        ("/api/v1/cleanup", {"job_id": "j1", "action": "cleanup_all", "priority": 9}),
        ("/api/v1/discover", {"vcenter": "vc", "username": "u", "password": "p", "priority": 9}),
    ):
        r = await api.post(path, body)
        assert_error(r, 400, "INVALID_REQUEST")
        assert "unknown field: priority" in r.json()["error"], (path, r.text)


async def test_refused_bodies_never_500(api: Vma) -> None:
    def raw(body: bytes, content_type: str = "application/json") -> dict[str, Any]:
        return {"content": body, "headers": {"content-type": content_type}}

    url = f"{api.url}/api/v1/replicate"
    for body, status in (
        (b"[" * 10_000 + b"]" * 10_000, 400),  # was a RecursionError: 500
        (b'{"job_id": "j\\u0000", "vcenter": "vc"}', 400),
        (b'{"job_id": "j1", "export_timeout": 1e400}', 400),
        (b'{"job_id": "j1", "export_timeout": NaN}', 400),
        (b'{"job_id": "j1", "n": ' + str(1 << 80).encode() + b"}", 400),
        (b'{"a":"' + b"x" * (2 << 20) + b'"}', 413),
    ):
        r = await api.http.post(url, **raw(body))
        assert_error(r, status, "INVALID_REQUEST")
    r = await api.http.post(url, **raw(b"job_id=j1", "application/x-www-form-urlencoded"))
    assert_error(r, 415, "INVALID_REQUEST")
    r = await api.http.put(f"{api.url}/api/v1/config", **raw(b"nbd_port=1", "text/plain"))
    assert_error(r, 415, "INVALID_REQUEST")
    assert_error(await api.get("/api/v1/status/j%00"), 400, "INVALID_REQUEST")
    # found by schemathesis: a body not in UTF-8, a vCenter host name idna cannot encode (500 before)
    r = await api.http.post(f"{api.url}/api/v1/discover", **raw(b'{"vcenter": "\xef\xbb"}'))
    assert_error(r, 400, "INVALID_REQUEST")
    for host in ("0" * 70, "a..b", "vc host", "http://vc\u00e9/sdk"):
        r = await api.post("/api/v1/discover", {"vcenter": host, "username": "u", "password": "p"})
        assert_error(r, 400, "INVALID_REQUEST")
        assert "vcenter must be" in r.json()["error"]


async def test_vcenter_failure_is_502_not_500(api: Vma) -> None:
    body = {"vcenter": "http://127.0.0.1:9/sdk", "username": "u", "password": "p"}
    r = await api.post("/api/v1/discover", body)
    assert_error(r, 502, "OPERATION_FAILED")


async def test_openapi_documents_bodies_and_errors(api: Vma) -> None:
    r = await api.get("/api/v1/swagger/openapi.json")
    assert r.status_code == 200, r.text
    doc = r.json()
    replicate = doc["paths"]["/api/v1/replicate"]["post"]
    assert replicate["requestBody"]["content"]["application/json"]["schema"]
    for path in doc["paths"].values():
        for op in path.values():
            assert op["responses"]["400"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorEnvelope"
            }


def test_cli_accepts_seed_port_flag() -> None:
    assert parse_args(["-port", "8081"]).port == 8081
    assert parse_args(["--port", "0"]).port == 0


def test_cli_prints_bound_address(tmp_path: Path) -> None:
    config = tmp_path / "vma.json"
    config.write_text(json.dumps({"work_dir": str(tmp_path / "work"), "source": "file"}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vma.server", "--port", "0", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["event"] == "listening"
        r = httpx.get(f"{line['url']}/api/v1/health", timeout=10)
        assert r.json()["status"] == "healthy"
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    assert proc.stderr is not None
    logs = [json.loads(x) for x in proc.stderr.read().decode().splitlines() if x.startswith("{")]
    assert logs and all({"timestamp", "level", "message", "job_id", "action"} <= set(x) for x in logs)


async def test_serve_without_lab(tmp_path: Path, nursery: trio.Nursery) -> None:
    config = vma_config(tmp_path, None, None)
    url: str = await nursery.start(
        lambda task_status: serve_vma(config, handle_signals=False, task_status=task_status)
    )
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{url}/api/v1/health")).status_code == 200
    nursery.cancel_scope.cancel()
