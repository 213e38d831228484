"""User VMs of the lab CloudStack run under qemu: a started VM is a ``qemu-system-x86_64`` process
with its volumes and NICs, its serial console readable at ``/lab/vms/<id>/console``; stopping,
destroying, a qemu that exits or cannot start, and the double's own stop and restart.

Two tests boot the lab guest (about 6 s each under TCG); the others need qemu up, not a boot.
Missing tools fail them (scripts/bootstrap.sh installs qemu, the kernel, syslinux, busybox).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from lab.bootdisk import BootDiskInfo, BootMarker, build_boot_disk, find_marker, zero_boot_sector
from lab.bootdisk.qemu import NO_BOOTABLE_DEVICE, control_dir_of
from lab.cloudstack.cli import serve
from lab.cloudstack.seed import DEFAULT_SEED, Seed, SeedError, load_seed
from pyapp.process import ProcessRef, cmdline

from .cloudstack_fixtures import (
    ISOLATED,
    OMA_VM,
    SEED,
    SHARED,
    TEMPLATE,
    ZONE1,
    CloudStackLab,
    lab_settings,
    seed_with,
    start_lab,
)
from .test_cloudstack_cli import LabProcess, client, processes  # noqa: F401 -- the processes fixture

MiB = 1 << 20
DATA = b"the bytes replication copied\n" * 2000
SMALL_SO = next(o.id for o in SEED.serviceofferings if o.name == "Small Instance")
BOOT_TEMPLATE = "7d0c7c0e-3c39-4d5e-8a53-3e2f9a4c1b01"
HUGE_SO = "0f3b6a52-9c41-4a57-b1f0-6a3c2e5d7f10"
MACS = ("02:aa:00:00:00:01", "02:aa:00:00:00:02")
#: A boot takes about 6 s under TCG on a loaded 2-core machine; the first start in a process also
#: probes KVM (about 4 s).
BOOT_DEADLINE_S = 90.0
JOB_DEADLINE_S = 60.0


def guest_seed(image: Path | None = None, **changes: Any) -> Seed:
    """The default seed plus a lab template whose ROOT volumes hold ``image`` and a service
    offering no host can give memory for."""
    data = SEED.model_dump()
    if image is not None:
        data["templates"].append(
            {
                "id": BOOT_TEMPLATE,
                "name": "Lab Boot",
                "displaytext": "the lab guest",
                "size": 64 * MiB,
                "image": image,
            }
        )
    data["serviceofferings"].append(
        {
            "id": HUGE_SO,
            "name": "Huge Instance",
            "displaytext": "more memory than any lab host has",
            "cpunumber": 1,
            "cpuspeed": 1000,
            "memory": 4 << 20,  # 4 TiB
        }
    )
    data.update(changes)
    return seed_with(**data)


def boot_disk(tmp_path: Path, name: str) -> BootDiskInfo:
    return build_boot_disk(tmp_path / f"{name}.img", vm_name=name, size=48 * MiB, data=DATA)


async def finished(lab: CloudStackLab, jobid: str) -> dict[str, Any]:
    """queryAsyncJobResult until the job ends (a first start may wait for the KVM probe)."""
    with trio.fail_after(JOB_DEADLINE_S):
        while True:
            result = await lab.api("queryAsyncJobResult", jobid=jobid)
            if result["jobstatus"] != 0:
                return result
            await trio.sleep(0.05)


async def succeeded(lab: CloudStackLab, command: str, **params: str) -> dict[str, Any]:
    job = await finished(lab, (await lab.api(command, **params))["jobid"])
    assert job["jobstatus"] == 1, job
    vm: dict[str, Any] = job["jobresult"]["virtualmachine"]
    return vm


async def console(lab: CloudStackLab, vm_id: str, log: str = "console") -> str:
    response = await lab.http.get(f"{lab.base}/lab/vms/{vm_id}/{log}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    return response.text


async def boot_line(lab: CloudStackLab, vm_id: str, name: str) -> BootMarker:
    """What the OMA does after a start: read the console until the guest's boot line."""
    with trio.fail_after(BOOT_DEADLINE_S):
        while True:
            marker = find_marker(await console(lab, vm_id), name)
            if marker is not None:
                return marker
            await trio.sleep(0.25)


async def qemu_of(lab: CloudStackLab, vm_id: str) -> dict[str, Any]:
    guest: dict[str, Any] = (await lab.state())["guests"][vm_id]
    return guest


async def vm_state(lab: CloudStackLab, vm_id: str) -> str:
    state: str = (await lab.api("listVirtualMachines", id=vm_id))["virtualmachine"][0]["state"]
    return state


def gone(process: str) -> bool:
    ref = ProcessRef.parse(process)
    assert ref is not None
    return not ref.alive()


async def running_vm(lab: CloudStackLab) -> dict[str, Any]:
    """A VM of the seed's template (its ROOT all zeros: it boots nothing), started."""
    return await succeeded(
        lab, "deployVirtualMachine", zoneid=ZONE1, serviceofferingid=SMALL_SO, templateid=TEMPLATE,
        networkids=ISOLATED,
    )  # fmt: skip


def drives(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "-drive"]


async def test_a_started_vm_is_qemu_running_its_volumes_and_nics(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    info = boot_disk(tmp_path, "lab-guest")
    lab = await start_lab(nursery, tmp_path / "cs", seed=guest_seed(info.path))
    vm = await succeeded(
        lab,
        "deployVirtualMachine",
        zoneid=ZONE1,
        serviceofferingid=SMALL_SO,
        templateid=BOOT_TEMPLATE,
        name="web-1",
        **{
            "iptonetworklist[0].networkid": ISOLATED,
            "iptonetworklist[0].mac": MACS[0],
            "iptonetworklist[1].networkid": SHARED,
            "iptonetworklist[1].mac": MACS[1],
        },
    )
    assert vm["state"] == "Running"
    # the job ended when qemu was up, long before the guest's boot line
    assert find_marker(await console(lab, vm["id"]), "lab-guest") is None
    guest = await qemu_of(lab, vm["id"])
    root = (await lab.api("listVolumes", virtualmachineid=vm["id"]))["volume"][0]
    argv = cmdline(guest["pid"])
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert f"-machine pc,accel={guest['accel']} -cpu qemu64 -m 512 -smp 1" in joined
    assert drives(argv) == [f"file={lab.volume_file(root['id'])},if=virtio,index=0,format=raw"]
    assert "virtio-net-pci,netdev=nic0,mac=02:aa:00:00:00:01,romfile=" in argv
    assert "virtio-net-pci,netdev=nic1,mac=02:aa:00:00:00:02,romfile=" in argv
    assert "user,id=nic0,restrict=on" in argv and "user,id=nic1,restrict=on" in argv

    marker = await boot_line(lab, vm["id"], "lab-guest")
    assert marker.sha256 == info.data_sha256 and marker.data_bytes == len(DATA)
    assert marker.macs == MACS

    stopped = await succeeded(lab, "stopVirtualMachine", id=vm["id"])
    assert stopped["state"] == "Stopped" == await vm_state(lab, vm["id"])
    assert gone(guest["process"]) and vm["id"] not in (await lab.state())["guests"]
    kept = await lab.http.get(f"{lab.base}/lab/vms/{vm['id']}/console")
    assert kept.headers["x-lab-vm-state"] == "Stopped" and marker.line in kept.text

    again = await succeeded(lab, "startVirtualMachine", id=vm["id"])
    assert again["state"] == "Running"
    second = await qemu_of(lab, vm["id"])
    assert second["pid"] != guest["pid"]
    await succeeded(lab, "destroyVirtualMachine", id=vm["id"], expunge="true")
    assert gone(second["process"]) and (await lab.state())["guests"] == {}
    missing = await lab.http.get(f"{lab.base}/lab/vms/{vm['id']}/console")
    assert missing.status_code == 404
    assert list((lab.data_dir / "guests").iterdir()) == []


async def test_a_replica_swapped_in_as_root_boots_and_volumes_reach_qemu_at_its_next_start(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The failover's order: deploy stopped, the replica (written through the OMA guest's device)
    detached from the OMA VM, the deployed ROOT swapped for it, a data disk attached, then start."""
    info = boot_disk(tmp_path, "replica-1")
    lab = await start_lab(nursery, tmp_path / "cs", seed=guest_seed())
    vm = await succeeded(
        lab, "deployVirtualMachine", zoneid=ZONE1, serviceofferingid=SMALL_SO, templateid=TEMPLATE,
        networkids=ISOLATED, startvm="false",
    )  # fmt: skip
    replica = await lab.new_volume(name="replica-disk-0")
    await lab.ok("attachVolume", id=replica["id"], virtualmachineid=OMA_VM)
    with info.path.open("rb") as source, lab.link(replica["id"]).open("r+b") as device:
        while chunk := source.read(MiB):  # what a replication pass writes: the non-zero blocks
            if chunk.count(0) != len(chunk):
                device.seek(source.tell() - len(chunk))
                device.write(chunk)
    await lab.ok("detachVolume", id=replica["id"])
    root = (await lab.api("listVolumes", virtualmachineid=vm["id"], type="ROOT"))["volume"][0]
    await lab.ok("detachVolume", id=root["id"])
    await lab.ok("attachVolume", id=replica["id"], virtualmachineid=vm["id"], deviceid="0")
    data = await lab.new_volume(name="replica-disk-1")
    await lab.ok("attachVolume", id=data["id"], virtualmachineid=vm["id"])

    await succeeded(lab, "startVirtualMachine", id=vm["id"])
    guest = await qemu_of(lab, vm["id"])
    assert guest["disks"] == [str(lab.volume_file(replica["id"])), str(lab.volume_file(data["id"]))]
    marker = await boot_line(lab, vm["id"], "replica-1")  # ROOT is vda: the guest read vda2
    assert marker.sha256 == info.data_sha256
    assert marker.macs == (vm["nic"][0]["macaddress"],)

    # attached while running: recorded at once, in qemu from the next start (no hot-plug)
    late = await lab.new_volume(name="late")
    assert (await lab.ok("attachVolume", id=late["id"], virtualmachineid=vm["id"]))["volume"]["deviceid"] == 2
    assert (await qemu_of(lab, vm["id"]))["disks"] == guest["disks"]
    await succeeded(lab, "stopVirtualMachine", id=vm["id"], forced="true")
    assert gone(guest["process"])
    await succeeded(lab, "startVirtualMachine", id=vm["id"])
    assert (await qemu_of(lab, vm["id"]))["disks"] == [*guest["disks"], str(lab.volume_file(late["id"]))]


async def test_a_root_that_does_not_boot_never_prints_the_marker(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    info = boot_disk(tmp_path, "broken")
    zero_boot_sector(info.path)  # a copy that missed the first sector
    lab = await start_lab(nursery, tmp_path / "cs", seed=guest_seed(info.path))
    vm = await succeeded(
        lab, "deployVirtualMachine", zoneid=ZONE1, serviceofferingid=SMALL_SO, templateid=BOOT_TEMPLATE,
        networkids=ISOLATED,
    )  # fmt: skip
    assert vm["state"] == "Running"
    with trio.fail_after(BOOT_DEADLINE_S):
        while NO_BOOTABLE_DEVICE not in await console(lab, vm["id"], "firmware"):
            await trio.sleep(0.1)
    assert "Boot failed: not a bootable disk" in await console(lab, vm["id"], "firmware")
    assert "MOVER-LAB-BOOT" not in await console(lab, vm["id"])
    assert await vm_state(lab, vm["id"]) == "Running", "qemu keeps running a VM that did not boot"


async def test_a_qemu_that_cannot_start_fails_the_job(tmp_path: Path, nursery: trio.Nursery) -> None:
    lab = await start_lab(nursery, tmp_path / "cs", seed=guest_seed())
    deploy = {"zoneid": ZONE1, "serviceofferingid": HUGE_SO, "templateid": TEMPLATE, "networkids": ISOLATED}
    vm = await succeeded(lab, "deployVirtualMachine", **deploy, startvm="false")
    job = await finished(lab, (await lab.api("startVirtualMachine", id=vm["id"]))["jobid"])
    assert job["jobstatus"] == 2 and job["jobresultcode"] == 533
    assert job["jobresult"] == {
        "errorcode": 533,
        "errortext": f'Unable to create a deployment for VM instance {{id: "{_internal(vm)}", name: '
        f'"{vm["instancename"]}", uuid: "{vm["id"]}", type="User"}}',
    }
    assert await vm_state(lab, vm["id"]) == "Stopped"
    assert (await lab.state())["guests"] == {}
    deployed = await finished(lab, (await lab.api("deployVirtualMachine", **deploy))["jobid"])
    assert deployed["jobresultcode"] == 533
    assert await vm_state(lab, deployed["jobinstanceid"]) == "Error"  # as a failed deployment is


def _internal(vm: dict[str, Any]) -> str:
    """The database id CloudStack shows in ``VM instance {id: ...}``: the one in ``i-2-<id>-VM``."""
    name: str = vm["instancename"]
    return name.split("-")[2]


async def test_a_qemu_that_exits_on_its_own_stops_the_vm(tmp_path: Path, nursery: trio.Nursery) -> None:
    lab = await start_lab(nursery, tmp_path / "cs", seed=guest_seed())
    vm = await running_vm(lab)
    guest = await qemu_of(lab, vm["id"])
    os.kill(guest["pid"], signal.SIGKILL)  # the guest powered off, or qemu died
    with trio.fail_after(10):
        while await vm_state(lab, vm["id"]) != "Stopped":
            await trio.sleep(0.05)
    assert (await lab.state())["guests"] == {}
    assert (await succeeded(lab, "startVirtualMachine", id=vm["id"]))["state"] == "Running"
    assert (await qemu_of(lab, vm["id"]))["pid"] != guest["pid"]


async def test_the_doubles_stop_stops_its_qemus(tmp_path: Path, nursery: trio.Nursery) -> None:
    async with trio.open_nursery() as first:
        lab = await start_lab(first, tmp_path / "cs", seed=guest_seed())
        vms = [await running_vm(lab), await running_vm(lab)]
        guests = [await qemu_of(lab, vm["id"]) for vm in vms]
        first.cancel_scope.cancel()  # what the end of a test's nursery does
    assert all(gone(g["process"]) for g in guests)

    stop = trio.Event()  # what SIGTERM and SIGINT set in cloudstack-lab: a graceful shutdown
    settings = lab_settings(tmp_path / "cs", seed=guest_seed())
    url = await nursery.start(partial(serve, settings, shutdown_trigger=stop))
    again = CloudStackLab(url, tmp_path / "cs", settings.options.device_root, lab.http)
    assert [await vm_state(again, vm["id"]) for vm in vms] == ["Stopped", "Stopped"]
    assert await vm_state(again, OMA_VM) == "Running"  # the OMA VM is not a qemu VM
    restarted = await succeeded(again, "startVirtualMachine", id=vms[0]["id"])
    guest = await qemu_of(again, restarted["id"])
    stop.set()
    with trio.fail_after(30):
        while not gone(guest["process"]):
            await trio.sleep(0.05)
    await lab.http.aclose()


async def test_a_killed_double_leaves_qemu_and_its_restart_stops_it(
    tmp_path: Path,
    processes: list[LabProcess],  # noqa: F811 -- the fixture
) -> None:
    data_dir = tmp_path / "cs"
    first = LabProcess(data_dir)
    processes.append(first)
    lab = client(first, data_dir)
    killed = await running_vm(lab)
    orphan = await qemu_of(lab, killed["id"])
    qmp_dir = control_dir_of(cmdline(orphan["pid"]))
    assert qmp_dir is not None and qmp_dir.is_dir()
    first.stop(signal.SIGKILL)
    assert not gone(orphan["process"]), "qemu runs in a session of its own"

    second = LabProcess(data_dir)
    processes.append(second)
    lab = client(second, data_dir)
    assert gone(orphan["process"]) and not qmp_dir.exists()
    assert await vm_state(lab, killed["id"]) == "Stopped"
    await lab.http.aclose()
    assert second.stop(signal.SIGTERM) == 0


async def test_a_template_image_is_checked_at_load_and_copied_into_root_volumes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    raw = tmp_path / "seeds" / "disk.raw"
    raw.parent.mkdir()
    raw.write_bytes(b"\xeb\x63" + bytes(510) + b"payload" * 1000)  # a boot jump, then data
    qcow2 = tmp_path / "seeds" / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    seed_file = tmp_path / "seeds" / "seed.json"

    def write_seed(image: str, size: int) -> None:
        data = json.loads(DEFAULT_SEED.read_text())
        data["templates"].append(
            {"id": BOOT_TEMPLATE, "name": "Lab Boot", "displaytext": "x", "size": size, "image": image}
        )
        seed_file.write_text(json.dumps(data))

    write_seed("absent.img", MiB)
    with pytest.raises(SeedError, match=r"template Lab Boot: no image file .*seeds/absent\.img"):
        load_seed(seed_file)
    write_seed("disk.qcow2", 4096)
    with pytest.raises(SeedError, match=r"its image holds 7680 bytes, more than its size 4096"):
        load_seed(seed_file)
    write_seed("disk.qcow2", MiB)  # relative to the seed file
    seed = load_seed(seed_file)
    assert next(t for t in seed.templates if t.id == BOOT_TEMPLATE).image == qcow2

    lab = await start_lab(nursery, tmp_path / "cs", seed=seed)
    vm = await succeeded(
        lab, "deployVirtualMachine", zoneid=ZONE1, serviceofferingid=SMALL_SO, templateid=BOOT_TEMPLATE,
        networkids=ISOLATED, startvm="false",
    )  # fmt: skip
    root = (await lab.api("listVolumes", virtualmachineid=vm["id"]))["volume"][0]
    contents = lab.volume_file(root["id"]).read_bytes()
    assert len(contents) == root["size"] == MiB
    assert contents == raw.read_bytes().ljust(MiB, b"\0")
