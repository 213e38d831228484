from __future__ import annotations

from collections.abc import Iterator

import pytest
from pyVim.connect import Disconnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from lab import DiskSpec, Lab, LabVM, Partition
from vma.vsphere.client import merge_extents

MiB = 1024 * 1024
KNOWN_FILES = {
    "etc/hostname": b"vm1\n",
    "etc/os-release": b'NAME="Lab Linux"\nID=lab\n',
    "var/lib/data/blob.bin": bytes(range(256)) * 4096,  # 1 MiB
}


@pytest.fixture
def si(lab: Lab) -> Iterator[vim.ServiceInstance]:
    si = lab.connect()
    yield si
    Disconnect(si)


@pytest.fixture
def vm1(lab: Lab) -> LabVM:
    return lab.create_vm(
        "vm1",
        [
            DiskSpec(
                24 * MiB,
                [
                    Partition(8 * MiB, "ext4", "root", KNOWN_FILES),
                    Partition(4 * MiB, "fat", "EFI", {"boot.txt": b"boot\n"}),
                ],
            ),
            DiskSpec(12 * MiB),
        ],
        guest_id="ubuntu64Guest",
        memory_mb=2048,
        num_cpus=2,
    )


def find_vm(si: vim.ServiceInstance, name: str) -> vim.VirtualMachine:
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
    try:
        return next(v for v in view.view if v.name == name)
    finally:
        view.Destroy()


def disks_of(config: vim.vm.ConfigInfo) -> dict[int, vim.vm.device.VirtualDisk]:
    return {d.key: d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)}


def enable_cbt(vm: vim.VirtualMachine, keys: dict[str, str] | None = None, enabled: bool = True) -> None:
    """What the VMA does: changeTrackingEnabled, per-disk ctkEnabled, then a stun (snapshot create+remove)."""
    extra = [vim.option.OptionValue(key=k, value=v) for k, v in (keys or {}).items()]
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=enabled, extraConfig=extra)))
    task = vm.CreateSnapshot_Task(name="stun", description="", memory=False, quiesce=False)
    WaitForTask(task)
    WaitForTask(task.info.result.RemoveSnapshot_Task(removeChildren=False))


def snapshot(vm: vim.VirtualMachine, name: str) -> vim.vm.Snapshot:
    task = vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False)
    WaitForTask(task)
    snap: vim.vm.Snapshot = task.info.result
    return snap


def query_all(
    vm: vim.VirtualMachine, snap: vim.vm.Snapshot | None, key: int, capacity: int, change_id: str
) -> tuple[list[tuple[int, int]], int]:
    """The VMA's loop: from offset 0 until the whole disk is covered. Returns the areas and the
    number of answers it took."""
    areas: list[tuple[int, int]] = []
    offset, answers = 0, 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id)
        assert info.startOffset == offset
        assert info.length > 0
        for a in info.changedArea or []:
            assert info.startOffset <= a.start and a.start + a.length <= info.startOffset + info.length
            areas.append((a.start, a.length))
        offset = info.startOffset + info.length
        answers += 1
    return merge_extents(areas), answers
