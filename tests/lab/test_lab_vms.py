"""VMs of the vSphere lab that boot: ``Lab.create_boot_vm`` (the lab guest as disk 0, its writes
journalled for change tracking) and ``python -m lab add-vm`` (an operator's raw or QCOW2 images,
with NICs on given networks and MACs), checked the way the VMA sees them and the way replication
reads them. One test boots a copy under qemu (about 6 s under TCG)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect
from pyVmomi import vim

from lab import DiskSpec, Lab, NicSpec
from lab.bootdisk import RunningVM, VmDisk, VmSpec, build_boot_disk, read_data, rewrite_data
from lab.images import ImageError, inspect_image, partition_layout
from vma.vsphere.client import VSphere

from .conftest import MiB, disks_of, enable_cbt, find_vm, query_all, snapshot

MACS = ("00:50:56:3a:00:01", "00:50:56:3a:00:02")
BOOT_DEADLINE_S = 90.0


def describe(si: vim.ServiceInstance, name: str) -> dict[str, Any]:
    """The VM as the VMA's discovery describes it (its NICs: network, MAC, adapter)."""
    vm = find_vm(si, name)
    props = {p: getattr_path(vm, p) for p in VSphere.VM_PROPERTIES}
    return VSphere.describe(vm._moId, f"/DC0/vm/{name}", props)


def getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def copy_areas(source: Path, target: Path, areas: list[tuple[int, int]], size: int) -> None:
    """What a replication pass does to its target: the given areas of ``source`` written."""
    with source.open("rb") as src, target.open("r+b" if target.exists() else "w+b") as dst:
        dst.truncate(size)
        for start, length in areas:
            src.seek(start)
            dst.seek(start)
            dst.write(src.read(length))


def test_a_boot_vm_replicates_as_its_boot_image_and_its_guest_writes_are_tracked(
    lab: Lab, si: vim.ServiceInstance, tmp_path: Path
) -> None:
    data = b"first pass\n" * 3000
    vm = lab.create_boot_vm(
        "boot1",
        data=data,
        disks=[DiskSpec(8 * MiB)],
        nics=[NicSpec("VM Network", MACS[0]), NicSpec("DC0_DVPG0", MACS[1])],
    )
    assert vm.boot is not None and vm.boot.path == vm.disks[0].image
    assert vm.boot.data_sha256 == hashlib.sha256(data).hexdigest()
    assert [d.capacity for d in vm.disks] == [64 * MiB, 8 * MiB]
    seen = describe(si, "boot1")
    assert [(n["network"], n["mac_address"], n["adapter_type"]) for n in seen["networks"]] == [
        ("VM Network", MACS[0], "vmxnet3"),
        (seen["networks"][1]["network"], MACS[1], "vmxnet3"),
    ]
    assert seen["networks"][1]["network"].startswith("dvportgroup-")  # a port group, named by its key
    assert [(n.network, n.mac) for n in vm.nics] == [("VM Network", MACS[0]), ("DC0_DVPG0", MACS[1])]
    assert [d["capacity_bytes"] for d in seen["disks"]] == [64 * MiB, 8 * MiB]

    # A full pass: the allocated areas of the snapshot's frozen disk 0, copied to a target.
    found = find_vm(si, "boot1")
    enable_cbt(found)
    disk = vm.disks[0]
    snap1 = snapshot(found, "full")
    frozen1 = disks_of(snap1.config)[disk.key]
    areas, _ = query_all(found, snap1, disk.key, disk.capacity, "*")
    replica = tmp_path / "replica.img"
    copy_areas(lab.image(frozen1.backing.fileName), replica, areas, disk.capacity)
    assert replica.read_bytes() == disk.image.read_bytes(), "the replica is the boot image"

    # The guest changes its data file (journalled); an incremental pass brings the replica along.
    new = b"written between passes\n" * 2000
    written = rewrite_data(disk.guest, vm.boot, new)
    assert written and [e.op for e in disk.guest.entries()[-len(written) :]] == ["write"] * len(written)
    snap2 = snapshot(found, "incremental")
    changed, _ = query_all(found, snap2, disk.key, disk.capacity, frozen1.backing.changeId)
    assert changed == written
    copy_areas(lab.image(disks_of(snap2.config)[disk.key].backing.fileName), replica, changed, disk.capacity)
    assert replica.read_bytes() == disk.image.read_bytes()
    assert read_data(vm.boot, replica) == new

    # ... and the replica boots, reading the new data.
    spec = VmSpec("boot1", [VmDisk(replica)], MACS)
    with RunningVM.start(spec, tmp_path / "replica.console") as running:
        marker = running.wait_for_marker(BOOT_DEADLINE_S)
    assert marker.sha256 == hashlib.sha256(new).hexdigest() and marker.macs == MACS


def test_bad_nics_are_refused_before_any_disk_is_built(lab: Lab) -> None:
    with pytest.raises(ValueError, match="unicast MAC"):
        NicSpec("VM Network", "01:00:5e:00:00:01")
    with pytest.raises(Exception, match=r"no network 'Nowhere' in datacenter DC0 \(it has: .*VM Network"):
        lab.create_boot_vm("boot2", nics=[NicSpec("Nowhere")])
    assert not lab.resolve("[LocalDS_0] boot2/boot2.vmdk").exists()


# -- python -m lab and add-vm ------------------------------------------------------------------


class LabCommand:
    """``python -m lab --dir D ...`` as a process, read line by line from its stdout."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lab", "--dir", str(directory), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._pending = b""

    def read_until(self, pattern: str, timeout: float = 120) -> str:
        """The first line matching ``pattern`` (raw reads: select() does not see what a buffered
        reader already took from the pipe)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            line, sep, rest = self._pending.partition(b"\n")
            if sep:
                self._pending = rest
                self.lines.append(line.decode())
                if re.search(pattern, self.lines[-1]):
                    return self.lines[-1]
                continue
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                self.proc.kill()
                err = self.proc.communicate()[1][-2000:].decode(errors="replace")
                pytest.fail(f"python -m lab printed {self.lines!r}; stderr: {err}")
            self._pending += chunk

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code


@pytest.fixture
def lab_command(tmp_path: Path) -> Iterator[LabCommand]:
    command = LabCommand(tmp_path / "lab", "--boot-vm", "web1")
    yield command
    if command.proc.poll() is None:
        command.proc.kill()
        command.proc.wait()


def add_vm(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab", "add-vm", "--dir", str(directory), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_add_vm_takes_raw_and_qcow2_images_with_nics(lab_command: LabCommand, tmp_path: Path) -> None:
    directory = tmp_path / "lab"
    lab_command.read_until(r"^web1 boots and prints sha256=[0-9a-f]{64}$")
    boot = build_boot_disk(tmp_path / "own.img", vm_name="own1", size=48 * MiB, data=b"own data\n" * 99)
    data_raw = tmp_path / "data.raw"
    with data_raw.open("wb") as f:  # 3.5 MiB: not a whole MiB, some of it holes
        f.truncate(3 * MiB + 512 * 1024)
        f.seek(MiB)
        f.write(random.Random(5).randbytes(256 * 1024))
    data_qcow2 = tmp_path / "data.qcow2"
    convert = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(data_raw), str(data_qcow2)]
    subprocess.run(convert, check=True)

    result = add_vm(
        directory, "--name", "own1", "--disk", str(boot.path), "--disk", str(data_qcow2),
        "--nic", f"VM Network:{MACS[0].upper()}", "--nic", "DC0_DVPG0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"^own1 \(vm-\d+\) nic \d+: VM Network 00:50:56:3a:00:01$", result.stdout, re.M)

    lab = Lab.running(directory)
    try:
        si = lab.connect()
        try:
            seen = describe(si, "own1")
        finally:
            Disconnect(si)
        assert seen["power_state"] == "poweredOn"
        assert [d["capacity_bytes"] for d in seen["disks"]] == [48 * MiB, 4 * MiB]  # rounded up to MiB
        assert (
            seen["networks"][0]["mac_address"] == MACS[0] and seen["networks"][0]["network"] == "VM Network"
        )
        assert seen["networks"][1]["network"].startswith("dvportgroup-")
        generated = seen["networks"][1]["mac_address"]
        assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", generated) and generated != MACS[0]
        first, second = (lab.image(d["path"]) for d in seen["disks"])
        assert first.read_bytes() == boot.path.read_bytes()
        assert second.read_bytes() == data_raw.read_bytes().ljust(4 * MiB, b"\0")
        assert os.stat(second).st_blocks * 512 < 2 * MiB, "the copy keeps the holes"
        table = partition_layout(first)
        assert [(p.number, p.start, p.size) for p in table.partitions] == [
            (p.number, p.start, p.size) for p in boot.layout.partitions
        ]
    finally:
        lab.stop()

    assert add_vm(directory, "--name", "own1", "--disk", str(boot.path)).returncode == 1  # exists
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), "1M"], check=True)
    refused = add_vm(directory, "--name", "own2", "--disk", str(vmdk))
    assert refused.returncode == 1
    assert refused.stderr == (
        f"python -m lab add-vm: {vmdk} is a vmdk image: the lab takes raw and qcow2 images\n"
    )
    raw_disk = ("--disk", str(data_raw))
    nowhere = add_vm(directory, "--name", "own3", *raw_disk, "--nic", "Nowhere:00:50:56:00:00:09")
    assert nowhere.returncode == 1 and "no network 'Nowhere' in datacenter DC0" in nowhere.stderr
    bad_mac = add_vm(directory, "--name", "own4", *raw_disk, "--nic", "VM Network:01:00:5e:00:00:01")
    assert bad_mac.returncode == 2 and "not a unicast MAC address" in bad_mac.stderr

    assert lab_command.stop() == 0
    assert not (directory / "lab.json").exists()
    gone = add_vm(directory, "--name", "own5", "--disk", str(data_raw))
    assert gone.returncode == 1
    assert gone.stderr.startswith(f"python -m lab add-vm: no lab is running in {directory}")


def test_images_are_inspected_and_other_formats_refused(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1000))
    info = inspect_image(raw)
    assert (info.format, info.virtual_size) == ("raw", 1024)
    with pytest.raises(ImageError, match="no image file"):
        inspect_image(tmp_path / "absent")
    assert partition_layout(raw).partitions == ()
