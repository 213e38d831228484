"""``cloudstack-lab`` as a process: its ready line, its state across a restart (and a crash), and
its one-line start-up errors."""

from __future__ import annotations

import json
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .cloudstack_fixtures import (
    API_KEY,
    OMA_VM,
    SECRET_KEY,
    CloudStackLab,
    read_at,
    write_at,
)

READY = re.compile(r"^CloudStack lab listening on (http://127\.0\.0\.1:\d+/client/api)$")


def lab_command() -> list[str]:
    script = shutil.which("cloudstack-lab")
    if script is None:
        pytest.fail("the cloudstack-lab console script is not installed: run ./scripts/bootstrap.sh")
    return [script]


class LabProcess:
    def __init__(self, data_dir: Path, *extra: str, command: list[str] | None = None) -> None:
        args = [
            *(command or lab_command()),
            "--port", "0", "--data-dir", str(data_dir), "--api-key", API_KEY, "--secret-key", SECRET_KEY,
            "--job-delay", "0.05", *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = self._ready_line()

    def _ready_line(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().strip() if ready else ""
        match = READY.match(line)
        if match is None:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"no ready line (got {line!r}); stderr: {err[-2000:]}")
        return match.group(1)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.proc.stderr:
            self.proc.stderr.close()
        return code


@pytest.fixture
def processes() -> Iterator[list[LabProcess]]:
    started: list[LabProcess] = []
    yield started
    for lab in started:
        if lab.proc.poll() is None:
            lab.stop(signal.SIGKILL)


def client(process: LabProcess, data_dir: Path) -> CloudStackLab:
    return CloudStackLab(process.url, data_dir, data_dir / "dev", httpx.AsyncClient(timeout=30))


async def test_ready_line_and_state_across_a_restart(tmp_path: Path, processes: list[LabProcess]) -> None:
    data_dir = tmp_path / "cs"
    first = LabProcess(data_dir, "--oma-vm-mac", "02:00:00:aa:bb:cc", "--oma-vm-ip", "10.1.1.200")
    processes.append(first)
    lab = client(first, data_dir)
    attached = await lab.new_volume(name="attached")
    job = await lab.api("attachVolume", id=attached["id"], virtualmachineid=OMA_VM)
    assert (await lab.job(job["jobid"]))["jobstatus"] == 1
    spare = await lab.new_volume(name="spare")
    await lab.ok("attachVolume", id=spare["id"], virtualmachineid=OMA_VM)
    write_at(lab.link(spare["id"]), 512, b"kept across restarts")
    await lab.ok("detachVolume", id=spare["id"])
    snapshot = (await lab.ok("createSnapshot", volumeid=spare["id"]))["snapshot"]
    await lab.http.aclose()
    assert first.stop() == 0

    shutil.rmtree(data_dir / "dev")  # the guest's device links are laid out again at start
    second = LabProcess(data_dir)
    processes.append(second)
    lab = client(second, data_dir)
    vm = (await lab.api("listVirtualMachines", id=OMA_VM))["virtualmachine"][0]
    assert vm["nic"][0]["macaddress"] == "02:00:00:aa:bb:cc" and vm["nic"][0]["ipaddress"] == "10.1.1.200"
    volumes = {v["name"]: v for v in (await lab.api("listVolumes", type="DATADISK"))["volume"]}
    assert volumes["attached"]["virtualmachineid"] == OMA_VM and volumes["attached"]["deviceid"] == 1
    assert "virtualmachineid" not in volumes["spare"]
    assert lab.link(attached["id"]).is_symlink() and not lab.link(spare["id"]).exists()
    assert read_at(lab.volume_file(spare["id"]), 512, 20) == b"kept across restarts"
    assert (await lab.api("listSnapshots"))["snapshot"][0]["id"] == snapshot["id"]
    assert (await lab.api("queryAsyncJobResult", jobid=job["jobid"]))["jobstatus"] == 1
    # a new attach gets the next free device id: the allocation survived the restart
    again = await lab.ok("attachVolume", id=spare["id"], virtualmachineid=OMA_VM)
    assert again["volume"]["deviceid"] == 2
    await lab.http.aclose()
    assert second.stop() == 0


async def test_a_job_pending_when_the_double_dies_fails_after_restart(
    tmp_path: Path, processes: list[LabProcess]
) -> None:
    data_dir = tmp_path / "cs"
    first = LabProcess(data_dir)
    processes.append(first)
    lab = client(first, data_dir)
    volume = await lab.new_volume()
    await lab.http.post(
        f"{lab.base}/lab/faults",
        content=json.dumps({"command": "attachVolume", "mode": "delay", "seconds": 60}),
    )
    pending = await lab.api("attachVolume", id=volume["id"], virtualmachineid=OMA_VM)
    await lab.http.aclose()
    first.stop(signal.SIGKILL)

    second = LabProcess(data_dir)
    processes.append(second)
    lab = client(second, data_dir)
    job = await lab.api("queryAsyncJobResult", jobid=pending["jobid"])
    assert job["jobstatus"] == 2 and job["jobresultcode"] == 530
    assert "restarted" in job["jobresult"]["errortext"]
    listed = (await lab.api("listVolumes", id=volume["id"]))["volume"][0]
    assert listed["state"] == "Allocated" and "virtualmachineid" not in listed
    await lab.http.aclose()
    second.stop()


def test_a_taken_port_is_one_line_and_status_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*lab_command(), "--port", str(port), "--data-dir", str(tmp_path / "cs"), "--api-key", "k",
             "--secret-key", "s"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"cloudstack-lab: cannot listen on 127.0.0.1:{port}")
    )


def test_an_invalid_seed_is_one_line_and_status_1(tmp_path: Path) -> None:
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"zones": []}))
    result = subprocess.run(
        [*lab_command(), "--port", "0", "--data-dir", str(tmp_path / "cs"), "--api-key", "k",
         "--secret-key", "s", "--seed", str(seed)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"cloudstack-lab: invalid seed {seed}:")


async def test_python_dash_m_runs_the_same_double(tmp_path: Path, processes: list[LabProcess]) -> None:
    proc = LabProcess(tmp_path / "cs", command=[sys.executable, "-m", "lab.cloudstack"])
    processes.append(proc)
    lab = client(proc, tmp_path / "cs")
    assert (await lab.api("listZones"))["count"] == 2
    await lab.http.aclose()
    started = time.monotonic()
    assert proc.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("option", "value", "complaint"),
    [
        ("--oma-vm-mac", "01:00:00:00:00:01", "--oma-vm-mac: Mac address is not unicast"),
        ("--oma-vm-mac", "nonsense", "--oma-vm-mac: Mac address is not valid"),
        ("--oma-vm-ip", "10.2.2.2", "--oma-vm-ip: 10.2.2.2 is not a host address of the OMA VM's network"),
    ],
)
def test_bad_oma_vm_addresses_are_refused(tmp_path: Path, option: str, value: str, complaint: str) -> None:
    result = subprocess.run(
        [*lab_command(), "--port", "0", "--data-dir", str(tmp_path / "cs"), "--api-key", "k",
         "--secret-key", "s", option, value],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"cloudstack-lab: {complaint}")
