"""Is the guest ready for KVM? Its file systems read for virtio drivers, and the conversion.

A guest boots on CloudStack's KVM from a virtio disk only if it has a virtio block (or SCSI)
driver where its boot needs it. The disks are read as file-level restore reads them
(:func:`oma.restore.filesystems.find_volumes`: partitions, LVM, ext/XFS/FAT/NTFS through dissect,
nothing mounted), and the evidence looked for is:

- **Linux**: every initramfs (``initrd*``/``initramfs*`` at the top of a file system or in
  ``/boot``; gzip, xz or uncompressed ``newc`` cpio archives) that holds ``virtio_blk.ko*`` or
  ``virtio_scsi.ko*``; or ``modules.builtin`` of a kernel (``/lib/modules/<version>/``) naming
  them (built into the kernel);
- **Windows**: ``Windows/System32/drivers/viostor.sys`` or ``vioscsi.sys``.

What was found is the ``prepare`` step's result. When no driver is found the guest is converted
with ``virt-v2v-in-place -i disk <disk 0>`` (libguestfs: it installs virtio drivers and fixes the
boot configuration in place) when that command is installed; otherwise the step fails naming it.
Every call here blocks: run it in a worker thread.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from oma.restore.filesystems import Entry, FileSystem, find_volumes

V2V_COMMAND = "virt-v2v-in-place"
#: How long a conversion may take (virt-v2v boots a small appliance; minutes on a slow host).
V2V_TIMEOUT_S = 3600
LINUX_DRIVERS = ("virtio_blk", "virtio_scsi")
WINDOWS_DRIVERS = ("viostor.sys", "vioscsi.sys")
_INITRD_PREFIXES = ("initrd", "initramfs")
#: An initramfs larger than this is not read (a real one is tens of MiB).
_MAX_INITRD = 512 * 1024 * 1024
_CPIO_MAGIC = (b"070701", b"070702")


class ConversionError(Exception):
    """The guest has no virtio driver and cannot be converted here (message says why)."""


@dataclass
class Inspection:
    """What the guest's disks showed: ``evidence`` names each driver found and where."""

    filesystems: list[dict[str, Any]] = field(default_factory=list)
    os: str = "unknown"
    evidence: list[str] = field(default_factory=list)

    @property
    def has_virtio(self) -> bool:
        return bool(self.evidence)

    def describe(self) -> dict[str, Any]:
        return {
            "filesystems": self.filesystems,
            "os": self.os,
            "virtio_drivers": self.has_virtio,
            "evidence": self.evidence,
        }


def inspect_disks(devices: list[Path]) -> Inspection:
    """Read every file system of ``devices`` for virtio drivers (module doc)."""
    found = Inspection()
    for index, device in enumerate(devices):
        with device.open("rb") as fh:
            for volume in find_volumes(fh):
                where = f"disk {index} {volume.name}"
                found.filesystems.append({"disk": index, **volume.describe()})
                _inspect(volume.fs, where, found)
    return found


def _inspect(fs: FileSystem, where: str, found: Inspection) -> None:
    root = fs.root()
    windows = _path(fs, root, "Windows", "System32", "drivers")
    if windows is not None:
        found.os = "windows"
        names = {e.name.lower() for e in fs.children(windows)}
        found.evidence += [f"{where}: Windows/System32/drivers/{d}" for d in WINDOWS_DRIVERS if d in names]
        return
    for directory, prefix in ((root, ""), (_path(fs, root, "boot"), "boot/")):
        if directory is None:
            continue
        for entry in fs.children(directory):
            if entry.kind == "file" and entry.name.lower().startswith(_INITRD_PREFIXES):
                found.os = "linux"
                if entry.size > _MAX_INITRD:
                    continue
                with fs.open(entry) as fh:
                    drivers = _initrd_drivers(fh)
                found.evidence += [f"{where}: {prefix}{entry.name} holds {d}" for d in drivers]
    for modules in (_path(fs, root, "lib", "modules"), _path(fs, root, "usr", "lib", "modules")):
        if modules is None:
            continue
        found.os = "linux"
        for version in fs.children(modules):
            builtin = fs.lookup(version, "modules.builtin") if version.kind == "directory" else None
            if builtin is None:
                continue
            with fs.open(builtin) as fh:
                text = fh.read().decode(errors="replace")
            found.evidence += [
                f"{where}: {d} built into kernel {version.name}" for d in LINUX_DRIVERS if f"/{d}.ko" in text
            ]


def _path(fs: FileSystem, start: Entry, *names: str) -> Entry | None:
    """The directory ``names`` below ``start`` (names matched without case), None if missing."""
    current = start
    for name in names:
        match = next(
            (e for e in fs.children(current) if e.name.lower() == name.lower() and e.kind == "directory"),
            None,
        )
        if match is None:
            return None
        current = match
    return current


def _initrd_drivers(fh: BinaryIO) -> list[str]:
    """The virtio block drivers an initramfs holds (its archives read in order; an early
    microcode archive before a compressed one is skipped as the kernel does)."""
    data = fh.read(_MAX_INITRD)
    names: set[str] = set()
    for member in _cpio_names(data):
        base = member.rsplit("/", 1)[-1]
        names.update(d for d in LINUX_DRIVERS if base.startswith(f"{d}.ko"))
    return sorted(names)


def _cpio_names(data: bytes) -> Iterator[str]:
    """Member names of the concatenated (maybe compressed) newc archives in ``data``."""
    while data:
        data = data.lstrip(b"\0")
        if not data:
            return
        if data[:6] in _CPIO_MAGIC:
            data = yield from _newc(data)
            continue
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        elif data[:6] == b"\xfd7zXZ\x00":
            data = lzma.decompress(data)
        else:
            return  # a compression this reader does not know (zstd, lz4): no evidence from it


def _newc(data: bytes) -> Generator[str, None, bytes]:
    """Names of one newc archive; returns what follows it."""
    offset = 0
    while data[offset : offset + 6] in _CPIO_MAGIC:
        header = data[offset : offset + 110]
        size, name_size = int(header[54:62], 16), int(header[94:102], 16)
        name = data[offset + 110 : offset + 110 + name_size - 1].decode(errors="replace")
        offset = (offset + 110 + name_size + 3) & ~3
        offset = (offset + size + 3) & ~3
        if name == "TRAILER!!!":
            break
        yield name
    return data[offset:]


def v2v_command(disk: Path) -> list[str]:
    """The conversion's command line: the guest's disk 0 converted in place."""
    return [V2V_COMMAND, "-i", "disk", str(disk)]


def convert(disk: Path) -> dict[str, Any]:
    """Install virtio drivers into the guest on ``disk`` with ``virt-v2v-in-place``
    (:class:`ConversionError` when it is not installed or fails)."""
    if shutil.which(V2V_COMMAND) is None:
        raise ConversionError(
            f"the guest has no virtio driver and {V2V_COMMAND} is not installed on the OMA"
            " (Debian: apt-get install guestfs-tools virt-v2v): install it, or add virtio drivers to"
            " the source VM, then fail over again"
        )
    command = v2v_command(disk)
    done = subprocess.run(command, capture_output=True, text=True, timeout=V2V_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise ConversionError(
            f"{V2V_COMMAND} failed (exit {done.returncode}):"
            f" {done.stderr.strip()[-500:] or done.stdout[-500:]}"
        )
    return {"converted": True, "command": command}
