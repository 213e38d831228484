"""An OMA restart keeps every record; the CLI with an embedded PostgreSQL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import trio
from oma_harness import ADMIN_PASSWORD, ADMIN_USER, make_config, run_oma
from test_oma_credentials import cred_body
from test_oma_enrollment import enrolled_vma
from vma_double import VmaDouble

from pyapp.db import open_database

REPO = Path(__file__).resolve().parents[2]


async def test_restart_keeps_every_record(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> None:
    config = make_config(tmp_path, oma_dsn, vma.base_url)
    async with run_oma(config) as oma:
        cred = (await oma.post("/vmware-credentials", json=cred_body(vma, is_default=True))).json()
        vma.add_vm("vm-1", "keep01")
        await oma.post("/discovery/add-vms", json={"vm_names": ["keep01"]})
        job = (
            await oma.post(
                "/replications",
                json={"source_vm": {"id": "vm-1", "name": "keep01", "path": "/LabDC/vm/keep01"}},
            )
        ).json()
        await oma.put(f"/replications/{job['id']}", json={"status": "replicating"})
        await oma.post(
            f"/replications/{job['id']}/changeid", json={"disk_id": "disk-2000", "change_id": "cid-1"}
        )
        _, enrollment_id, appliance_id, secret = await enrolled_vma(oma)
        # approval hands the OMA the new VMA's secret to sign with: the double is that VMA now
        assert config.vma_secret_file is not None and config.vma_secret_file.read_text().strip() == secret
        vma.secret = secret
        vma_token = await oma.login(appliance_id, secret)
        admin_token = oma.token
        before = {
            p: (await oma.get(p)).json()
            for p in ("/replications", "/vm-contexts", "/vms", "/vmware-credentials", "/admin/vma/active")
        }

    async with run_oma(config) as oma:
        for path, body in before.items():
            assert (await oma.get(path)).json() == body, path
        # tokens survive the restart (they live in the database)
        assert (
            await oma.get("/replications", headers={"Authorization": f"Bearer {admin_token}"})
        ).status_code == 200
        assert (
            await oma.get("/replications", headers={"Authorization": f"Bearer {vma_token}"})
        ).status_code == 200
        # the key file survived too: the stored password still decrypts and works
        r = await oma.post(f"/vmware-credentials/{cred['id']}/test")
        assert r.json()["success"] is True
        q = "/replications/changeid?vm_path=/LabDC/vm/keep01&disk_id=disk-2000"
        assert (await oma.get(q)).json()["change_id"] == "cid-1"
        assert await oma.login(appliance_id, secret)
        assert enrollment_id


async def start_oma_process(cmd: list[str], env: dict[str, str]) -> tuple[trio.Process, str]:
    """Start ``oma-api-server`` and wait for the address it prints once ready."""
    proc = await trio.lowlevel.open_process(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(1)
        assert chunk, f"the OMA exited before listening (output so far: {line!r})"
        line += chunk
    text = line.decode()
    assert text.startswith("OMA listening on "), text
    return proc, text.split()[-1]


async def stop_oma_process(proc: trio.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(60):
        return await proc.wait()


def server_command(data_dir: Path, *extra: str) -> list[str]:
    """``oma-api-server`` on any free loopback port, with ``data_dir``."""
    return [
        sys.executable,
        *("-m", "oma.server", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir)),
        *extra,
    ]


@pytest.mark.slow
async def test_cli_embedded_postgres_port_zero_and_restart() -> None:
    # not under pytest's 0700 tmp dir: as root, pgserver runs PostgreSQL as its own user
    data_dir = Path(tempfile.mkdtemp(prefix="oma-cli-"))
    env = {
        **os.environ,
        "OMA_ADMIN_USERNAME": ADMIN_USER,
        "OMA_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "PYTHONPATH": str(REPO),
    }
    env.pop("DATABASE_URL", None)
    cmd = server_command(data_dir)
    try:
        job_id = None
        for round_ in range(2):
            with trio.fail_after(60):
                proc, base = await start_oma_process(cmd, env)
            try:
                async with httpx.AsyncClient(base_url=f"{base}/api/v1", timeout=30) as client:
                    r = await client.post(
                        "/auth/login", json={"username": ADMIN_USER, "password": ADMIN_PASSWORD}
                    )
                    auth = {"Authorization": f"Bearer {r.json()['token']}"}
                    if round_ == 0:
                        r = await client.post(
                            "/replications",
                            headers=auth,
                            json={
                                "source_vm": {
                                    "name": "cli01",
                                    "path": "/DC/vm/cli01",
                                    "disks": [{"id": "d0"}],
                                }
                            },
                        )
                        assert r.status_code == 201
                        job_id = r.json()["id"]
                    else:
                        r = await client.get(f"/replications/{job_id}", headers=auth)
                        assert r.status_code == 200 and r.json()["vm_name"] == "cli01"
                    health = (await client.get("/debug/health", headers=auth)).json()
                    assert health["database"]["embedded"] is True
            finally:
                assert await stop_oma_process(proc) == 0
        assert (data_dir / "pgdata" / "PG_VERSION").exists()
        assert (data_dir / "secrets" / "credentials.key").stat().st_mode & 0o777 == 0o600
        # one-time admin creation command
        with trio.fail_after(60):
            out = await trio.run_process(
                [*cmd[:3], "--data-dir", str(data_dir), "--create-admin", "second"],
                stdin=b"another-password\n",
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert out.returncode == 0, out.stderr
        assert b"created" in out.stdout
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.slow
async def test_cli_two_workers_share_one_port_and_one_database(oma_dsn: str) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="oma-workers-"))
    env = {
        **os.environ,
        "OMA_ADMIN_USERNAME": ADMIN_USER,
        "OMA_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": oma_dsn,
        "OMA_REPLICATION_ENGINE": "0",  # the jobs below must stay active (pending) for the 409s
    }
    cmd = server_command(data_dir, "--workers", "2")
    with trio.fail_after(120):
        proc, base = await start_oma_process(cmd, env)
    try:
        # new connections land on either worker: every answer must agree (state is in PostgreSQL)
        # a new connection, maybe a new worker, each time
        no_reuse = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=f"{base}/api/v1", limits=no_reuse, timeout=30) as client:
            r = await client.post("/auth/login", json={"username": ADMIN_USER, "password": ADMIN_PASSWORD})
            auth = {"Authorization": f"Bearer {r.json()['token']}"}
            vm = {"source_vm": {"name": "w01", "path": "/DC/vm/w01", "disks": [{"id": "d0"}]}}
            job = (await client.post("/replications", headers=auth, json=vm)).json()
            for _ in range(10):
                assert (await client.get(f"/replications/{job['id']}", headers=auth)).status_code == 200
                assert (await client.post("/replications", headers=auth, json=vm)).status_code == 409
    finally:
        assert await stop_oma_process(proc) == 0
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_an_expired_lease_is_taken_over_by_a_live_worker_and_a_live_one_is_not(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    """Two jobs claimed by OMA workers on another host: one claimed long ago and never renewed (its
    worker died right after the claim), one whose lease runs for an hour. A live engine takes the
    first over (the VMA is told to stop it, the job fails with the reason) and leaves the second."""
    config = make_config(tmp_path, oma_dsn, vma.base_url)
    async with run_oma(config) as oma:
        ids = []
        for i in (1, 2):
            path = f"/LabDC/vm/lease0{i}"
            source = {"id": f"vm-{i}", "name": f"lease0{i}", "path": path, "disks": [{"id": "disk-2000"}]}
            r = await oma.post("/replications", json={"source_vm": source})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
    dead, live = ids
    async with open_database(oma_dsn, min_size=1, max_size=1) as db:
        await db.execute(
            "UPDATE replication_jobs SET status = 'replicating', claimed_by = $2,"
            " claimed_at = now() - interval '1 hour' WHERE id = $1",
            dead,
            "elsewhere:4242@1:dead0000",
        )
        await db.execute(
            "UPDATE replication_jobs SET status = 'replicating', claimed_by = $2, claimed_at = now(),"
            " lease_expires_at = now() + interval '1 hour' WHERE id = $1",
            live,
            "elsewhere:4243@1:live0000",
        )
    engine_on = make_config(
        tmp_path, oma_dsn, vma.base_url, run_replications=True, job_lease_ttl=1.0, engine_poll_interval=0.2
    )
    async with run_oma(engine_on) as oma:
        with trio.fail_after(20):
            while (job := (await oma.get(f"/replications/{dead}")).json())["status"] != "failed":
                await trio.sleep(0.1)
        assert "elsewhere:4242@1:dead0000" in job["error_message"]
        assert "lease expired" in job["error_message"]
        assert ("POST", "/api/v1/cleanup", {"job_id": dead, "action": "cleanup_all"}) in vma.requests
        await trio.sleep(2.0)  # several takeover rounds (every lease_ttl / 2)
        assert (await oma.get(f"/replications/{live}")).json()["status"] == "replicating"
    async with open_database(oma_dsn, min_size=1, max_size=1) as db:
        claimed_by = await db.fetchval("SELECT claimed_by FROM replication_jobs WHERE id = $1", live)
    assert claimed_by == "elsewhere:4243@1:live0000"
