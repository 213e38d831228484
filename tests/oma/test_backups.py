"""Backups on the OMA: the API and the backup engine, with real parts everywhere but the VMA.

PostgreSQL, the mover, qemu-img and nbdkit are real; the VMA is the double of ``vma_double.py``,
whose export job serves a real raw image with a real ``nbdkit file`` and plans passes from a
simulated CBT. Every point written is checked against the disk as it was at its snapshot:
``qemu-img compare`` of the point's chain with a copy of the image taken then, ``qemu-img check``,
and the mover's verification of its manifest.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from backup_fixtures import create_local_repository, wait_for_copies
from oma_harness import Oma, make_config, run_oma
from test_oma_credentials import cred_body
from vma_double import ExportDisk, VmaDouble

from oma.backups.copies import enqueue_policy_copies
from oma.backups.engine import BackupEngine
from oma.backups.layout import manifest_path, vm_dir, vm_key
from oma.backups.vm_disks import resolve_disk_id
from oma.credentials import vmware
from oma.state import STATE_KEY, OmaState
from oma.store import MIGRATIONS_DIR
from pyapp import mover
from pyapp.db import Database, UniqueViolation, apply_migrations, load_migrations, open_database
from pyapp.vma_auth import SignedAuth

MiB = 1 << 20
DISK_SIZE = 64 * MiB
TERMINAL = ("completed", "failed", "cancelled")


def pattern(seed: int, size: int) -> bytes:
    return bytes((seed * 7 + i * 13) % 251 + 1 for i in range(256)) * (size // 256)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def assert_point_is(point: Path, state: Path) -> None:
    """The point's chain reads as ``state``, and its QCOW2 structure is clean."""
    compared = run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(point), str(state))
    assert compared.returncode == 0, f"{point} differs from {state}: {compared.stdout}{compared.stderr}"
    checked = run("qemu-img", "check", "-q", str(point))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@dataclass
class BackupLab:
    oma: Oma
    vma: VmaDouble
    disk: ExportDisk
    repository_id: str
    repo_root: Path
    states_dir: Path
    hooked: list[str] = field(default_factory=list)

    @property
    def st(self) -> OmaState:
        state: OmaState = self.oma.extra["app"].extensions[STATE_KEY]
        return state

    @property
    def db(self) -> Database:
        return self.st.db

    async def start(self, backup_type: str, **kw: Any) -> dict[str, Any]:
        body = {
            "vm_name": "app01",
            "disk_id": "disk-2000",
            "backup_type": backup_type,
            "repository_id": self.repository_id,
            **kw,
        }
        r = await self.oma.post("/backup/start", json=body)
        assert r.status_code == 202, r.text
        answer: dict[str, Any] = r.json()
        return answer

    async def get(self, backup_id: str) -> dict[str, Any]:
        r = await self.oma.get(f"/backup/{backup_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def wait(self, backup_id: str, within: float = 30.0) -> dict[str, Any]:
        """Poll until the backup has ended and the engine has let it go (export released)."""
        engine = self.st.backup_engine
        assert engine is not None
        with trio.fail_after(within):
            while True:
                point = await self.get(backup_id)
                if point["status"] in TERMINAL and backup_id not in engine.backups:
                    return point
                await trio.sleep(0.05)

    async def backup(self, backup_type: str, **kw: Any) -> dict[str, Any]:
        """One backup to its end; with the disk's state at that time kept as ``<backup_id>.raw``."""
        started = await self.start(backup_type, **kw)
        point = await self.wait(started["backup_id"])
        assert point["status"] == "completed", point
        self.keep_state(point["backup_id"])
        return point

    def keep_state(self, name: str) -> Path:
        path = self.states_dir / f"{name}.raw"
        subprocess.run(["cp", "--sparse=always", str(self.disk.image), str(path)], check=True)
        return path

    def state(self, name: str) -> Path:
        return self.states_dir / f"{name}.raw"

    def files(self) -> list[str]:
        return sorted(p.name for p in self.repo_root.rglob("*") if p.is_file())


@pytest.fixture
async def lab(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> AsyncIterator[BackupLab]:
    config = make_config(tmp_path, oma_dsn, vma.base_url, run_backups=True, engine_poll_interval=0.1)
    async with run_oma(config) as oma:
        yield await setup_lab(oma, vma, tmp_path)


async def setup_lab(oma: Oma, vma: VmaDouble, tmp_path: Path, *, image: Path | None = None) -> BackupLab:
    """The VM ``app01`` managed (credential, discovery), its disk backed by a 64 MiB sparse image
    with some data, and a local repository."""
    if not any(vm["name"] == "app01" for vm in vma.vms):
        vm = vma.add_vm("vm-201", "app01", disks=2)
        r = await oma.post("/vmware-credentials", json=cred_body(vma, is_default=True))
        assert r.status_code == 201, r.text
        r = await oma.post("/discovery/add-vms", json={"vm_names": ["app01"]})
        assert r.json()["added_count"] == 1, r.text
        image = tmp_path / "app01-disk0.raw"
        with image.open("wb") as f:
            f.truncate(DISK_SIZE)
        disk = vma.add_export_disk(vm, image)
        disk.write(0, pattern(1, 2 * MiB))
        disk.write(40 * MiB, pattern(2, 3 * MiB))
    disk = vma.export_disks[("/LabDC/vm/app01", "disk-2000")]
    st: OmaState = oma.extra["app"].extensions[STATE_KEY]
    repo_root = tmp_path / "repo"
    repository_id = await st.db.fetchval("SELECT id FROM backup_repositories WHERE name = 'primary'")
    if repository_id is None:
        repository_id = await create_local_repository(oma, "primary", repo_root)
    states = tmp_path / "states"
    states.mkdir(exist_ok=True)
    return BackupLab(oma, vma, disk, repository_id, repo_root, states)


async def test_full_then_incrementals_make_a_chain_equal_to_the_disk_at_each_point(lab: BackupLab) -> None:
    engine = lab.st.backup_engine
    assert engine is not None

    async def hook(backup_id: str) -> None:
        lab.hooked.append(backup_id)

    engine.after_backup = hook
    started = await lab.start("full", tags={"purpose": "test"})
    assert started["status"] in ("pending", "running") and started["backup_type"] == "full"
    # keyed by the VM's identity (its moref in its vCenter), never its name
    vcenter = await lab.db.fetchval("SELECT vcenter_host FROM vm_contexts WHERE vm_name = 'app01'")
    assert started["vm_key"] == vm_key(vcenter, "vm-201")
    assert started["file_path"] == str(
        lab.repo_root / vm_dir(started["vm_key"]) / "disk-2000" / f"{started['backup_id']}.qcow2"
    )
    assert started["progress_percent"] == 0 and started["chain_id"] == started["backup_id"]
    full = await lab.wait(started["backup_id"])
    assert full["status"] == "completed", full
    lab.keep_state(full["backup_id"])
    points = [full]
    for i in range(3):  # small writes between the points: one inside written data, one fresh
        lab.disk.write((i + 1) * MiB + 4096, pattern(10 + i, 64 * 1024))
        lab.disk.write((20 + i) * MiB, pattern(20 + i, 128 * 1024))
        points.append(await lab.backup("incremental"))

    for prev, point in itertools.pairwise(points):
        assert point["backup_type"] == point["requested_type"] == "incremental"
        assert point["parent_backup_id"] == prev["backup_id"]
        assert point["chain_id"] == full["backup_id"]
        assert point["changed_bytes"] == 192 * 1024  # exactly the areas written since the parent
        assert point["stored_bytes"] < 2 * MiB  # an overlay: headers, tables and the changed clusters
    assert full["changed_bytes"] == 5 * MiB and full["virtual_size_bytes"] == DISK_SIZE
    assert full["parent_backup_id"] is None and full["tags"] == {"purpose": "test"}
    assert [p["copy_mode"] for p in points] == ["full", "incremental", "incremental", "incremental"]

    for point in points:
        path = Path(point["file_path"])
        assert_point_is(path, lab.state(point["backup_id"]))
        report = await mover.verify(str(path))
        assert report.ok and report.found_digest == point["disk_digest"]
        expected = await mover.checksum(str(lab.state(point["backup_id"])))
        assert expected.disk_digest == point["disk_digest"]
        assert manifest_path(path).is_file()
        assert point["progress_percent"] == 100 and point["completed_at"] and point["change_id"]
        assert point["locked_until"] is None and point["error_message"] is None

    # what the VMA was asked: a full pass, then each pass from its parent's change ID; all released
    exports = [b for _, path, b in lab.vma.requests if path == "/api/v1/replicate"]
    assert [e["previous_change_ids"]["/LabDC/vm/app01"]["disk-2000"] for e in exports] == [
        None,
        *(p["change_id"] for p in points[:-1]),
    ]
    assert exports[0]["disks"] == {"/LabDC/vm/app01": ["disk-2000"]} and exports[0]["mode"] == "export"
    assert lab.vma.releases == [p["backup_id"] for p in points]
    assert not list(lab.vma.work_dir.iterdir())  # type: ignore[union-attr]  # snapshots removed
    assert lab.hooked == [p["backup_id"] for p in points]

    # the chain, by name or context, disk id, key or index
    ctx = (await lab.oma.get("/vm-contexts/app01")).json()["context"]["context_id"]
    for params in (
        {"vm_name": "app01"},
        {"vm_context_id": ctx, "disk_id": "disk-2000"},
        {"vm_name": "app01", "disk_id": "2000", "repository_id": lab.repository_id},
    ):
        chain = (await lab.oma.get("/backup/chain", params=params)).json()
        assert chain["chain_id"] == chain["full_backup_id"] == full["backup_id"], chain
        assert [b["backup_id"] for b in chain["backups"]] == [p["backup_id"] for p in points]
        assert chain["backup_count"] == 4
        assert chain["total_size_bytes"] == sum(p["stored_bytes"] for p in points)
    other = (await lab.oma.get("/backup/chain", params={"vm_name": "app01", "disk_id": "1"})).json()
    assert other["disk_id"] == "disk-2001" and other["chain_id"] is None and other["backups"] == []

    # list filters (and /backup/list is not read as a backup id)
    async def listed(**params: str) -> list[str]:
        r = await lab.oma.get("/backup/list", params=params)
        assert r.status_code == 200, r.text
        assert r.json()["total"] == len(r.json()["backups"])
        return [b["backup_id"] for b in r.json()["backups"]]

    newest_first = [p["backup_id"] for p in reversed(points)]
    assert await listed() == newest_first
    assert await listed(backup_type="incremental") == newest_first[:3]
    assert await listed(backup_type="full", vm_name="app01", status="completed") == [full["backup_id"]]
    assert await listed(vm_context_id=ctx, repository_id=lab.repository_id) == newest_first
    assert await listed(vm_name="other") == []
    assert await listed(status="failed") == []
    page = (await lab.oma.get("/backup/list", params={"limit": 1, "offset": 1})).json()
    assert [b["backup_id"] for b in page["backups"]] == newest_first[1:2] and page["total"] == 4
    listed_full = (await lab.oma.get("/backup/list", params={"backup_type": "full"})).json()["backups"][0]
    assert listed_full == full  # a list item reads like the single answer

    # delete the newest point: its files and row go, the rest of the chain stays valid
    newest = points[-1]
    r = await lab.oma.delete(f"/backup/{newest['backup_id']}")
    assert r.status_code == 200, r.text
    assert r.json()["backup_id"] == newest["backup_id"] and "merged_into" not in r.json()
    assert not Path(newest["file_path"]).exists() and not manifest_path(Path(newest["file_path"])).exists()
    assert (await lab.oma.get(f"/backup/{newest['backup_id']}")).status_code == 404
    chain = (await lab.oma.get("/backup/chain", params={"vm_name": "app01"})).json()
    assert chain["backup_count"] == 3
    # the next incremental builds on the point that is now the newest
    lab.disk.write(50 * MiB, pattern(40, 4096))
    again = await lab.backup("incremental")
    assert again["parent_backup_id"] == points[2]["backup_id"]
    assert_point_is(Path(again["file_path"]), lab.state(again["backup_id"]))

    # delete the full: merged into its child, which becomes the chain's full with the same data;
    # a middle increment is refused
    r = await lab.oma.delete(f"/backup/{points[2]['backup_id']}")
    assert r.status_code == 409 and r.json()["code"] == "CHAIN_DEPENDENCY", r.text
    r = await lab.oma.delete(f"/backup/{full['backup_id']}")
    assert r.status_code == 200 and r.json()["merged_into"] == points[1]["backup_id"], r.text
    chain = (await lab.oma.get("/backup/chain", params={"vm_name": "app01"})).json()
    assert chain["full_backup_id"] == points[1]["backup_id"] and chain["backup_count"] == 3
    merged = await lab.get(points[1]["backup_id"])
    assert merged["backup_type"] == "full" and merged["parent_backup_id"] is None
    for point in (merged, again):
        assert_point_is(Path(point["file_path"]), lab.state(point["backup_id"]))


async def test_progress_is_written_while_the_copy_runs(lab: BackupLab) -> None:
    lab.vma.read_rate = "16M"  # 2 MB/s: the 5 MiB full takes about 2.5 s
    started = await lab.start("full")
    seen: list[tuple[float, int]] = []
    with trio.fail_after(30):
        while (point := await lab.get(started["backup_id"]))["status"] in ("pending", "running"):
            if point["current_operation"].startswith("Copying"):
                seen.append((point["progress_percent"], point["bytes_transferred"]))
            await trio.sleep(0.1)
    assert point["status"] == "completed" and point["progress_percent"] == 100
    assert point["bytes_transferred"] == point["changed_bytes"] == 5 * MiB
    midway = [s for s in seen if 0 < s[0] < 100]
    assert midway and all(0 < b < 5 * MiB for _, b in midway), seen
    assert seen == sorted(seen)  # never backwards


async def test_points_in_an_immutable_repository_are_locked(lab: BackupLab, tmp_path: Path) -> None:
    locked_repo = await create_local_repository(
        lab.oma, "vault", tmp_path / "vault", immutable=True, immutable_days=7
    )
    point = await lab.backup("full", repository_id=locked_repo)
    created = dt.datetime.fromisoformat(point["created_at"])
    assert dt.datetime.fromisoformat(point["locked_until"]) == created + dt.timedelta(days=7)
    listed = (await lab.oma.get("/backup/list", params={"repository_id": locked_repo})).json()
    assert listed["backups"][0]["locked_until"] == point["locked_until"]
    r = await lab.oma.delete(f"/backup/{point['backup_id']}")
    assert r.status_code == 409 and r.json()["code"] == "IMMUTABLE", r.text
    assert Path(point["file_path"]).is_file()


async def test_start_validation_and_conflicts(tmp_path: Path, oma_dsn: str, vma: VmaDouble) -> None:
    # the engine off: backups stay pending, so "one active backup per disk" can be watched
    config = make_config(tmp_path, oma_dsn, vma.base_url, run_backups=False)
    async with run_oma(config) as oma:
        lab = await setup_lab(oma, vma, tmp_path)
        base = {
            "vm_name": "app01",
            "disk_id": "disk-2000",
            "backup_type": "full",
            "repository_id": lab.repository_id,
        }

        async def start(expect: int, code: str | None = None, **changes: Any) -> dict[str, Any]:
            body = {k: v for k, v in {**base, **changes}.items() if v is not None}
            r = await oma.post("/backup/start", json=body)
            assert r.status_code == expect, r.text
            answer: dict[str, Any] = r.json()
            if code is not None:
                assert answer["code"] == code and answer["error"] and answer["timestamp"], answer
            return answer

        await start(422, "VALIDATION_FAILED", backup_type="differential")
        await start(422, "VALIDATION_FAILED", vm_name="")
        await start(422, "VALIDATION_FAILED", tags={"k": 5})
        r = await oma.post(
            "/backup/start", content=b"{not json", headers={**oma.auth, "Content-Type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST"
        body = dict(base)
        del body["disk_id"]
        assert (await oma.post("/backup/start", json=body)).status_code == 422
        await start(404, "NOT_FOUND", vm_name="ghost")
        await start(422, "VALIDATION_FAILED", disk_id="disk-9999")
        await start(422, "VALIDATION_FAILED", repository_id=None)
        await start(404, "NOT_FOUND", repository_id="repo-none")
        disabled = await create_local_repository(oma, "off", tmp_path / "off", enabled=False)
        await start(409, "CONFLICT", repository_id=disabled)
        assert "disabled" in (await start(409, repository_id=disabled))["error"]
        no_parent = await start(409, "NO_PARENT", backup_type="incremental")
        assert "full" in no_parent["error"]
        unauthenticated = await oma.post("/backup/start", json=base, headers={})
        assert unauthenticated.status_code == 401

        # policies: the primary repository is the policy's
        other = await create_local_repository(oma, "other", tmp_path / "other")
        r = await oma.post(
            "/policies",
            json={"name": "daily", "primary_repository_id": lab.repository_id, "retention_days": 7},
        )
        assert r.status_code == 201, r.text
        policy_id = r.json()["id"]
        await start(404, "NOT_FOUND", policy_id="pol-none")
        mismatch = await start(422, "VALIDATION_FAILED", policy_id=policy_id, repository_id=other)
        assert lab.repository_id in mismatch["error"]

        # two starts for one disk at once: one backup, one 409
        async with trio.open_nursery() as nursery:
            answers: list[Any] = []

            async def race() -> None:
                answers.append(
                    await oma.post(
                        "/backup/start",
                        json={**base, "repository_id": None, "policy_id": policy_id, "disk_id": "0"},
                    )
                )

            nursery.start_soon(race)
            nursery.start_soon(race)
        assert sorted(a.status_code for a in answers) == [202, 409], [a.text for a in answers]
        accepted = next(a.json() for a in answers if a.status_code == 202)
        refused = next(a.json() for a in answers if a.status_code == 409)
        assert accepted["backup_id"] in refused["error"] and refused["code"] == "CONFLICT"
        assert accepted["policy_id"] == policy_id and accepted["repository_id"] == lab.repository_id
        assert accepted["disk_id"] == "disk-2000" and accepted["status"] == "pending"
        # another disk of the VM is free; a running backup cannot be deleted
        assert (await start(202, disk_id="1"))["disk_id"] == "disk-2001"
        r = await oma.delete(f"/backup/{accepted['backup_id']}")
        assert r.status_code == 409 and "pending" in r.json()["error"]

        # reads: unknown ids, bad filters, the chain's required VM
        assert (await oma.get("/backup/backup-none")).json()["code"] == "NOT_FOUND"
        assert (await oma.delete("/backup/backup-none")).status_code == 404
        assert (await oma.get("/backup/list", params={"status": "lost"})).status_code == 400
        assert (await oma.get("/backup/list", params={"limit": 0})).status_code == 400
        listed = (await oma.get("/backup/list", params={"status": "pending"})).json()
        assert listed["total"] == 2
        assert (await oma.get("/backup/chain")).status_code == 400
        assert (await oma.get("/backup/chain", params={"vm_name": "ghost"})).status_code == 404
        assert (await oma.get("/backup/chain", params={"vm_context_id": "ctx-none"})).status_code == 404
        assert (
            await oma.get("/backup/chain", params={"vm_name": "app01", "disk_id": "7"})
        ).status_code == 404
        empty = (await oma.get("/backup/chain", params={"vm_name": "app01"})).json()
        assert empty["chain_id"] is None and empty["backup_count"] == 0 and empty["disk_id"] == "disk-2000"

        # two engines on one database never claim the same backup
        resolve_login = functools.partial(vmware.resolve_login, lab.db, lab.st.box)
        engines = [BackupEngine(oma.config, lab.db, lab.st.vma, lab.st.box, resolve_login) for _ in range(2)]
        claimed: list[list[str]] = [[], []]

        async def claim(n: int) -> None:
            for _ in range(3):
                claimed[n].extend(r["id"] for r in await engines[n].claim(1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(claim, 0)
            nursery.start_soon(claim, 1)
        assert not set(claimed[0]) & set(claimed[1])
        rows = await lab.db.fetch("SELECT id, status, claimed_by FROM backup_jobs")
        assert sorted(claimed[0] + claimed[1]) == sorted(r["id"] for r in rows)
        assert {r["status"] for r in rows} == {"running"}
        assert {r["claimed_by"] for r in rows} <= {e.engine_id for e in engines}


def test_disk_ids_resolve_like_replication() -> None:
    known = ["disk-2000", "disk-2001"]
    assert resolve_disk_id("disk-2001", known) == "disk-2001"
    assert resolve_disk_id("2001", known) == "disk-2001"
    assert resolve_disk_id("1", known) == "disk-2001"
    assert resolve_disk_id("0", known) == "disk-2000"
    assert resolve_disk_id("2", known) is None
    assert resolve_disk_id("disk-3000", known) is None


async def test_a_failed_copy_leaves_nothing_and_the_next_incremental_builds_on_the_last_good_point(
    lab: BackupLab,
) -> None:
    full = await lab.backup("full")
    lab.disk.write(8 * MiB, pattern(3, 4 * MiB))
    lab.vma.read_delay = "2"  # slow reads: the copy is still running when its export dies
    started = await lab.start("incremental")
    with trio.fail_after(20):
        while (await lab.get(started["backup_id"]))["current_operation"].startswith("Copying") is False:
            await trio.sleep(0.05)
    await trio.sleep(0.3)
    await lab.vma.kill_export(started["backup_id"])
    failed = await lab.wait(started["backup_id"])
    assert failed["status"] == "failed" and "nbdkit serving the disk exited" in failed["error_message"]
    assert failed["file_path"] is None and failed["parent_backup_id"] is None
    assert lab.files() == sorted([Path(full["file_path"]).name, manifest_path(Path(full["file_path"])).name])
    assert started["backup_id"] in lab.vma.releases

    lab.vma.read_delay = None
    lab.disk.write(30 * MiB, pattern(4, 4096))
    good = await lab.backup("incremental")
    assert good["parent_backup_id"] == full["backup_id"] and good["backup_type"] == "incremental"
    assert good["changed_bytes"] == 4 * MiB + 4096  # every change since the last good point
    assert_point_is(Path(good["file_path"]), lab.state(good["backup_id"]))
    chain = (await lab.oma.get("/backup/chain", params={"vm_name": "app01"})).json()
    assert [b["backup_id"] for b in chain["backups"]] == [full["backup_id"], good["backup_id"]]

    # a failed point can be deleted (its row), and never counts as a parent
    assert (await lab.oma.delete(f"/backup/{failed['backup_id']}")).status_code == 200
    listed = (await lab.oma.get("/backup/list", params={"status": "failed"})).json()
    assert listed["total"] == 0


async def test_export_failures_fail_the_backup_with_the_vma_reason(lab: BackupLab) -> None:
    lab.vma.fail_next_export = "vCenter refused the snapshot: disk is locked"
    started = await lab.start("full")
    failed = await lab.wait(started["backup_id"])
    assert failed["status"] == "failed" and "disk is locked" in failed["error_message"]
    assert lab.files() == [] and started["backup_id"] in lab.vma.releases
    # a VMA that restarts while it snapshots (it forgets the job)
    lab.vma.export_delay = 1.0
    started = await lab.start("full")
    with trio.fail_after(10):
        while started["backup_id"] not in lab.vma.export_jobs:
            await trio.sleep(0.02)
    del lab.vma.export_jobs[started["backup_id"]]
    failed = await lab.wait(started["backup_id"])
    assert "no longer knows the export job" in failed["error_message"], failed
    lab.vma.export_delay = 0.0
    # a VMA serving another disk than the one asked for
    lab.vma.export_disks.pop(("/LabDC/vm/app01", "disk-2000"))
    failed = await lab.wait((await lab.start("full"))["backup_id"])
    assert "has no disk disk-2000" in failed["error_message"]
    # an unreachable VMA (the tunnel is down)
    real_url, lab.st.vma.base_url = lab.st.vma.base_url, "http://127.0.0.1:9"
    failed = await lab.wait((await lab.start("full"))["backup_id"])
    assert "unreachable" in failed["error_message"] and lab.files() == []
    lab.st.vma.base_url = real_url


async def test_a_cbt_reset_makes_the_incremental_a_full_on_a_new_chain(lab: BackupLab) -> None:
    first = await lab.backup("full")
    lab.disk.reset_cbt()
    lab.disk.write(12 * MiB, pattern(5, MiB))
    point = await lab.backup("incremental")
    assert point["requested_type"] == "incremental" and point["backup_type"] == "full"
    assert point["parent_backup_id"] is None and point["chain_id"] == point["backup_id"]
    assert point["changed_bytes"] == 6 * MiB  # the source's whole allocation map
    assert point["copy_mode"] == "full-cbt-reset"
    assert_point_is(Path(point["file_path"]), lab.state(point["backup_id"]))
    assert run("qemu-img", "info", "--output=json", point["file_path"]).stdout.count("backing-filename") == 0
    chain = (await lab.oma.get("/backup/chain", params={"vm_name": "app01"})).json()
    assert chain["chain_id"] == point["backup_id"] and chain["backup_count"] == 1
    assert (await lab.get(first["backup_id"]))["status"] == "completed"  # the old chain stays
    # and the next incremental builds on the new full
    lab.disk.write(13 * MiB, pattern(6, 4096))
    nxt = await lab.backup("incremental")
    assert nxt["parent_backup_id"] == point["backup_id"] and nxt["chain_id"] == point["backup_id"]
    assert_point_is(Path(nxt["file_path"]), lab.state(nxt["backup_id"]))


async def export_as_a_dead_engine_left_it(oma: Oma, vma: VmaDouble, backup_id: str) -> None:
    """The export a backup engine had asked the VMA for before its process died (signed as the
    OMA signs its requests)."""
    r = await oma.client.post(
        f"{vma.base_url}/api/v1/replicate",
        auth=SignedAuth(lambda: vma.secret),
        json={
            "job_id": backup_id,
            "mode": "export",
            "username": vma.username,
            "password": vma.password,
            "vm_paths": ["/LabDC/vm/app01"],
            "disks": {"/LabDC/vm/app01": ["disk-2000"]},
        },
    )
    assert r.status_code == 200, r.text


async def test_restart_fails_the_backups_of_a_dead_process_and_shutdown_fails_its_own(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    base = make_config(tmp_path, oma_dsn, vma.base_url, engine_poll_interval=0.1)
    async with run_oma(base.with_overrides(run_backups=False)) as oma:
        lab = await setup_lab(oma, vma, tmp_path)
        started = await lab.start("full")
        # as a process that died mid-copy leaves it: claimed, running, a partial image, an export
        partial = Path(started["file_path"])
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"QFI\xfb partial")
        manifest_path(partial).write_bytes(b"partial")
        await lab.db.execute(
            "UPDATE backup_jobs SET status = 'running', claimed_by = $2, started_at = now() WHERE id = $1",
            started["backup_id"],
            f"{socket.gethostname()}:999999999:dead",
        )
        await export_as_a_dead_engine_left_it(oma, vma, started["backup_id"])

    async with run_oma(base) as oma:
        lab = await setup_lab(oma, vma, tmp_path)
        recovered = await lab.wait(started["backup_id"])
        assert recovered["status"] == "failed" and "999999999" in recovered["error_message"]
        assert not partial.exists() and not manifest_path(partial).exists()
        assert recovered["file_path"] is None
        assert started["backup_id"] in vma.releases
        # the disk's slot is free again; stop the OMA in the middle of the next backup's copy
        vma.read_delay = "3"  # every read takes 3 s: the OMA stops long before the copy ends
        running = await lab.start("full")
        with trio.fail_after(20):
            while not (await lab.get(running["backup_id"]))["current_operation"].startswith("Copying"):
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        progress = await lab.get(running["backup_id"])
        assert progress["status"] == "running"

    async with run_oma(base.with_overrides(run_backups=False)) as oma:
        lab = await setup_lab(oma, vma, tmp_path)
        ended = await lab.get(running["backup_id"])
        assert ended["status"] == "failed" and "shut down" in ended["error_message"], ended
        assert running["backup_id"] in vma.releases
        assert lab.files() == []
    shutil.rmtree(lab.repo_root, ignore_errors=True)


async def test_points_of_a_policy_are_copied_through_the_after_backup_hook(
    lab: BackupLab, tmp_path: Path
) -> None:
    """The hook as the app wires it (``enqueue_policy_copies``): the copy worker copies each new
    point of a policy with a copy rule, an incremental's copy built on its parent's copy."""
    engine = lab.st.backup_engine
    assert engine is not None
    db = lab.db
    engine.after_backup = functools.partial(enqueue_policy_copies, db)
    offsite = await create_local_repository(lab.oma, "offsite", tmp_path / "offsite")
    r = await lab.oma.post(
        "/policies",
        json={
            "name": "3-2-1",
            "primary_repository_id": lab.repository_id,
            "retention_days": 7,
            "copy_rules": [{"destination_repository_id": offsite}],
        },
    )
    assert r.status_code == 201, r.text
    policy_id = r.json()["id"]
    full = await lab.backup("full", policy_id=policy_id, repository_id=None)
    lab.disk.write(3 * MiB, pattern(9, 64 * 1024))
    incremental = await lab.backup("incremental", policy_id=policy_id, repository_id=None)
    for point in (full, incremental):
        (copy,) = await wait_for_copies(lab.oma, point["backup_id"])
        assert copy["status"] == "completed" and copy["verified"], copy
        assert copy["repository_id"] == offsite and copy["disk_digest"] == point["disk_digest"]
        assert_point_is(Path(copy["file_path"]), lab.state(point["backup_id"]))


async def test_migration_008_keys_existing_points_by_identity(oma_dsn: str) -> None:
    """Points made before backups were keyed by identity get the identity of their VM context
    when the context still describes the VM they were exported from; a point whose context now
    names another VM (one name, two VMs) keeps a key of its own, so no new backup builds on it;
    two active backups that turn out to be of one VM disk keep the older one."""
    migrations = load_migrations(MIGRATIONS_DIR)
    async with open_database(oma_dsn, min_size=1, max_size=1) as db:
        await apply_migrations(db, [m for m in migrations if m.version <= 5])
        await db.execute(
            "INSERT INTO vm_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host)"
            " VALUES ('ctx-a', 'dupa', 'vm-7', '/DC0/vm/f2/dupa', 'vc1'),"
            " ('ctx-b', 'web', 'vm-8', '/DC0/vm/web', 'vc1'), ('ctx-c', 'old', NULL, '/DC0/vm/old', 'vc1')"
        )
        await db.execute(
            "INSERT INTO backup_repositories (id, name, type, config) VALUES ('repo-1', 'r', 'local', '{}')"
        )
        rows = [  # id, context, vm_name, vm_path, status, created
            ("backup-1", "ctx-a", "dupa", "/DC0/vm/dupa", "completed", 1),  # context re-pointed since
            ("backup-2", "ctx-a", "dupa", "/DC0/vm/f2/dupa", "completed", 2),
            ("backup-3", "ctx-b", "web", "/DC0/vm/web", "running", 3),
            ("backup-4", None, "gone", "/DC0/vm/gone", "completed", 4),
            ("backup-5", "ctx-c", "old", "/DC0/vm/old", "completed", 5),
        ]
        for backup_id, ctx, name, path, status, minute in rows:
            await db.execute(
                "INSERT INTO backup_jobs (id, vm_context_id, vm_name, vm_path, disk_id, backup_type,"
                " requested_type, repository_id, chain_id, status, created_at)"
                " VALUES ($1, $2, $3, $4, 'disk-2000', 'full', 'full', 'repo-1', $1, $5,"
                " now() - make_interval(mins => 10 - $6))",
                backup_id,
                ctx,
                name,
                path,
                status,
                minute,
            )
        # one VM under two names (a rename, then a second context): both had a backup in flight
        await db.execute("UPDATE vm_contexts SET vm_name = 'web-old' WHERE context_id = 'ctx-b'")
        await db.execute(
            "INSERT INTO vm_contexts (context_id, vm_name, vmware_vm_id, vm_path, vcenter_host)"
            " VALUES ('ctx-d', 'web-new', 'vm-8', '/DC0/vm/web', 'vc1')"
        )
        await db.execute(
            "INSERT INTO backup_jobs (id, vm_context_id, vm_name, vm_path, disk_id, backup_type,"
            " requested_type, repository_id, chain_id, status)"
            " VALUES ('backup-6', 'ctx-d', 'web-new', '/DC0/vm/web', 'disk-2000', 'full', 'full', 'repo-1',"
            " 'backup-6', 'pending')"
        )
        await apply_migrations(db, migrations)
        got = {
            r["id"]: (r["vm_key"], r["status"])
            for r in await db.fetch("SELECT id, vm_key, status FROM backup_jobs ORDER BY id")
        }
        assert got == {
            "backup-1": ("path:/DC0/vm/dupa", "completed"),
            "backup-2": (vm_key("vc1", "vm-7"), "completed"),
            "backup-3": (vm_key("vc1", "vm-8"), "running"),
            "backup-4": ("path:/DC0/vm/gone", "completed"),
            # migration 006 gives a context with no managed object id the identity of its path,
            # which new backups of that context use too: its chain goes on
            "backup-5": (vm_key("vc1", "path:/DC0/vm/old"), "completed"),
            "backup-6": (vm_key("vc1", "vm-8"), "failed"),
        }
        with pytest.raises(UniqueViolation):  # one backup in flight per VM disk, whatever its name
            await db.execute(
                "INSERT INTO backup_jobs (id, vm_name, vm_key, vm_path, disk_id, backup_type, requested_type,"
                " repository_id, chain_id, status) VALUES ('backup-7', 'other-name', $1, '/x', 'disk-2000',"
                " 'full', 'full', 'repo-1', 'backup-7', 'pending')",
                vm_key("vc1", "vm-8"),
            )


async def test_a_backup_whose_lease_expired_is_taken_over_by_a_live_engine(
    tmp_path: Path, oma_dsn: str, vma: VmaDouble
) -> None:
    """Two backups claimed by engines on another host: one claimed long ago and never renewed (its
    OMA died), one whose lease runs for an hour. A live engine takes the first over — its export
    released, its partial image removed, the backup failed with the reason — and leaves the
    second to its owner."""
    base = make_config(tmp_path, oma_dsn, vma.base_url, engine_poll_interval=0.1)
    async with run_oma(base.with_overrides(run_backups=False)) as oma:
        lab = await setup_lab(oma, vma, tmp_path)
        dead = await lab.start("full")
        partial = Path(dead["file_path"])
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"QFI\xfb partial")
        await lab.db.execute(
            "UPDATE backup_jobs SET status = 'running', claimed_by = 'elsewhere:4242@1:dead0000',"
            " claimed_at = now() - interval '1 hour', started_at = now() WHERE id = $1",
            dead["backup_id"],
        )
        await export_as_a_dead_engine_left_it(oma, vma, dead["backup_id"])
        live = await lab.start("full", disk_id="disk-2001")
        await lab.db.execute(
            "UPDATE backup_jobs SET status = 'running', claimed_by = 'elsewhere:4243@1:live0000',"
            " claimed_at = now(), lease_expires_at = now() + interval '1 hour', started_at = now()"
            " WHERE id = $1",
            live["backup_id"],
        )

    async with run_oma(base.with_overrides(job_lease_ttl=1.0)) as oma:
        lab = await setup_lab(oma, vma, tmp_path)
        taken = await lab.wait(dead["backup_id"])
        assert taken["status"] == "failed", taken
        assert "elsewhere:4242@1:dead0000" in taken["error_message"]
        assert "lease expired" in taken["error_message"]
        assert dead["backup_id"] in vma.releases
        assert not partial.exists()
        await trio.sleep(2.0)  # several takeover rounds (every lease_ttl / 2)
        assert (await lab.get(live["backup_id"]))["status"] == "running"
        claimed_by = await lab.db.fetchval(
            "SELECT claimed_by FROM backup_jobs WHERE id = $1", live["backup_id"]
        )
        assert claimed_by == "elsewhere:4243@1:live0000"
        await lab.db.execute(
            "UPDATE backup_jobs SET status = 'failed', completed_at = now() WHERE id = $1", live["backup_id"]
        )
    shutil.rmtree(lab.repo_root, ignore_errors=True)
