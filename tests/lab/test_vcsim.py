"""The lab simulator through pyvmomi, the way the VMA drives a vCenter."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import trio
from pyVim.connect import Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from lab import DiskSpec, Lab, LabVM, Partition
from vma.vsphere.client import merge_extents

from .conftest import MiB, disks_of, enable_cbt, find_vm, query_all, snapshot

CHANGE_ID = re.compile(r"^[0-9a-f]{2}( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/\d+$")


def data_map(path: os.PathLike[str] | str) -> list[tuple[int, int]]:
    """Allocated areas of a file, by SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            pos = hole
    finally:
        os.close(fd)
    return out


def test_discovery(lab: Lab, si: vim.ServiceInstance, vm1: LabVM) -> None:
    assert lab.url.startswith("http://127.0.0.1:")
    dc = next(e for e in si.content.rootFolder.childEntity if isinstance(e, vim.Datacenter))
    assert dc.name == "DC0"
    vm = find_vm(si, "vm1")
    assert vm._moId == vm1.moref
    assert vm.config.guestId == "ubuntu64Guest"
    assert vm.config.hardware.numCPU == 2
    assert vm.config.hardware.memoryMB == 2048
    assert not vm.config.changeTrackingEnabled
    disks = disks_of(vm.config)
    assert sorted(disks) == sorted(d.key for d in vm1.disks)
    for d in vm1.disks:
        dev = disks[d.key]
        assert dev.capacityInBytes == d.capacity
        assert dev.backing.fileName == d.file_name
        assert dev.backing.datastore.name == "LocalDS_0"
        assert not dev.backing.changeId
        assert lab.image(dev.backing.fileName) == d.image
        assert d.image.stat().st_size == d.capacity
    assert [d.backing.fileName for d in disks.values()] == [
        "[LocalDS_0] vm1/vm1.vmdk",
        "[LocalDS_0] vm1/vm1_1.vmdk",
    ]
    nics = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert [n.backing.deviceName for n in nics] == ["VM Network"]
    assert [n.name for n in vm.network] == ["VM Network"]


def test_disk_image_holds_known_files(vm1: LabVM) -> None:
    disk = vm1.disks[0]
    root = disk.layout.partitions[0]
    out = subprocess.run(
        ["debugfs", "-R", "cat /etc/hostname", f"{disk.image}?offset={root.start}"],
        capture_output=True,
        check=True,
    )
    assert out.stdout == b"vm1\n"
    efi = disk.layout.partitions[1]
    out = subprocess.run(
        ["mtype", "-i", f"{disk.image}@@{efi.start}", "::/boot.txt"], capture_output=True, check=True
    )
    assert out.stdout == b"boot\n"


def test_cbt_enable_and_snapshot_freezes_the_disk(lab: Lab, si: vim.ServiceInstance, vm1: LabVM) -> None:
    vm = find_vm(si, "vm1")
    enable_cbt(vm, {"scsi0:0.ctkEnabled": "TRUE", "scsi0:1.ctkEnabled": "TRUE"})
    assert vm.config.changeTrackingEnabled
    live = disks_of(vm.config)
    for d in live.values():
        assert CHANGE_ID.match(d.backing.changeId), d.backing.changeId
    disk = vm1.disks[0]
    disk.guest.write(20 * MiB, b"before" * 1000)
    before = disk.image.read_bytes()

    snap = snapshot(vm, "repl-1")
    assert vm.snapshot.currentSnapshot == snap
    frozen = disks_of(snap.config)[disk.key]
    assert CHANGE_ID.match(frozen.backing.changeId)
    assert frozen.backing.changeId.endswith(f"/{disk.guest.entries()[-1].seq}")
    assert frozen.backing.fileName == f"[LocalDS_0] vm1/vm1-{snap._moId}.vmdk"
    assert frozen.capacityInBytes == disk.capacity
    frozen_image = lab.image(frozen.backing.fileName)
    assert frozen_image.exists() and frozen_image != disk.image
    assert frozen_image.read_bytes() == before
    # The live disk keeps its own backing.
    assert disks_of(vm.config)[disk.key].backing.fileName == disk.file_name

    disk.guest.write(0, b"\xff" * 4096)
    disk.guest.write(23 * MiB, b"after" * 1000)
    assert frozen_image.read_bytes() == before
    assert disk.image.read_bytes() != before
    assert disks_of(vm.config)[disk.key].backing.changeId != frozen.backing.changeId

    WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))
    assert not frozen_image.exists()
    assert not lab.resolve(frozen.backing.fileName).exists()
    assert disk.image.exists()


def test_qcda_star_lists_allocated_areas_in_windows(lab: Lab, si: vim.ServiceInstance, vm1: LabVM) -> None:
    vm = find_vm(si, "vm1")
    enable_cbt(vm)
    snap = snapshot(vm, "full")
    disk = vm1.disks[0]
    areas, answers = query_all(vm, snap, disk.key, disk.capacity, "*")
    assert answers == 3  # 24 MiB in 8 MiB windows
    frozen = lab.image(disks_of(snap.config)[disk.key].backing.fileName)
    assert areas == merge_extents(data_map(frozen))
    # The partition table and the ext4 file system are in there; the unpartitioned tail is not.
    covered = lambda off: any(s <= off < s + n for s, n in areas)  # noqa: E731
    assert covered(0) and covered(disk.layout.partitions[0].start + 1024)
    assert not covered(20 * MiB)
    # What is outside the areas reads as zeros: a full copy of the areas reproduces the disk.
    data = frozen.read_bytes()
    rebuilt = bytearray(len(data))
    for s, n in areas:
        rebuilt[s : s + n] = data[s : s + n]
    assert bytes(rebuilt) == data
    # The blank disk has nothing allocated.
    blank = vm1.disks[1]
    assert query_all(vm, snap, blank.key, blank.capacity, "*") == ([], 2)


def test_qcda_incremental_gives_exactly_the_written_extents(
    lab: Lab, si: vim.ServiceInstance, vm1: LabVM
) -> None:
    vm = find_vm(si, "vm1")
    enable_cbt(vm)
    disk = vm1.disks[0]
    snap1 = snapshot(vm, "repl-1")
    base = disks_of(snap1.config)[disk.key].backing.changeId
    base_image = lab.image(disks_of(snap1.config)[disk.key].backing.fileName).read_bytes()
    other = vm1.disks[1]
    other_base = disks_of(snap1.config)[other.key].backing.changeId

    written = disk.guest.rewrite_random_chunks(5, chunk=256 * 1024, seed=7)
    written.append((8 * MiB - 4096, 8192))  # straddles a window boundary
    disk.guest.write(8 * MiB - 4096, os.urandom(8192))
    disk.guest.write(12 * MiB + 512, b"x" * 1024)  # sector-aligned small write
    written.append((12 * MiB + 512, 1024))
    WaitForTask(snap1.RemoveSnapshot_Task(removeChildren=False))
    snap2 = snapshot(vm, "repl-2")

    areas, answers = query_all(vm, snap2, disk.key, disk.capacity, base)
    assert answers == 3
    assert areas == merge_extents(written)
    # Replaying the areas from snapshot 2 onto snapshot 1's image gives snapshot 2's image.
    new_image = lab.image(disks_of(snap2.config)[disk.key].backing.fileName).read_bytes()
    replayed = bytearray(base_image)
    for s, n in areas:
        replayed[s : s + n] = new_image[s : s + n]
    assert bytes(replayed) == new_image
    # Nothing changed on the other disk, and nothing since snapshot 2 on this one.
    assert query_all(vm, snap2, other.key, other.capacity, other_base)[0] == []
    now = disks_of(snap2.config)[disk.key].backing.changeId
    assert query_all(vm, snap2, disk.key, disk.capacity, now)[0] == []


def test_cbt_reset_and_bad_queries_fault(lab: Lab, si: vim.ServiceInstance, vm1: LabVM) -> None:
    vm = find_vm(si, "vm1")
    disk = vm1.disks[0]
    # Without change tracking there are no change IDs to ask with.
    snap0 = snapshot(vm, "no-cbt")
    assert not disks_of(snap0.config)[disk.key].backing.changeId
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=snap0, deviceKey=disk.key, startOffset=0, changeId="52 00/0")
    WaitForTask(snap0.RemoveSnapshot_Task(removeChildren=False))

    enable_cbt(vm)
    snap1 = snapshot(vm, "repl-1")
    old = disks_of(snap1.config)[disk.key].backing.changeId
    with pytest.raises(vmodl_invalid_argument()):
        vm.QueryChangedDiskAreas(snapshot=snap1, deviceKey=disk.key, startOffset=0, changeId="garbage")
    with pytest.raises(vmodl_invalid_argument()):
        vm.QueryChangedDiskAreas(snapshot=snap1, deviceKey=disk.key, startOffset=disk.capacity, changeId="*")
    with pytest.raises(vmodl_invalid_argument()):
        vm.QueryChangedDiskAreas(snapshot=snap1, deviceKey=99999, startOffset=0, changeId="*")
    WaitForTask(snap1.RemoveSnapshot_Task(removeChildren=False))

    # CBT off and on again (what the VMA's "reset CBT" does): the old change ID is refused.
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    assert not disks_of(vm.config)[disk.key].backing.changeId
    enable_cbt(vm)
    snap2 = snapshot(vm, "repl-2")
    new = disks_of(snap2.config)[disk.key].backing.changeId
    assert new.split("/")[0] != old.split("/")[0]
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=snap2, deviceKey=disk.key, startOffset=0, changeId=old)
    # A reset from the guest side (journal) has the same effect.
    disk.guest.reset_cbt()
    snap3 = snapshot(vm, "repl-3")
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=snap3, deviceKey=disk.key, startOffset=0, changeId=new)


def vmodl_invalid_argument() -> type[Exception]:
    from pyVmomi import vmodl

    exc: type[Exception] = vmodl.fault.InvalidArgument
    return exc


def test_per_disk_ctk_switch(si: vim.ServiceInstance, vm1: LabVM) -> None:
    vm = find_vm(si, "vm1")
    enable_cbt(vm, {"scsi0:0.ctkEnabled": "TRUE", "scsi0:1.ctkEnabled": "FALSE"})
    live = disks_of(vm.config)
    assert live[vm1.disks[0].key].backing.changeId
    assert not live[vm1.disks[1].key].backing.changeId


def test_qcda_needs_a_session(lab: Lab, vm1: LabVM) -> None:
    si = lab.connect()
    vm = find_vm(si, "vm1")
    si.content.sessionManager.Logout()
    with pytest.raises(vim.fault.NotAuthenticated):
        vm.QueryChangedDiskAreas(snapshot=None, deviceKey=vm1.disks[0].key, startOffset=0, changeId="*")


def test_bad_login_is_refused(lab: Lab) -> None:
    from pyVim.connect import SmartConnect

    with pytest.raises(vim.fault.InvalidLogin):
        SmartConnect(protocol="http", host=lab.host, port=lab.port, user=lab.username, pwd="wrong")


async def test_trio_serve(tmp_path: os.PathLike[str]) -> None:
    lab = Lab(tmp_path / "lab")  # type: ignore[operator]
    async with trio.open_nursery() as nursery:
        ready = await nursery.start(lab.serve)
        assert lab.url == ready.url

        def use() -> list[str]:
            vm = lab.create_vm(
                "trio-vm", [DiskSpec(4 * MiB, [Partition(2 * MiB, "ext4", files={"a": b"a"})])]
            )
            si = lab.connect()
            try:
                return [d.backing.fileName for d in disks_of(find_vm(si, vm.name).config).values()]
            finally:
                Disconnect(si)

        assert await trio.to_thread.run_sync(use) == ["[LocalDS_0] trio-vm/trio-vm.vmdk"]
        nursery.cancel_scope.cancel()
    assert lab.ready is None
    with pytest.raises(ProcessLookupError):  # the simulator is gone, not orphaned
        os.kill(ready.pid, 0)


@pytest.mark.slow
def test_reference_like_workload(tmp_path: os.PathLike[str]) -> None:
    """A 256 MiB disk, half its 1 MiB chunks random, a 5 % rewrite, a window of a third."""
    with Lab(tmp_path / "lab") as lab:  # type: ignore[operator]
        vm1 = lab.create_vm("big", [DiskSpec(256 * MiB)])
        disk = vm1.disks[0]
        disk.guest.rewrite_random_chunks(128, seed=1)
        si = lab.connect()
        try:
            vm = find_vm(si, "big")
            enable_cbt(vm)
            snap1 = snapshot(vm, "full")
            full, answers = query_all(vm, snap1, disk.key, disk.capacity, "*")
            assert answers == 3
            assert sum(n for _, n in full) == 128 * MiB
            base = disks_of(snap1.config)[disk.key].backing.changeId
            WaitForTask(snap1.RemoveSnapshot_Task(removeChildren=False))
            written = disk.guest.rewrite_random_chunks(13, seed=2)
            snap2 = snapshot(vm, "incr")
            assert query_all(vm, snap2, disk.key, disk.capacity, base)[0] == merge_extents(written)
        finally:
            Disconnect(si)


@pytest.mark.interop
def test_nbdkit_reads_the_snapshot(
    tmp_path: os.PathLike[str], lab: Lab, si: vim.ServiceInstance, vm1: LabVM
) -> None:
    """The VMA's read path: the snapshot's disk backing -> local image -> `nbdkit file` -> bytes."""
    vm = find_vm(si, "vm1")
    enable_cbt(vm)
    disk = vm1.disks[0]
    expected = disk.image.read_bytes()
    snap = snapshot(vm, "read")
    disk.guest.rewrite_random_chunks(4, seed=9)
    image = lab.image(disks_of(snap.config)[disk.key].backing.fileName)
    out = f"{tmp_path}/copy.raw"
    subprocess.run(["nbdkit", "-U", "-", "file", str(image), "--run", f'nbdcopy "$uri" {out}'], check=True)
    with open(out, "rb") as f:
        assert f.read() == expected


def test_qcda_on_the_live_disk(si: vim.ServiceInstance, vm1: LabVM) -> None:
    """Without a snapshot the answer is about the disk as it is now."""
    vm = find_vm(si, "vm1")
    enable_cbt(vm)
    disk = vm1.disks[1]
    base = disks_of(vm.config)[disk.key].backing.changeId
    disk.guest.write(5 * MiB, b"q" * 4096)
    assert query_all(vm, None, disk.key, disk.capacity, base)[0] == [(5 * MiB, 4096)]
    assert query_all(vm, None, disk.key, disk.capacity, "*")[0] == [(5 * MiB, 4096)]


def test_cbt_starts_at_the_stun(si: vim.ServiceInstance, vm1: LabVM) -> None:
    """On a running VM, changeTrackingEnabled takes effect at the next stun, as on ESXi."""
    vm = find_vm(si, "vm1")
    assert vm.runtime.powerState == "poweredOn"
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert vm.config.changeTrackingEnabled
    assert not any(d.backing.changeId for d in disks_of(vm.config).values())
    stun = snapshot(vm, "stun")
    assert all(d.backing.changeId for d in disks_of(stun.config).values())
    WaitForTask(stun.RemoveSnapshot_Task(removeChildren=False))
    assert all(CHANGE_ID.match(d.backing.changeId) for d in disks_of(vm.config).values())


def test_discovery_by_datacenter_and_name_filter(lab: Lab, si: vim.ServiceInstance) -> None:
    for name in ("web-1", "web-2", "db-1"):
        lab.create_vm(name, [DiskSpec(2 * MiB)])
    dc = si.content.searchIndex.FindByInventoryPath("DC0")
    assert isinstance(dc, vim.Datacenter)
    view = si.content.viewManager.CreateContainerView(dc.vmFolder, [vim.VirtualMachine], True)
    try:
        names = sorted(v.name for v in view.view if v.name.startswith("web-"))
    finally:
        view.Destroy()
    assert names == ["web-1", "web-2"]
