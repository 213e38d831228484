"""Replication end to end: the lab's vCenter and disk images, the VMA over real HTTP, the OMA
double, and ``qemu-nbd`` exports of raw files as the targets (``--shared=8``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import trio

from lab import DiskSpec, Lab, LabVM, MiB
from pyapp.nbd_export import NbdExport
from tests.mover.conftest import Nbdkit, flushless_nbdkit_args
from tests.vma.conftest import (
    VM_PATH,
    StartVma,
    Vma,
    images_equal,
    make_snapshot,
    new_target,
    replicate_body,
    snapshot_names,
)
from tests.vma.oma_double import OmaDouble


@contextmanager
def exports(tmp_path: Path, vm: LabVM, tag: str = "t") -> Iterator[tuple[list[Path], list[NbdExport]]]:
    """One raw target file per disk, served by qemu-nbd with room for the mover's connections."""
    files = [new_target(tmp_path / f"{tag}-{d.key}.raw", d.capacity) for d in vm.disks]
    with ExitStack() as stack:
        served = [
            stack.enter_context(NbdExport(f, name=f"disk-{d.key}", shared=8))
            for f, d in zip(files, vm.disks, strict=True)
        ]
        yield files, served


def request(lab: Lab, job_id: str, oma: OmaDouble, served: list[NbdExport], vm: LabVM) -> dict[str, Any]:
    targets = {VM_PATH: {f"disk-{d.key}": e.uri for d, e in zip(vm.disks, served, strict=True)}}
    return replicate_body(lab, job_id, targets=targets)


async def replicate(vma: Vma, body: dict[str, Any]) -> dict[str, Any]:
    r = await vma.post("/api/v1/replicate", body)
    assert r.status_code == 200, r.text
    started = r.json()
    assert started["job_id"] == body["job_id"] and started["status"] == "started"
    assert started["vm_count"] == len(body["vm_paths"])
    return await vma.wait_job(body["job_id"])


def written(progress: dict[str, Any]) -> int:
    return sum(d["bytes_written"] + d["bytes_zeroed"] for d in progress["disks"])


async def test_full_then_incremental(tmp_path: Path, vma: Vma, lab: Lab, vm1: LabVM, oma: OmaDouble) -> None:
    with exports(tmp_path, vm1) as (targets, served):
        # Pass 1: no change ID at the OMA -> full pass ("*": the allocated areas).
        p1 = await replicate(vma, request(lab, "repl-1", oma, served, vm1))
        assert p1["status"] == "completed", p1
        assert p1["progress_percent"] == 100.0
        assert {d["mode"] for d in p1["disks"]} == {"full"}
        for target, disk in zip(targets, vm1.disks, strict=True):
            assert images_equal(target, disk.image)  # nothing wrote to the VM during the pass
        assert await trio.to_thread.run_sync(snapshot_names, lab, "vm1") == []
        stored = {p["disk_id"]: p["change_id"] for p in oma.change_id_posts}
        assert set(stored) == {f"disk-{d.key}" for d in vm1.disks}
        assert all(p["vm_path"] == VM_PATH and p["job_id"] == "repl-1" for p in oma.change_id_posts)
        assert oma.replications["repl-1"]["status"] == "completed"
        assert any(u.get("status") == "replicating" for _, u in oma.updates)
        # The blank second disk is all holes: nothing to move.
        assert p1["disks"][1]["bytes_total"] == 0

        # The guest writes: 6 x 64 KiB on disk 0, 2 x 64 KiB on disk 1.
        changed = [
            vm1.disks[0].guest.rewrite_random_chunks(6, chunk=64 * 1024, seed=7),
            vm1.disks[1].guest.rewrite_random_chunks(2, chunk=64 * 1024, seed=8),
        ]
        changed_bytes = sum(n for areas in changed for _, n in areas)

        # Pass 2: incremental from the stored change IDs; only the changed extents travel.
        p2 = await replicate(vma, request(lab, "repl-2", oma, served, vm1))
        assert p2["status"] == "completed", p2
        assert {d["mode"] for d in p2["disks"]} == {"incremental"}
        assert p2["total_bytes"] == changed_bytes
        assert changed_bytes <= written(p2) <= changed_bytes + 64 * 1024
        assert written(p2) < sum(d.capacity for d in vm1.disks) // 20
        for target, disk in zip(targets, vm1.disks, strict=True):
            assert images_equal(target, disk.image)
        assert await trio.to_thread.run_sync(snapshot_names, lab, "vm1") == []
        new = {p["disk_id"]: p["change_id"] for p in oma.change_id_posts if p["job_id"] == "repl-2"}
        assert set(new) == set(stored)
        assert all(new[k] != stored[k] for k in new)  # the base advanced
        # The artifacts of the jobs hold no password.
        assert not list(vma.config.work_dir.rglob("vcenter.pass"))


async def test_cbt_reset_forces_a_full_pass(
    tmp_path: Path, vma: Vma, lab: Lab, vm1: LabVM, oma: OmaDouble
) -> None:
    with exports(tmp_path, vm1) as (targets, served):
        p1 = await replicate(vma, request(lab, "repl-a", oma, served, vm1))
        assert p1["status"] == "completed", p1
        for disk in vm1.disks:
            disk.guest.reset_cbt()  # vSphere reset change tracking (e.g. after a storage move)
        vm1.disks[0].guest.rewrite_random_chunks(3, chunk=64 * 1024, seed=3)
        p2 = await replicate(vma, request(lab, "repl-b", oma, served, vm1))
        assert p2["status"] == "completed", p2
        assert {d["mode"] for d in p2["disks"]} == {"full-cbt-reset"}
        for target, disk in zip(targets, vm1.disks, strict=True):
            assert images_equal(target, disk.image)
        # the new change IDs are from the new epoch
        uuids = {p["change_id"].rpartition("/")[0] for p in oma.change_id_posts if p["job_id"] == "repl-b"}
        old = {p["change_id"].rpartition("/")[0] for p in oma.change_id_posts if p["job_id"] == "repl-a"}
        assert not uuids & old


async def test_pre_existing_snapshot_is_never_touched(
    tmp_path: Path, vma: Vma, lab: Lab, vm1: LabVM, oma: OmaDouble
) -> None:
    moref = await trio.to_thread.run_sync(make_snapshot, lab, "vm1", "operator-backup")
    with exports(tmp_path, vm1) as (targets, served):
        p = await replicate(vma, request(lab, "repl-x", oma, served, vm1))
        assert p["status"] == "completed", p
        for target, disk in zip(targets, vm1.disks, strict=True):
            assert images_equal(target, disk.image)
        r = await vma.post("/api/v1/cleanup", {"job_id": "repl-x", "action": "cleanup_all"})
        assert r.status_code == 200 and r.json()["status"] == "success", r.text
    assert await trio.to_thread.run_sync(snapshot_names, lab, "vm1") == [("operator-backup", moref)]


async def test_single_disk_target_from_put_config(tmp_path: Path, vma: Vma, lab: Lab, oma: OmaDouble) -> None:
    vm = await trio.to_thread.run_sync(lambda: lab.create_vm("solo", [DiskSpec(8 * MiB)]))
    vm.disks[0].guest.write(MiB, b"solo data" * 100)
    target = new_target(tmp_path / "solo.raw", vm.disks[0].capacity)
    with NbdExport(target, name="migration-solo", shared=8) as export:
        r = await vma.put("/api/v1/config", {"nbd_port": export.port, "export_name": "migration-solo"})
        assert r.status_code == 200
        body = {
            "job_id": "repl-solo",
            "vcenter": lab.url,
            "username": lab.username,
            "password": lab.password,
            "vm_paths": ["/DC0/vm/solo"],
        }
        p = await replicate(vma, body)
        assert p["status"] == "completed", p
    assert images_equal(target, vm.disks[0].image)


async def test_the_request_says_what_each_target_holds(
    tmp_path: Path, vma: Vma, lab: Lab, vm1: LabVM, oma: OmaDouble
) -> None:
    """The OMA's request gives each target's base (``base_change_id``): the VMA builds on that, not
    on whatever ``GET /replications/changeid`` answers; null means a full pass that also zeroes
    what it does not list. ``vm_ids``: another VM at the path is never copied."""

    def body(
        job_id: str, served: list[NbdExport], bases: dict[str, str | None], **extra: Any
    ) -> dict[str, Any]:
        targets = {
            VM_PATH: {
                f"disk-{d.key}": {"uri": e.uri, "base_change_id": bases.get(f"disk-{d.key}")}
                for d, e in zip(vm1.disks, served, strict=True)
            }
        }
        return replicate_body(lab, job_id, targets=targets, **extra)

    with exports(tmp_path, vm1, "old") as (_, served):
        p1 = await replicate(vma, request(lab, "repl-o1", oma, served, vm1))
        assert p1["status"] == "completed", p1
    first = {p["disk_id"]: p["change_id"] for p in oma.change_id_posts if p["job_id"] == "repl-o1"}
    vm1.disks[0].guest.rewrite_random_chunks(4, chunk=64 * 1024, seed=5)

    with exports(tmp_path, vm1, "new") as (targets, served):
        # A new volume: the OMA says it holds nothing, although GET /changeid still names a base
        # (as the seed's OMA did for a VM path whatever volume received it).
        assert oma.change_ids
        asked = len([r for r in oma.requests if r[1] == "/api/v1/replications/changeid"])
        p2 = await replicate(vma, body("repl-n1", served, {}))
        assert p2["status"] == "completed", p2
        assert {d["mode"] for d in p2["disks"]} == {"full"}
        for target, disk in zip(targets, vm1.disks, strict=True):
            assert images_equal(target, disk.image)
        second = {p["disk_id"]: p["change_id"] for p in oma.change_id_posts if p["job_id"] == "repl-n1"}
        assert set(second) == set(first)

        # The volume holds pass 2: incremental from the bases the request gives.
        vm1.disks[0].guest.rewrite_random_chunks(3, chunk=64 * 1024, seed=6)
        vm1.disks[1].guest.rewrite_random_chunks(1, chunk=64 * 1024, seed=7)
        p3 = await replicate(vma, body("repl-n2", served, second))
        assert p3["status"] == "completed", p3
        assert {d["mode"] for d in p3["disks"]} == {"incremental"}
        assert written(p3) <= 4 * 64 * 1024 + 64 * 1024
        for target, disk in zip(targets, vm1.disks, strict=True):
            assert images_equal(target, disk.image)
        assert len([r for r in oma.requests if r[1] == "/api/v1/replications/changeid"]) == asked

        # The job was made for another VM than the one now at the path: nothing is copied.
        third = {p["disk_id"]: p["change_id"] for p in oma.change_id_posts if p["job_id"] == "repl-n2"}
        p4 = await replicate(vma, body("repl-n3", served, third, vm_ids={VM_PATH: "vm-999999"}))
        assert p4["status"] == "failed" and "vm-999999" in p4["error"], p4
        assert not [p for p in oma.change_id_posts if p["job_id"] == "repl-n3"]

    # Malformed targets are refused before anything starts.
    bad = body("repl-bad", served, {})
    bad["targets"][VM_PATH][f"disk-{vm1.disks[0].key}"] = {"uri": "nbd://127.0.0.1:1/x"}  # no base_change_id
    r = await vma.post("/api/v1/replicate", bad)
    assert r.status_code == 400 and "base_change_id" in r.json()["error"], r.text
    bad["targets"][VM_PATH][f"disk-{vm1.disks[0].key}"] = {
        "uri": "nbd://127.0.0.1:1/x",
        "base_change_id": "nope",
    }
    assert (await vma.post("/api/v1/replicate", bad)).status_code == 400


async def test_a_pass_into_targets_that_cannot_flush_stores_no_change_id(
    tmp_path: Path, start_vma: StartVma, lab: Lab, vm1: LabVM, oma: OmaDouble
) -> None:
    """A target whose NBD server cannot flush may not keep what it acknowledged: the pass fails
    and its change ID never becomes a base, unless the operator accepts such targets
    (``allow_non_durable_targets``), which stores it."""
    files = [new_target(tmp_path / f"nf-{d.key}.raw", d.capacity) for d in vm1.disks]
    servers = [
        Nbdkit(tmp_path / f"nf-{d.key}.sock", flushless_nbdkit_args(f))
        for f, d in zip(files, vm1.disks, strict=True)
    ]
    try:
        for s in servers:
            s.start()
        targets = {VM_PATH: {f"disk-{d.key}": s.uri for d, s in zip(vm1.disks, servers, strict=True)}}

        strict = await start_vma()
        r = await strict.post(
            "/api/v1/replicate", replicate_body(lab, "repl-nf1", targets=targets)
        )
        assert r.status_code == 200, r.text
        p1 = await strict.wait_job("repl-nf1")
        assert p1["status"] == "failed", p1
        assert "cannot be made durable" in p1["error"] and "does not support flush" in p1["error"]
        assert oma.change_id_posts == []
        assert oma.replications["repl-nf1"]["status"] == "failed"
        assert await trio.to_thread.run_sync(snapshot_names, lab, "vm1") == []

        lenient = await start_vma(allow_non_durable_targets=True)
        r = await lenient.post(
            "/api/v1/replicate", replicate_body(lab, "repl-nf2", targets=targets)
        )
        assert r.status_code == 200, r.text
        p2 = await lenient.wait_job("repl-nf2")
        assert p2["status"] == "completed", p2
        assert {p["disk_id"] for p in oma.change_id_posts} == {f"disk-{d.key}" for d in vm1.disks}
        for target, disk in zip(files, vm1.disks, strict=True):
            assert images_equal(target, disk.image)
    finally:
        for s in servers:
            s.stop()
