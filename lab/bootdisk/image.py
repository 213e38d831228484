"""A bootable raw disk image for the lab guest, built without mounting and without loop devices.

Layout (an MBR disk, partitions 1 MiB aligned by ``sfdisk``)::

    sector 0      syslinux's MBR boot code (``/usr/lib/syslinux/mbr/mbr.bin``, 440 bytes) in front
                  of the partition table; partition 1 marked active
    partition 1   FAT, label LABBOOT: syslinux (``ldlinux.sys``, ``ldlinux.c32``, its boot sector),
                  ``syslinux.cfg``, the Debian kernel ``vmlinuz`` and the guest's ``initrd.gz``
    partition 2   FAT, label LABDATA: the data file the guest reads and digests at boot

Both file systems are made by :func:`lab.disks.build_disk` (``mkfs.fat`` + ``mcopy`` in a
scratch file, copied into place), so the data partition can later be rebuilt and only the blocks
that differ written back, journalled when a :class:`~lab.guest.GuestDisk` is given
(:func:`rewrite_data`, through :func:`lab.guest.rewrite_partition`). The boot partition's
FAT then gets its "hidden sectors" field (the partition's first sector, BPB offset 0x1C, which
``mkfs.fat`` leaves 0 in a scratch file) and ``syslinux --install --offset`` installs the boot
loader into the image at the partition's offset.

The VM's identity is written into the image at build time (in the initramfs); the data file is
read at each boot. See ``docs/lab-boot.md``.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lab.disks import DiskLayout, PlacedPartition, build_disk
from lab.filesystems import DiskBuildError, MiB, Partition, run_tool
from lab.guest import GuestDisk, pwrite_all, rewrite_partition

from .initramfs import build_initramfs, kernel_versions
from .marker import check_vm_name

MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
#: syslinux's MBR code is 440 bytes: the disk signature (4 bytes at 440) and the partition
#: table (at 446) follow it and are kept.
MBR_CODE_BYTES = 440
PARTITION_TABLE = 446
ACTIVE = 0x80
BPB_HIDDEN_SECTORS = 0x1C
SECTOR = 512

BOOT_LABEL = "LABBOOT"
DATA_LABEL = "LABDATA"
#: The file the guest digests, at the data partition's root.
DATA_FILE = "data.bin"
#: The boot partition: kernel (about 8 MiB), initramfs (about 2 MiB) and syslinux, with room.
BOOT_PARTITION_BYTES = 24 * MiB
#: Kernel command line: the serial console, and little else printed before the boot line.
KERNEL_ARGS = "console=ttyS0,115200 quiet loglevel=3 panic=0"


@dataclass(frozen=True)
class BootDiskInfo:
    """What :func:`build_boot_disk` made: the layout (both partitions' offsets) and what the
    guest will print."""

    layout: DiskLayout
    vm_name: str
    kernel_version: str
    data_sha256: str
    data_bytes: int

    @property
    def path(self) -> Path:
        return self.layout.path

    @property
    def boot(self) -> PlacedPartition:
        return self.layout.partitions[0]

    @property
    def data(self) -> PlacedPartition:
        return self.layout.partitions[1]


def syslinux_cfg(kernel_args: str = KERNEL_ARGS) -> str:
    return (
        "SERIAL 0 115200\n"
        "DEFAULT lab\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL lab\n"
        "  LINUX /vmlinuz\n"
        "  INITRD /initrd.gz\n"
        f"  APPEND {kernel_args}\n"
    )


def _kernel(version: str | None) -> str:
    versions = kernel_versions()
    if not versions:
        raise DiskBuildError("no Debian kernel in /boot: install linux-image-amd64 (scripts/bootstrap.sh)")
    if version is None:
        return versions[-1]
    if version not in versions:
        raise DiskBuildError(f"kernel {version} is not installed (have: {', '.join(versions)})")
    return version


def build_boot_disk(
    path: Path, *, vm_name: str, size: int, data: bytes, kernel_version: str | None = None
) -> BootDiskInfo:
    """Create the raw image ``path`` (``size`` bytes, sparse) that boots the lab guest ``vm_name``
    whose data partition holds ``data`` as :data:`DATA_FILE`. The newest installed Debian kernel
    unless ``kernel_version`` is given."""
    check_vm_name(vm_name)
    if not MBR_CODE.is_file():
        raise DiskBuildError(f"{MBR_CODE} is missing: install syslinux-common (scripts/bootstrap.sh)")
    data_size = size - MiB - BOOT_PARTITION_BYTES
    if size % MiB or data_size < 2 * MiB or len(data) > data_size - MiB:
        raise ValueError(
            f"a lab boot disk is a multiple of 1 MiB with room for {len(data)} data bytes "
            f"after {BOOT_PARTITION_BYTES // MiB + 1} MiB of boot: {size} bytes is not"
        )
    kernel = _kernel(kernel_version)
    boot_files = {
        "syslinux.cfg": syslinux_cfg().encode(),
        "vmlinuz": Path(f"/boot/vmlinuz-{kernel}").read_bytes(),
        "initrd.gz": build_initramfs(vm_name, DATA_FILE, kernel),
    }
    layout = build_disk(
        path,
        size,
        [
            Partition(BOOT_PARTITION_BYTES, "fat", BOOT_LABEL, boot_files),
            Partition(data_size, "fat", DATA_LABEL, {DATA_FILE: data}),
        ],
        table="dos",
    )
    boot = layout.partitions[0]
    with path.open("r+b") as f:
        sector0 = bytearray(f.read(SECTOR))
        sector0[:MBR_CODE_BYTES] = MBR_CODE.read_bytes()[:MBR_CODE_BYTES]
        sector0[PARTITION_TABLE] = ACTIVE
        f.seek(0)
        f.write(sector0)
    pwrite_all(path, boot.start + BPB_HIDDEN_SECTORS, struct.pack("<I", boot.start // SECTOR))
    run_tool("syslinux", "--install", "--offset", str(boot.start), str(path))
    return BootDiskInfo(layout, vm_name, kernel, hashlib.sha256(data).hexdigest(), len(data))


def rewrite_data(image_or_guest: Path | GuestDisk, info: BootDiskInfo, data: bytes) -> list[tuple[int, int]]:
    """Replace the data file with ``data`` as the guest would, in the image (no mount): the data
    partition is rebuilt and only the 64 KiB blocks that differ are written, through
    ``image_or_guest`` (a :class:`~lab.guest.GuestDisk` journals them for change tracking).
    Returns the written ``(offset, length)`` areas of the disk. The next boot prints ``data``'s
    digest."""
    if len(data) > info.data.size - MiB:
        raise ValueError(f"{len(data)} data bytes do not fit the {info.data.size} byte data partition")
    return rewrite_partition(image_or_guest, info.layout, info.data.number, {DATA_FILE: data})


def read_data(info: BootDiskInfo, image: Path | None = None) -> bytes:
    """The data file as the image holds it now (``mcopy`` from the data partition, no mount)."""
    source = image if image is not None else info.path
    with tempfile.TemporaryDirectory(prefix="lab-bootdisk-") as tmp:
        out = Path(tmp) / DATA_FILE
        run_tool("mcopy", "-n", "-i", f"{source}@@{info.data.start}", f"::{DATA_FILE}", str(out))
        return out.read_bytes()


def zero_boot_sector(image: Path) -> None:
    """Zero sector 0 (boot code, partition table, signature): the disk no longer boots. What a
    copy that missed the first sector looks like to a VM."""
    pwrite_all(image, 0, bytes(SECTOR))
