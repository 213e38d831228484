"""The lab's bootable guest and the qemu runner that boots it (``docs/lab-boot.md``).

:mod:`~lab.bootdisk.image`
    :func:`build_boot_disk` makes a raw MBR disk that boots a Debian kernel with syslinux and a
    busybox initramfs (:mod:`~lab.bootdisk.initramfs`), all without mounting; its data partition
    holds the file the guest reads at boot, which :func:`rewrite_data` changes in place.
:mod:`~lab.bootdisk.marker`
    The boot line the guest prints on its serial console, and its parser.
:mod:`~lab.bootdisk.qemu`
    :class:`RunningVM` runs a VM under ``qemu-system-x86_64`` (KVM when a probe boot shows it
    works, TCG otherwise), knows when qemu is up (:mod:`~lab.bootdisk.qmp`), waits for the boot
    line and stops it.
"""

from .image import BootDiskInfo, build_boot_disk, read_data, rewrite_data, zero_boot_sector
from .initramfs import InitramfsError, build_initramfs
from .marker import BootMarker, GuestReportedError, find_marker
from .qemu import (
    BootTimeout,
    NoBootableDisk,
    ProbeResult,
    RunningVM,
    VmDisk,
    VmError,
    VmSpec,
    accelerator,
    probe_kvm,
)

__all__ = [
    "BootDiskInfo",
    "BootMarker",
    "BootTimeout",
    "GuestReportedError",
    "InitramfsError",
    "NoBootableDisk",
    "ProbeResult",
    "RunningVM",
    "VmDisk",
    "VmError",
    "VmSpec",
    "accelerator",
    "build_boot_disk",
    "build_initramfs",
    "find_marker",
    "probe_kvm",
    "read_data",
    "rewrite_data",
    "zero_boot_sector",
]
