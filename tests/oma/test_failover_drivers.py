"""The failover's ``prepare`` step: virtio drivers found (or not) in a guest's file systems, read
without mounting, and the conversion's command line."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import pytest

from lab import MiB, Partition, build_disk
from lab.bootdisk import build_boot_disk
from oma.failover import drivers


def newc(names: list[str]) -> bytes:
    """A newc cpio archive of empty files ``names``."""
    out = io.BytesIO()
    for ino, name in enumerate([*names, "TRAILER!!!"], 1):
        encoded = name.encode() + b"\0"
        fields = [ino, 0o100644, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(encoded), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.write(b"\0" * (-out.tell() % 4))
    return out.getvalue()


def test_the_lab_guest_has_virtio_in_its_initramfs(tmp_path: Path) -> None:
    info = build_boot_disk(tmp_path / "guest.img", vm_name="g1", size=64 * MiB, data=b"data")
    found = drivers.inspect_disks([info.path])
    assert found.has_virtio and found.os == "linux"
    assert found.evidence == ["disk 0 part1: initrd.gz holds virtio_blk"]
    assert [f["filesystem_type"] for f in found.filesystems] == ["fat", "fat"]


def test_a_guest_without_virtio_is_told_apart(tmp_path: Path) -> None:
    initrd = gzip.compress(newc(["init", "lib/modules/6.1.0/kernel/drivers/ata/ahci.ko"]))
    disk = tmp_path / "old.img"
    build_disk(disk, 32 * MiB, [Partition(16 * MiB, "ext4", "root", {"boot/initrd.img-6.1.0": initrd})])
    found = drivers.inspect_disks([disk])
    assert found.os == "linux" and not found.has_virtio and found.evidence == []


def test_microcode_then_compressed_archives_and_builtin_drivers(tmp_path: Path) -> None:
    early = newc(["kernel/x86/microcode/GenuineIntel.bin"])
    main = gzip.compress(newc(["usr/lib/modules/6.1.0/kernel/drivers/scsi/virtio_scsi.ko.xz"]))
    builtin = b"kernel/drivers/block/virtio_blk.ko\n"
    disk = tmp_path / "new.img"
    files = {"boot/initramfs-6.1.0.img": early + main, "lib/modules/6.1.0/modules.builtin": builtin}
    build_disk(disk, 32 * MiB, [Partition(16 * MiB, "ext4", "root", files)])
    found = drivers.inspect_disks([disk])
    assert found.evidence == [
        "disk 0 part1: boot/initramfs-6.1.0.img holds virtio_scsi",
        "disk 0 part1: virtio_blk built into kernel 6.1.0",
    ]


def test_a_windows_guest_is_read_for_viostor(tmp_path: Path) -> None:
    # (FAT: the lab's NTFS partitions hold files at their root only; the reading is the same)
    disk = tmp_path / "win.img"
    files = {"Windows/System32/drivers/viostor.sys": b"MZ", "Windows/System32/drivers/disk.sys": b"MZ"}
    build_disk(disk, 32 * MiB, [Partition(16 * MiB, "fat", "WIN", files)])
    found = drivers.inspect_disks([disk])
    assert found.os == "windows"
    assert found.evidence == ["disk 0 part1: Windows/System32/drivers/viostor.sys"]


def test_without_virt_v2v_in_place_the_conversion_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(drivers.ConversionError, match="virt-v2v-in-place is not installed"):
        drivers.convert(tmp_path / "disk")


def test_the_conversion_runs_virt_v2v_in_place_on_disk_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in ``virt-v2v-in-place`` on PATH records its arguments (the real one is not
    installed here): the command line is ``-i disk <disk>``; a failing run fails with its stderr."""
    record = tmp_path / "argv"
    fake = tmp_path / "virt-v2v-in-place"
    fake.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n[ -z "$FAIL" ] || {{ echo "no root" >&2; exit 1; }}\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    done = drivers.convert(tmp_path / "disk0")
    assert record.read_text().split() == ["-i", "disk", str(tmp_path / "disk0")]
    assert done == {"converted": True, "command": drivers.v2v_command(tmp_path / "disk0")}
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(drivers.ConversionError, match=r"exit 1.*no root"):
        drivers.convert(tmp_path / "disk0")
