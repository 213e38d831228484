"""Export jobs (``"mode": "export"``, docs/backup.md): the lab's vCenter and disk images, the VMA
over real HTTP, and the exports read as the OMA's backup engine reads them: ``nbdinfo`` for the
export's shape and allocation map, the mover (several connections) copying the listed extents
into a new QCOW2 image (an overlay on the previous one for an incremental), compared with the
snapshot's frozen image by ``qemu-img compare``."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from lab import Lab, LabVM
from pyapp import mover
from pyapp.nbd_export import free_tcp_port
from tests.vma.conftest import VM_PATH, StartVma, Vma, replicate_body, snapshot_names
from tests.vma.oma_double import OmaDouble
from vma.config import VmaConfig
from vma.replication import export as vma_export
from vma.vsphere.client import SnapshotRef, VCenterLogin, VSphere, merge_extents

KiB = 1024


def export_body(lab: Lab, job_id: str, **fields: Any) -> dict[str, Any]:
    return replicate_body(lab, job_id, mode="export", **fields)


async def wait_exported(vma: Vma, job_id: str, within: float = 60.0) -> dict[str, Any]:
    """Poll ``/status`` until the job serves its disks; returns that answer."""
    with trio.fail_after(within):
        while True:
            status: dict[str, Any] = (await vma.get(f"/api/v1/status/{job_id}")).json()
            assert status["status"] in ("pending", "running"), status
            if status.get("phase") == "exported":
                return status
            assert "exports" not in status, status
            await trio.sleep(0.02)


async def start_export(vma: Vma, body: dict[str, Any]) -> dict[str, Any]:
    r = await vma.post("/api/v1/replicate", body)
    assert r.status_code == 200, r.text
    assert r.json()["job_id"] == body["job_id"] and r.json()["status"] == "started"
    return await wait_exported(vma, body["job_id"])


async def release(vma: Vma, job_id: str) -> dict[str, Any]:
    r = await vma.post("/api/v1/cleanup", {"job_id": job_id, "action": "cleanup_all"})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def by_disk(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["disk_id"]: e for e in status["exports"]}


def extents_of(export: dict[str, Any]) -> list[tuple[int, int]]:
    return [(int(o), int(n)) for o, n in export["extents"]]


# -- what the tests read with (blocking: through trio.to_thread.run_sync) ---------------------------


def nbdinfo(uri: str, *args: str) -> Any:
    out = subprocess.run(["nbdinfo", "--json", *args, uri], capture_output=True, check=True, timeout=30)
    return json.loads(out.stdout)


def data_areas(uri: str) -> list[tuple[int, int]]:
    """The export's allocated areas, from its NBD allocation map (``base:allocation``)."""
    return [(e["offset"], e["length"]) for e in nbdinfo(uri, "--map") if not e["type"] & 1]


def covered(areas: list[tuple[int, int]], by: list[tuple[int, int]]) -> bool:
    """Whether every byte of ``areas`` lies inside ``by``."""
    return merge_extents([*by, *areas]) == merge_extents(by)


def frozen_disks(lab: Lab, vm: LabVM, snapshot: str) -> dict[str, tuple[Path, str]]:
    """disk id -> (the snapshot's frozen raw image, its change ID), as vCenter describes them."""
    vs = VSphere.connect(VCenterLogin(lab.url, lab.username, lab.password))
    try:
        disks = vs.snapshot_disks(SnapshotRef(vm.moref, snapshot, ""))
    finally:
        vs.disconnect()
    return {d.disk_id: (lab.image(d.file_name), d.change_id or "") for d in disks}


def same_image(qcow2: Path, raw: Path) -> bool:
    r = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(qcow2), str(raw)], capture_output=True
    )
    return r.returncode == 0


def accepts(uri: str) -> bool:
    u = urlsplit(uri)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((u.hostname or "", u.port or 0)) == 0


def processes_of(job_dir: Path) -> list[int]:
    """Processes whose command line names the job's work directory (its nbdkit sources do)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(job_dir).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


async def assert_released(vma: Vma, lab: Lab, job_id: str, uris: list[str]) -> None:
    """Nothing of the job is left: no snapshot, no nbdkit, no listening port."""
    assert await trio.to_thread.run_sync(snapshot_names, lab, "vm1") == []
    assert processes_of(vma.config.work_dir / job_id) == []
    for uri in uris:
        assert not await trio.to_thread.run_sync(accepts, uri), uri


async def read_as_backup(
    export: dict[str, Any], target: Path, backing: Path | None = None
) -> mover.CopyProgress:
    """What the OMA's backup engine does with one export: the mover, several connections."""
    extents = None if export["extents"] is None else extents_of(export)
    return await mover.copy(
        export["uri"],
        str(target),
        extents=extents,
        allocated_only=extents is None,
        backing=str(backing) if backing is not None else None,
        connections=4,
    )


# -- the tests ------------------------------------------------------------------------------------------


async def test_full_then_incremental_export(
    tmp_path: Path, vma: Vma, lab: Lab, vm1: LabVM, oma: OmaDouble
) -> None:
    ids = [f"disk-{d.key}" for d in vm1.disks]

    # 1. No previous change ID: a full pass of every disk.
    s1 = await start_export(vma, export_body(lab, "exp-1"))
    assert s1["status"] == "running" and s1["phase"] == "exported"
    e1 = by_disk(s1)
    assert list(e1) == ids
    [snap1] = (await vma.get("/api/v1/progress/exp-1")).json()["snapshots"]
    frozen1 = await trio.to_thread.run_sync(frozen_disks, lab, vm1, snap1)
    # The guest writes while the export is served: the export keeps serving the snapshot, and
    # these writes are what the next pass must find.
    changed = [
        vm1.disks[0].guest.rewrite_random_chunks(6, chunk=64 * KiB, seed=7),
        vm1.disks[1].guest.rewrite_random_chunks(2, chunk=64 * KiB, seed=8),
    ]
    fulls = {}
    for disk, disk_id in zip(vm1.disks, ids, strict=True):
        e = e1[disk_id]
        assert e["vm_path"] == VM_PATH and e["mode"] == "full" and e["capacity"] == disk.capacity
        assert e["uri"].startswith("nbd://127.0.0.1:") and e["uri"].endswith("/")
        assert e["change_id"] == frozen1[disk_id][1] != ""
        info = (await trio.to_thread.run_sync(nbdinfo, e["uri"]))["exports"][0]
        assert info["export-size"] == disk.capacity and info["is_read_only"] is True
        # The listed extents hold every allocated byte of the snapshot's disk.
        assert covered(await trio.to_thread.run_sync(data_areas, e["uri"]), extents_of(e))
        fulls[disk_id] = tmp_path / f"full-{disk.key}.qcow2"
        await read_as_backup(e, fulls[disk_id])
        assert same_image(fulls[disk_id], frozen1[disk_id][0])
    assert sum(n for _, n in extents_of(e1[ids[1]])) == 0  # the blank disk holds nothing

    answer = await release(vma, "exp-1")
    assert answer["job_stopped"] is True and answer["snapshots_removed"] == [snap1]
    s1 = (await vma.get("/api/v1/status/exp-1")).json()
    assert s1["status"] == "completed" and s1["phase"] == "completed" and "exports" not in s1
    assert s1["progress_percent"] == 100.0
    await assert_released(vma, lab, "exp-1", [e["uri"] for e in e1.values()])

    # 2. From the first pass's change IDs: exactly the areas the guest wrote.
    previous = {VM_PATH: {disk_id: e1[disk_id]["change_id"] for disk_id in ids}}
    s2 = await start_export(vma, export_body(lab, "exp-2", previous_change_ids=previous))
    e2 = by_disk(s2)
    [snap2] = (await vma.get("/api/v1/progress/exp-2")).json()["snapshots"]
    frozen2 = await trio.to_thread.run_sync(frozen_disks, lab, vm1, snap2)
    for areas, disk_id in zip(changed, ids, strict=True):
        e = e2[disk_id]
        assert e["mode"] == "incremental"
        assert extents_of(e) == merge_extents(areas)
        assert e["change_id"] == frozen2[disk_id][1] != e1[disk_id]["change_id"]
        top = tmp_path / f"inc-{disk_id}.qcow2"
        result = await read_as_backup(e, top, backing=fulls[disk_id])
        assert result.bytes_written == sum(n for _, n in areas)
        assert same_image(top, frozen2[disk_id][0])  # the chain reads as the second snapshot
    await release(vma, "exp-2")
    assert (await vma.get("/api/v1/status/exp-2")).json()["status"] == "completed"
    await assert_released(vma, lab, "exp-2", [e["uri"] for e in e2.values()])
    assert oma.requests == []  # an export job never calls the OMA


async def test_cbt_reset_makes_a_full_export_without_extents(
    tmp_path: Path, vma: Vma, lab: Lab, vm1: LabVM
) -> None:
    s1 = await start_export(vma, export_body(lab, "exp-a", disks={VM_PATH: [f"disk-{vm1.disks[0].key}"]}))
    [e1] = s1["exports"]
    await release(vma, "exp-a")
    vm1.disks[0].guest.reset_cbt()  # vSphere reset change tracking (e.g. after a storage move)
    vm1.disks[0].guest.rewrite_random_chunks(3, chunk=64 * KiB, seed=3)

    previous = {VM_PATH: {e1["disk_id"]: e1["change_id"]}}
    s2 = await start_export(
        vma,
        export_body(lab, "exp-b", disks={VM_PATH: [e1["disk_id"]]}, previous_change_ids=previous),
    )
    [e2] = s2["exports"]
    assert e2["disk_id"] == e1["disk_id"] and e2["mode"] == "full-cbt-reset" and e2["extents"] is None
    assert e2["change_id"].rpartition("/")[0] != e1["change_id"].rpartition("/")[0]  # a new epoch
    [snap] = (await vma.get("/api/v1/progress/exp-b")).json()["snapshots"]
    frozen = await trio.to_thread.run_sync(frozen_disks, lab, vm1, snap)
    target = tmp_path / "reset.qcow2"
    await read_as_backup(e2, target)  # the whole allocation map: a new chain
    assert same_image(target, frozen[e2["disk_id"]][0])
    await release(vma, "exp-b")
    await assert_released(vma, lab, "exp-b", [e2["uri"]])


async def test_an_export_nobody_releases_expires(start_vma: StartVma, lab: Lab, vm1: LabVM) -> None:
    vma = await start_vma(export_host="localhost")
    disk_id = f"disk-{vm1.disks[1].key}"
    status = await start_export(vma, export_body(lab, "exp-t", disks={VM_PATH: [disk_id]}, export_timeout=2))
    [export] = status["exports"]
    assert export["disk_id"] == disk_id
    port = urlsplit(export["uri"]).port
    assert export["uri"] == f"nbd://localhost:{port}/"  # export_host is what the URI names
    final = await vma.wait_job("exp-t", within=30)
    assert final["status"] == "failed"
    assert "not released within 2 s" in final["error"]
    status = (await vma.get("/api/v1/status/exp-t")).json()
    assert status["phase"] == "failed" and "exports" not in status
    await assert_released(vma, lab, "exp-t", [f"nbd://127.0.0.1:{port}/"])


def failing_nbdkit(tmp_path: Path, second_start: str) -> str:
    """An ``nbdkit`` that starts the real one for the first disk and runs ``second_start`` (shell)
    for the second: the job fails (or hangs) with the first disk already served."""
    script = tmp_path / "nbdkit-wrapper"
    count = tmp_path / "nbdkit-starts"
    script.write_text(
        "#!/bin/sh\n"
        f'n=$(cat "{count}" 2>/dev/null || echo 0)\n'
        f'echo $((n + 1)) > "{count}"\n'
        f'if [ "$n" -ge 1 ]; then {second_start}; fi\n'
        'exec nbdkit "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


async def test_a_failure_before_exported_stops_the_sources_and_removes_the_snapshot(
    tmp_path: Path, start_vma: StartVma, lab: Lab, vm1: LabVM, oma: OmaDouble
) -> None:
    vma = await start_vma(nbdkit=failing_nbdkit(tmp_path, 'echo "injected failure" >&2; exit 1'))
    r = await vma.post("/api/v1/replicate", export_body(lab, "exp-f"))
    assert r.status_code == 200, r.text
    final = await vma.wait_job("exp-f")
    assert final["status"] == "failed"
    assert "nbdkit exited with 1" in final["error"] and "injected failure" in final["error"]
    assert [d["phase"] for d in final["disks"]] == ["exported", "failed"]
    status = (await vma.get("/api/v1/status/exp-f")).json()
    assert status["phase"] == "failed" and "exports" not in status
    await assert_released(vma, lab, "exp-f", [])
    assert oma.requests == []


async def test_release_before_exported_cancels_the_job(
    tmp_path: Path, start_vma: StartVma, lab: Lab, vm1: LabVM
) -> None:
    vma = await start_vma(nbdkit=failing_nbdkit(tmp_path, "sleep 30"))
    r = await vma.post("/api/v1/replicate", export_body(lab, "exp-c"))
    assert r.status_code == 200, r.text
    with trio.fail_after(30):  # the first disk is served, the second source is starting
        while True:
            p = (await vma.get("/api/v1/progress/exp-c")).json()
            if p["phase"] == "exporting" and p["disks"][0]["phase"] == "exported":
                break
            await trio.sleep(0.02)
    answer = await release(vma, "exp-c")
    assert answer["job_stopped"] is True and len(answer["snapshots_removed"]) == 1
    status = (await vma.get("/api/v1/status/exp-c")).json()
    assert status["status"] == "failed" and status["phase"] == "failed"
    assert status["error"] == "cancelled: stopped by cleanup (cleanup_all)"
    await assert_released(vma, lab, "exp-c", [])


async def test_a_port_taken_before_nbdkit_binds_it_is_replaced(
    vma: Vma, lab: Lab, vm1: LabVM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port was free when picked and another process took it: nbdkit cannot bind, and the
    export must neither fail nor advertise the other process's port (a connection probe would
    reach it: readiness is nbdkit's pid file)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        picks = iter([busy, free_tcp_port()])
        monkeypatch.setattr(vma_export, "free_tcp_port", lambda host: next(picks))
        disk_id = f"disk-{vm1.disks[0].key}"
        status = await start_export(vma, export_body(lab, "exp-p", disks={VM_PATH: [disk_id]}))
        [export] = status["exports"]
        port = urlsplit(export["uri"]).port
        assert port != busy
        info = (await trio.to_thread.run_sync(nbdinfo, export["uri"]))["exports"][0]
        assert info["export-size"] == vm1.disks[0].capacity
        await release(vma, "exp-p")
    await assert_released(vma, lab, "exp-p", [export["uri"]])


async def test_an_unknown_disk_fails_before_the_snapshot(vma: Vma, lab: Lab, vm1: LabVM) -> None:
    r = await vma.post("/api/v1/replicate", export_body(lab, "exp-u", disks={VM_PATH: ["disk-9999"]}))
    assert r.status_code == 200, r.text
    final = await vma.wait_job("exp-u")
    assert final["status"] == "failed" and final["snapshots"] == []
    assert final["error"] == (
        f"{VM_PATH} has no disk disk-9999 (its disks: {', '.join(f'disk-{d.key}' for d in vm1.disks)})"
    )
    assert await trio.to_thread.run_sync(snapshot_names, lab, "vm1") == []


# -- the request ------------------------------------------------------------------------------------


async def test_export_fields_are_validated(api: Vma, oma: OmaDouble) -> None:
    base = {
        "job_id": "exp-v",
        "vcenter": "http://127.0.0.1:9/sdk",
        "username": "u",
        "password": "p",
        "vm_paths": [VM_PATH],
        "mode": "export",
    }
    replicate = {**base, "mode": "replicate", "targets": {VM_PATH: {"0": "nbd://127.0.0.1:1/x"}}}
    bad: list[tuple[dict[str, Any], str]] = [
        ({**base, "mode": "backup"}, "mode must be 'replicate' or 'export'"),
        ({**base, "mode": 1}, "mode must be"),
        ({**base, "targets": replicate["targets"]}, "targets applies to mode 'replicate' only"),
        ({**replicate, "disks": {VM_PATH: ["disk-2000"]}}, "disks applies to mode 'export' only"),
        ({**replicate, "export_timeout": 10}, "export_timeout applies to mode 'export' only"),
        ({**replicate, "previous_change_ids": {}}, "previous_change_ids applies to mode 'export' only"),
        ({**base, "disks": ["disk-2000"]}, "disks must be an object"),
        ({**base, "disks": {"/DC0/vm/other": ["disk-2000"]}}, "which is not in vm_paths"),
        ({**base, "disks": {VM_PATH: []}}, "must be a non-empty list"),
        ({**base, "disks": {VM_PATH: ["2000"]}}, "disks['/DC0/vm/vm1'][0] must be a disk id"),
        ({**base, "disks": {VM_PATH: ["disk-2000", "disk-2000"]}}, "lists a disk twice"),
        ({**base, "previous_change_ids": []}, "previous_change_ids must be an object"),
        ({**base, "previous_change_ids": {"/DC0/vm/x": {}}}, "which is not in vm_paths"),
        ({**base, "previous_change_ids": {VM_PATH: {"x": None}}}, "must be a disk id"),
        ({**base, "previous_change_ids": {VM_PATH: {"disk-2000": "nope"}}}, "must be a change ID"),
        ({**base, "previous_change_ids": {VM_PATH: {"disk-2000": 7}}}, "must be a change ID"),
        (
            {
                **base,
                "disks": {VM_PATH: ["disk-2000"]},
                "previous_change_ids": {VM_PATH: {"disk-2001": "52 aa/3"}},
            },
            "names disk-2001, which disks['/DC0/vm/vm1'] does not export",
        ),
        ({**base, "export_timeout": 0}, "export_timeout must be a number of seconds"),
        ({**base, "export_timeout": -5}, "export_timeout must be"),
        ({**base, "export_timeout": "60"}, "export_timeout must be"),
        ({**base, "export_timeout": True}, "export_timeout must be"),
        ({**base, "export_timeout": 1e9}, "export_timeout must be"),
    ]
    for body, message in bad:
        r = await api.post("/api/v1/replicate", body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["code"] == "INVALID_REQUEST" and message in r.json()["error"], (body, r.json())
    # A valid export request needs no target; this one fails in the background (no vCenter there).
    good = {
        **base,
        "disks": {VM_PATH: ["disk-2000"]},
        "previous_change_ids": {VM_PATH: {"disk-2000": "52 aa bb-cc dd/17"}},
        "export_timeout": 60,
    }
    r = await api.post("/api/v1/replicate", good)
    assert r.status_code == 200, r.text
    final = await api.wait_job("exp-v")
    assert final["status"] == "failed" and "cannot connect to vCenter" in final["error"]
    status = (await api.get("/api/v1/status/exp-v")).json()
    assert status["phase"] == "failed" and "exports" not in status
    assert oma.requests == []


def test_export_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (VmaConfig().export_listen, VmaConfig().export_uri_host, VmaConfig().export_timeout) == (
        "127.0.0.1",
        "127.0.0.1",
        3600.0,
    )
    monkeypatch.setenv("VMA_EXPORT_LISTEN", "0.0.0.0")
    monkeypatch.setenv("VMA_EXPORT_HOST", "vma.example.net")
    monkeypatch.setenv("VMA_EXPORT_TIMEOUT", "900")
    config = VmaConfig()
    assert (config.export_listen, config.export_uri_host, config.export_timeout) == (
        "0.0.0.0",
        "vma.example.net",
        900.0,
    )
    # A key of the configuration file wins over the environment.
    assert VmaConfig.from_mapping({"export_timeout": 60}).export_timeout == 60
    monkeypatch.delenv("VMA_EXPORT_HOST")
    with pytest.raises(ValueError, match="set export_host"):
        VmaConfig()  # listening everywhere, nothing to advertise
    monkeypatch.setenv("VMA_EXPORT_LISTEN", "vma.local")
    with pytest.raises(ValueError, match="export_listen must be an IPv4 address"):
        VmaConfig()
    monkeypatch.setenv("VMA_EXPORT_LISTEN", "127.0.0.1")
    monkeypatch.setenv("VMA_EXPORT_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="VMA_EXPORT_TIMEOUT must be a number"):
        VmaConfig()
    monkeypatch.setenv("VMA_EXPORT_TIMEOUT", "0")
    with pytest.raises(ValueError, match="export_timeout must be a positive number"):
        VmaConfig()
