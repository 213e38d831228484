"""Several VMs per job, several disks per VM: the VMs run concurrently (each with its own
snapshot), the disks copy under the VMA's bound (``max_parallel_disks``)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import trio

from lab import DiskSpec, Lab, LabVM, MiB
from tests.vma.conftest import StartVma, images_equal, new_target, slow_export, snapshot_names
from tests.vma.oma_double import OmaDouble


async def test_two_vms_two_disks_each_under_a_bound_of_one(
    tmp_path: Path, start_vma: StartVma, lab: Lab, oma: OmaDouble
) -> None:
    vma = await start_vma(max_parallel_disks=1, mover_requests=2, mover_request_size=256 * 1024)

    def make(name: str) -> LabVM:
        vm = lab.create_vm(name, [DiskSpec(8 * MiB), DiskSpec(8 * MiB)])
        for i, disk in enumerate(vm.disks):
            disk.guest.rewrite_random_chunks(2, chunk=MiB, seed=10 + i)
        return vm

    vms = [await trio.to_thread.run_sync(make, n) for n in ("web1", "web2")]
    targets: dict[str, dict[str, str]] = {}
    files: list[tuple[Path, Path]] = []
    with ExitStack() as stack:
        for vm in vms:
            per: dict[str, str] = {}
            for d in vm.disks:
                f = new_target(tmp_path / f"{vm.name}-{d.key}.raw", d.capacity)
                uri, _ = stack.enter_context(slow_export(f, wdelay="100ms"))
                per[f"disk-{d.key}"] = uri
                files.append((f, d.image))
            targets[f"/DC0/vm/{vm.name}"] = per
        body: dict[str, Any] = {
            "job_id": "repl-multi",
            "vcenter": lab.url,
            "username": lab.username,
            "password": lab.password,
            "vm_paths": list(targets),
            "targets": targets,
        }
        r = await vma.post("/api/v1/replicate", body)
        assert r.status_code == 200 and r.json()["vm_count"] == 2
        busy_max, both_snapshots = 0, False
        with trio.fail_after(60):
            while True:
                p = (await vma.get("/api/v1/progress/repl-multi")).json()
                busy = [d for d in p["disks"] if d["phase"] in ("querying", "copying")]
                busy_max = max(busy_max, len(busy))
                both_snapshots = both_snapshots or len(p["snapshots"]) == 2
                if p["status"] in ("completed", "failed"):
                    break
                await trio.sleep(0.01)
    assert p["status"] == "completed", p
    assert len(p["disks"]) == 4
    assert busy_max == 1  # the bound held
    assert both_snapshots  # the two VMs were in flight together
    for target, image in files:
        assert images_equal(target, image)
    assert {(c["vm_path"], c["disk_id"]) for c in oma.change_id_posts} == {
        (f"/DC0/vm/{vm.name}", f"disk-{d.key}") for vm in vms for d in vm.disks
    }
    for vm in vms:
        assert await trio.to_thread.run_sync(snapshot_names, lab, vm.name) == []
