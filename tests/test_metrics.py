"""``/metrics`` on both services (pyapp/metrics.py): who may scrape it, what it holds, and the
OMA's worker processes adding up into one answer."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from oma.app import metrics_without_token
from pyapp import mover
from tests.oma.oma_harness import Oma, make_config, run_oma
from tests.oma.vma_double import run_vma_double
from vma.app import create_app as create_vma_app
from vma.config import VmaConfig


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with ``labels`` (a subset) in a text exposition."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


async def scrape(oma: Oma, **kw: object) -> httpx.Response:
    return await oma.client.get(f"{oma.base_url}/metrics", **kw)  # type: ignore[arg-type]


async def test_oma_metrics_from_loopback_without_a_token(oma_service: Oma) -> None:
    assert (await oma_service.client.get(oma_service.url("/health"))).status_code in (200, 503)
    template = "/api/v1/replications/<job_id>"
    # the registry is the process's: earlier tests in this process may have counted this route
    before = sample((await scrape(oma_service)).text, "mover_api_request_duration_seconds_count",
                    route=template, status="404") or 0  # fmt: skip
    missing = await oma_service.client.get(
        oma_service.url("/replications/no-such-job"), headers=oma_service.auth
    )
    assert missing.status_code == 404
    with trio.fail_after(10):  # the pool sampler runs once a second
        while True:
            r = await scrape(oma_service)
            assert r.status_code == 200, r.text
            if (sample(r.text, "mover_db_pool_connections", state="size") or 0) > 0:
                break
            await trio.sleep(0.2)
    assert r.headers["content-type"].startswith("text/plain; version=")
    text = r.text
    # API latency by route template (never the raw path), method and status
    assert (sample(text, "mover_api_request_duration_seconds_count", route="/api/v1/health") or 0) >= 1
    after = sample(text, "mover_api_request_duration_seconds_count", route=template, status="404")
    assert after == before + 1
    assert "no-such-job" not in text
    assert (sample(text, "mover_db_pool_connections", state="max") or 0) >= 5
    for name in (
        "mover_active_jobs",
        "mover_job_results_total",
        "mover_bytes_moved_total",
        "mover_pass_seconds",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name


async def test_oma_metrics_behind_a_token(tmp_path: Path, oma_dsn: str) -> None:
    async with run_vma_double() as double:
        config = make_config(tmp_path, oma_dsn, double.base_url, metrics_access="token")
        async with run_oma(config) as oma:
            refused = await scrape(oma)
            assert refused.status_code == 401 and refused.json()["code"] == "UNAUTHORIZED"
            r = await oma.post(
                "/users", json={"username": "prom", "password": "scrape-password", "role": "viewer"}
            )
            assert r.status_code == 201, r.text
            viewer = await oma.login("prom", "scrape-password")
            ok = await scrape(oma, headers={"Authorization": f"Bearer {viewer}"})
            assert ok.status_code == 200 and "mover_api_request_duration_seconds" in ok.text


@pytest.mark.parametrize(
    ("access", "addr", "allowed"),
    [
        ("loopback", "127.0.0.1", True),
        ("loopback", "::1", True),
        ("loopback", "10.0.0.5", False),
        ("loopback", None, False),
        ("public", "10.0.0.5", True),
        ("token", "127.0.0.1", False),
    ],
)
def test_who_reads_metrics_without_a_token(access: str, addr: str | None, allowed: bool) -> None:
    assert metrics_without_token(access, addr) is allowed


def test_metrics_public_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from oma.config import OmaConfig
    from pyapp.config import ConfigError

    monkeypatch.setenv("OMA_DATA_DIR", "/tmp/x")
    for value, access in (("loopback", "loopback"), ("1", "public"), ("0", "token")):
        monkeypatch.setenv("OMA_METRICS_PUBLIC", value)
        assert OmaConfig.from_env().metrics_access == access
    monkeypatch.setenv("OMA_METRICS_PUBLIC", "sometimes")
    with pytest.raises(ConfigError, match="OMA_METRICS_PUBLIC"):
        OmaConfig.from_env()


async def test_vma_metrics_need_no_signature(tmp_path: Path) -> None:
    app = create_vma_app(VmaConfig(work_dir=tmp_path / "work"))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        r = await client.get("/metrics")
        assert r.status_code == 200
        text = await r.get_data(as_text=True)
        assert "# TYPE mover_copy_bytes" in text
        # the signed API still refuses an unsigned call, and that refusal is timed too
        assert (await client.get("/api/v1/status/repl-x")).status_code == 401
        text = await (await client.get("/metrics")).get_data(as_text=True)
        assert (
            sample(
                text,
                "mover_api_request_duration_seconds_count",
                route="/api/v1/status/<job_id>",
                status="401",
            )
            or 0
        ) >= 1


async def test_a_copy_counts_its_bytes_and_throughput(tmp_path: Path) -> None:
    source, target = tmp_path / "src.raw", tmp_path / "dst.raw"
    with source.open("wb") as f:
        f.write(os.urandom(3 << 20))
        f.truncate(8 << 20)  # 3 MiB of data, then a hole
    target.write_bytes(b"")
    os.truncate(target, 8 << 20)
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("mover_copy_bytes_total", {"how": "data"}) or 0.0
    copies_before = REGISTRY.get_sample_value("mover_copy_throughput_bytes_per_second_count") or 0.0
    result = await mover.copy(str(source), str(target), write_manifest=False)
    after = REGISTRY.get_sample_value("mover_copy_bytes_total", {"how": "data"})
    assert after == before + result.bytes_written and result.bytes_written >= 3 << 20
    assert REGISTRY.get_sample_value("mover_copy_throughput_bytes_per_second_count") == copies_before + 1
    assert REGISTRY.get_sample_value("mover_active_copies") == 0


async def test_worker_processes_add_up(tmp_path: Path, oma_dsn: str) -> None:
    await trio.to_thread.run_sync(scrape_workers, tmp_path, oma_dsn)


def scrape_workers(tmp_path: Path, oma_dsn: str) -> None:
    """``--workers 2``: any worker's /metrics counts the requests every worker served."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMA_") and k != "DATABASE_URL"}
    env |= {
        "OMA_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": oma_dsn,
        "OMA_REPLICATION_ENGINE": "0",
        "OMA_BACKUP_ENGINE": "0",
    }
    oma = Path(sys.executable).with_name("oma-api-server")
    proc = subprocess.Popen(
        [str(oma), "--host", "127.0.0.1", "--port", "0", "--workers", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.match(r"OMA listening on (http://\S+)", line)
        assert found, line + (proc.stderr.read() if proc.stderr else "")
        url = found[1]
        for _ in range(20):  # new connections: the kernel spreads them over the workers
            assert httpx.get(f"{url}/api/v1/health", timeout=10).status_code in (200, 503)
        for _ in range(4):
            text = httpx.get(f"{url}/metrics", timeout=10).text
            count = sample(text, "mover_api_request_duration_seconds_count", route="/api/v1/health")
            assert count is not None and count >= 20, text
            size = sample(text, "mover_db_pool_connections", state="max")
            assert size is not None and size > 0
        assert list((tmp_path / "data" / "run" / "metrics").glob("*.db"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
