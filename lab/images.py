"""Disk images an operator brings to the lab: what they are, and their bytes as a raw file.

The lab keeps every disk as a raw, sparse file (a vSphere lab disk's ``-flat.vmdk``, a lab
CloudStack volume). An image given to it (``python -m lab add-vm --disk IMAGE``, a lab CloudStack
template's ``image``) may be raw or QCOW2; :func:`inspect_image` asks ``qemu-img info`` which
(qemu-img's own probe: the same one qemu uses) and how large the disk is, and :func:`copy_as_raw`
writes its bytes as a raw file with ``qemu-img convert`` (zeros become holes), under the final name
only once the copy is whole. Other formats qemu-img knows (VMDK, VDI, VHDX, ...) are refused: the
lab takes the two formats a KVM cloud keeps its disks in. :func:`partition_layout` reads the
partition table such a disk has (``sfdisk --json``), since the lab did not build it.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lab.disks import DiskLayout, PlacedPartition
from lab.filesystems import DiskBuildError, Partition

ImageFormat = Literal["raw", "qcow2"]
FORMATS: tuple[ImageFormat, ...] = ("raw", "qcow2")
QEMU_IMG = "qemu-img"


class ImageError(DiskBuildError):
    """An image the lab cannot use; the message says why, in one line."""


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    format: ImageFormat
    virtual_size: int  # bytes the disk holds (a raw file's size rounded up to 512)


def _qemu_img(*args: str) -> bytes:
    try:
        proc = subprocess.run([QEMU_IMG, *args], capture_output=True, check=False)
    except FileNotFoundError as e:
        raise ImageError(f"{QEMU_IMG} is not installed: install qemu-utils (scripts/bootstrap.sh)") from e
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        raise ImageError(f"{QEMU_IMG} {args[0]}: {message[-1] if message else f'exit {proc.returncode}'}")
    return proc.stdout


def inspect_image(path: Path) -> ImageInfo:
    """Format and virtual size of the image ``path`` (raw or QCOW2; :class:`ImageError` otherwise)."""
    if not path.is_file():
        raise ImageError(f"no image file {path}")
    info = json.loads(_qemu_img("info", "--output=json", str(path)))
    found = info.get("format")
    if found not in FORMATS:
        raise ImageError(f"{path} is a {found} image: the lab takes raw and qcow2 images")
    fmt: ImageFormat = "raw" if found == "raw" else "qcow2"
    return ImageInfo(path, fmt, int(info["virtual-size"]))


def copy_as_raw(image: ImageInfo, target: Path, size: int | None = None) -> None:
    """Write the disk ``image`` holds as the raw, sparse file ``target`` of ``size`` bytes (default:
    the image's virtual size; a larger size reads as zeros after the image's end). The copy goes
    to a temporary name in ``target``'s directory and is renamed once complete and fsynced."""
    size = image.virtual_size if size is None else size
    if size < image.virtual_size:
        raise ImageError(f"{image.path} holds {image.virtual_size} bytes: it does not fit {size}")
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        _qemu_img("convert", "-f", image.format, "-O", "raw", str(image.path), str(tmp))
        with tmp.open("r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def partition_layout(raw: Path) -> DiskLayout:
    """The partitions ``sfdisk`` finds on the raw disk ``raw`` (their file systems unknown to the
    lab: ``"none"``). A disk without a partition table is given as an empty ``dos`` table."""
    size = raw.stat().st_size
    proc = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, check=False)
    if proc.returncode != 0:  # no table sfdisk knows
        return DiskLayout(raw, size, "dos", ())
    table = json.loads(proc.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    placed = []
    for entry in table.get("partitions", []):
        number = int("".join(c for c in entry["node"][len(str(raw)) :] if c.isdigit()))
        start, length = int(entry["start"]) * sector, int(entry["size"]) * sector
        placed.append(PlacedPartition(number, start, length, Partition(length, "none")))
    return DiskLayout(raw, size, "gpt" if table["label"] == "gpt" else "dos", tuple(placed))
