"""kill -9 in the middle of a copy: the OMA, one of its workers, its embedded PostgreSQL, the VMA.

Each time the job ends (resumed or failed, never ``replicating`` for ever), nothing is left behind
(no ``qemu-nbd`` of the OMA, no export record, no snapshot in the lab, no VMA work directory or
journal record) and the next pass makes every target volume equal to its source.

The OMA and the VMA run as real processes (``oma-api-server``, ``vma-api-server``) so that they
can be killed; the copy is held in flight by stopping (SIGSTOP) one of the target exports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from lab import Lab, LabVM
from pyapp.db import open_database
from pyapp.nbd_export import free_tcp_port
from pyapp.process import ProcessRef, cmdline, pids
from pyapp.vma_auth import SecretFile, SignedAuth
from tests.e2e.conftest import TERMINAL, enroll, lab_credential
from tests.e2e.test_replication_flow import assert_targets_equal
from tests.oma.oma_harness import ADMIN_PASSWORD, ADMIN_USER, Oma, make_config
from tests.vma.conftest import snapshot_names

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LEASE_TTL = 3.0


async def start_process(cmd: list[str], env: dict[str, str], log: Path) -> tuple[trio.Process, str]:
    """Start a service and read its first stdout line (its address once it serves)."""
    with log.open("ab") as err:
        proc = await trio.lowlevel.open_process(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    line = b""
    with trio.fail_after(120):
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(1)
            assert chunk, f"{cmd[2]} exited before serving; see {log}"
            line += chunk
    return proc, line.decode().strip()


@dataclass
class Stack:
    """The OMA and the VMA as processes, on fixed ports (they survive restarts), and the lab."""

    lab: Lab
    work: Path
    oma_cmd: list[str]
    oma_env: dict[str, str]
    vma_cmd: list[str]
    vma_work: Path
    http: httpx.AsyncClient
    oma_url: str
    dsn: str | None
    procs: dict[str, trio.Process] = field(default_factory=dict)
    token: str = ""

    @property
    def data_dir(self) -> Path:
        return self.work / "oma"

    async def start_oma(self) -> None:
        self.procs["oma"], line = await start_process(self.oma_cmd, self.oma_env, self.work / "oma.log")
        assert line.startswith("OMA listening on "), line
        r = await self.http.post(
            f"{self.oma_url}/auth/login", json={"username": ADMIN_USER, "password": ADMIN_PASSWORD}
        )
        assert r.status_code == 200, r.text
        self.token = r.json()["token"]

    async def start_vma(self) -> None:
        self.procs["vma"], line = await start_process(self.vma_cmd, dict(os.environ), self.work / "vma.log")
        assert json.loads(line)["event"] == "listening", line

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()

    async def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """An OMA request; retried while the OMA is coming back (a GET also while it answers 5xx:
        its database is coming back)."""
        with trio.fail_after(90):
            while True:
                try:
                    auth = {"Authorization": f"Bearer {self.token}"}
                    r = await self.http.request(method, f"{self.oma_url}{path}", headers=auth, **kw)
                except httpx.TransportError:
                    await trio.sleep(0.2)
                    continue
                if r.status_code < 500 or method != "GET":
                    return r
                await trio.sleep(0.2)

    async def replicate(self, vm: LabVM) -> str:
        body = {"source_vm": {"name": vm.name, "path": f"/DC0/vm/{vm.name}", "id": vm.moref}}
        r = await self.api("POST", "/replications", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async def wait(self, job_id: str, within: float = 90.0) -> dict[str, Any]:
        with trio.fail_after(within):
            while True:
                job: dict[str, Any] = (await self.api("GET", f"/replications/{job_id}")).json()
                if job["status"] in TERMINAL:
                    return job
                await trio.sleep(0.1)

    async def vma_phase(self, job_id: str) -> str:
        port = json.loads((self.work / "vma.json").read_text())["port"]
        try:
            r = await self.http.get(
                f"http://127.0.0.1:{port}/api/v1/progress/{job_id}",
                auth=SignedAuth(SecretFile(self.work / "vma.secret").read),
            )
        except httpx.TransportError:
            return ""
        return str(r.json().get("phase", ""))


@pytest.fixture
async def stack_factory(lab: Lab, postgres_admin_dsn: str, tmp_path: Path) -> AsyncIterator[Any]:
    stacks: list[Stack] = []
    # not under pytest's 0700 tmp dir: as root, pgserver runs PostgreSQL as its own user
    work = Path(tempfile.mkdtemp(prefix="oma-crash-"))

    async def make(*, embedded: bool, workers: int) -> Stack:
        from pyapp.db import create_database, with_database

        dsn = None
        if not embedded:
            name = f"oma_crash_{uuid.uuid4().hex[:12]}"
            await create_database(postgres_admin_dsn, name)
            dsn = with_database(postgres_admin_dsn, name)
        oma_port, vma_port = free_tcp_port(), free_tcp_port()
        oma_env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMA_ADMIN_USERNAME": ADMIN_USER,
            "OMA_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "OMA_VMA_URL": f"http://127.0.0.1:{vma_port}",
            "OMA_VMA_SECRET_FILE": str(work / "vma.secret"),
            "OMA_JOB_LEASE_TTL": str(LEASE_TTL),
            "OMA_VMA_LOST_TIMEOUT": "30",
            "OMA_BACKUP_ENGINE": "0",
            "OMA_LOG_LEVEL": "debug",
        }
        oma_env.pop("DATABASE_URL", None)
        if dsn is not None:
            oma_env["DATABASE_URL"] = dsn
        oma_cmd = [
            sys.executable,
            *("-m", "oma.server", "--host", "127.0.0.1", "--port", str(oma_port)),
            *("--data-dir", str(work / "oma"), "--workers", str(workers)),
        ]
        secret = work / "vma.secret"
        vma_json = {
            "host": "127.0.0.1",
            "port": vma_port,
            "work_dir": str(work / "vma"),
            "oma_url": f"http://127.0.0.1:{oma_port}",
            "oma_secret_file": str(secret),
            "oma_backoff_initial": 0.1,
            "oma_backoff_max": 1.0,
            "oma_unreachable_deadline": 60.0,
            "final_report_timeout": 10.0,
            "source": "file",
            "datastore_roots": {k: str(v) for k, v in lab.datastores.dirs.items()},
            "reconnect_timeout": 2.0,
            "progress_report_interval": 0.2,
            "recovery_interval": 1.0,
        }
        http = httpx.AsyncClient(timeout=30)
        stack = Stack(
            lab=lab,
            work=work,
            oma_cmd=oma_cmd,
            oma_env=oma_env,
            vma_cmd=[sys.executable, "-m", "vma.server", "--config", str(work / "vma.json")],
            vma_work=work / "vma",
            http=http,
            oma_url=f"http://127.0.0.1:{oma_port}/api/v1",
            dsn=dsn,
        )
        stacks.append(stack)
        await stack.start_oma()
        oma = Oma(f"http://127.0.0.1:{oma_port}", make_config(tmp_path, dsn or "", ""), http, stack.token)
        appliance_id, vma_secret = await enroll(oma)
        secret.write_text(vma_secret)
        (work / "vma.json").write_text(json.dumps({**vma_json, "appliance_id": appliance_id}))
        await stack.start_vma()
        r = await stack.api(
            "POST",
            "/vmware-credentials",
            json=lab_credential(lab),
        )
        assert r.status_code == 201, r.text
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            for proc in stack.procs.values():
                proc.terminate()
                with trio.move_on_after(60):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
            await stack.http.aclose()
        # anything the test left running of this data directory (it must not be there: asserted)
        for pid in list(pids()):
            if str(work) in " ".join(cmdline(pid)):
                ref = ProcessRef.of(pid)
                if ref is not None:
                    await trio.to_thread.run_sync(ref.terminate)
        if not os.environ.get("KEEP_CRASH_DIR"):
            shutil.rmtree(work, ignore_errors=True)


def export_processes(stack: Stack) -> list[ProcessRef]:
    """The qemu-nbd processes serving a volume of this OMA's data directory."""
    out = []
    for pid in pids():
        argv = cmdline(pid)
        if argv and Path(argv[0]).name == "qemu-nbd" and str(stack.data_dir) in argv[-1]:
            ref = ProcessRef.of(pid)
            if ref is not None:
                out.append(ref)
    return out


async def hold_copy(stack: Stack, job_id: str) -> ProcessRef:
    """Stop (SIGSTOP) one of the job's exports once the VMA copies into it."""
    with trio.fail_after(60):
        while not (refs := export_processes(stack)):
            await trio.sleep(0.01)
        held = refs[0]
        assert held.signal(signal.SIGSTOP)
        while await stack.vma_phase(job_id) != "copying":
            await trio.sleep(0.01)
    return held


async def claimant_pid(stack: Stack, job_id: str) -> int:
    assert stack.dsn is not None
    async with open_database(stack.dsn, min_size=1, max_size=1) as db:
        claimed_by = await db.fetchval("SELECT claimed_by FROM replication_jobs WHERE id = $1", job_id)
    process = str(claimed_by).split(":")[1]  # host:pid@start:nonce (host:pid:nonce before)
    pid = int(process.split("@")[0])
    assert ProcessRef.of(pid) is not None, claimed_by
    return pid


def postmaster_pid(stack: Stack) -> int:
    return int((stack.data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])


async def assert_nothing_left(stack: Stack, vm: LabVM, within: float = 60.0) -> None:
    deadline = trio.current_time() + within
    while True:
        left = {
            "qemu-nbd": [str(r) for r in export_processes(stack)],
            "export records": sorted(p.name for p in (stack.data_dir / "run" / "exports").glob("*")),
            "snapshots": await trio.to_thread.run_sync(snapshot_names, stack.lab, vm.name),
            "vma work": sorted(p.name for p in stack.vma_work.iterdir() if p.name != "journal"),
            "vma journal": sorted(p.name for p in (stack.vma_work / "journal").glob("*")),
            "temporary volumes": sorted(
                p.name for p in (stack.data_dir / "volumes").rglob("*") if ".tmp" in p.name
            ),
        }
        if not any(left.values()) or trio.current_time() > deadline:
            break
        await trio.sleep(0.25)
    assert not any(left.values()), left


@pytest.mark.parametrize(
    ("crash", "embedded", "workers"),
    [("oma", False, 1), ("worker", False, 2), ("postgres", True, 1), ("vma", False, 1)],
)
async def test_kill_mid_copy_ends_the_job_leaves_nothing_and_the_next_pass_repairs(
    stack_factory: Any, vm1: LabVM, crash: str, embedded: bool, workers: int
) -> None:
    stack: Stack = await stack_factory(embedded=embedded, workers=workers)
    r = await stack.api("POST", "/discovery/add-vms", json={"vm_names": [vm1.name]})
    assert r.status_code == 200, r.text
    first = await stack.wait(await stack.replicate(vm1))
    assert first["status"] == "completed", first["error_message"]
    await trio.to_thread.run_sync(
        lambda: vm1.disks[0].guest.rewrite_random_chunks(8, chunk=256 * 1024, seed=11)
    )

    with trio.fail_after(30):  # the first pass's exports are closed
        while export_processes(stack):
            await trio.sleep(0.05)
    job_id = await stack.replicate(vm1)
    held = await hold_copy(stack, job_id)
    if crash == "oma":
        stack.kill("oma")
        held.signal(signal.SIGCONT)
        await stack.start_oma()
    elif crash == "worker":
        os.kill(await claimant_pid(stack, job_id), signal.SIGKILL)
        held.signal(signal.SIGCONT)
    elif crash == "postgres":
        os.kill(postmaster_pid(stack), signal.SIGKILL)
        await trio.sleep(2.0)  # the copy is held while the database is down
        held.signal(signal.SIGCONT)
    else:
        stack.kill("vma")
        held.signal(signal.SIGCONT)
        await stack.start_vma()

    job = await stack.wait(job_id)
    assert job["status"] in ("completed", "failed"), job
    if job["status"] == "failed":
        assert job["error_message"], job
    await assert_nothing_left(stack, vm1)
    assert "oma" in stack.procs and stack.procs["oma"].returncode is None  # the OMA still serves

    final = await stack.wait(await stack.replicate(vm1))
    assert final["status"] == "completed", final["error_message"]
    assert_targets_equal(final, vm1)
    await assert_nothing_left(stack, vm1)
