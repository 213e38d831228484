"""Raw disk images with a partition table and real file systems, built without mounting.

The table is written by ``sfdisk`` (GPT, or MBR with primary and logical partitions); each
partition's file system is made in a scratch file (:mod:`lab.filesystems`) and copied into place
with ``dd conv=notrunc,sparse``. Images stay sparse: unwritten space is holes. Table and
partition UUIDs are derived from the disk's layout, so builds are reproducible.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lab.filesystems import (
    DiskBuildError,
    FsType,
    MiB,
    Partition,
    build_partition,
    fs_uuid,
    lab_uuid,
    run_tool,
)

TableType = Literal["gpt", "dos"]

# sfdisk partition type per file system, for each table type.
_TYPE_CODES: dict[TableType, dict[FsType, str]] = {
    "gpt": {
        "ext4": "L",
        "xfs": "L",
        "fat": "U",
        "ntfs": "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",  # Microsoft basic data
        "lvm": "E6D6D379-F507-44C2-A23C-238F2A3DF928",  # Linux LVM
        "none": "L",
    },
    "dos": {"ext4": "83", "xfs": "83", "fat": "0c", "ntfs": "07", "lvm": "8e", "none": "83"},
}


@dataclass(frozen=True)
class PlacedPartition:
    number: int
    start: int  # bytes from the start of the image
    size: int
    spec: Partition


@dataclass(frozen=True)
class DiskLayout:
    path: Path
    size: int
    table: TableType
    partitions: tuple[PlacedPartition, ...]


def place(scratch: Path, image: Path, offset: int) -> None:
    """Copy the file ``scratch`` into ``image`` at ``offset`` bytes, keeping holes."""
    run_tool(
        "dd",
        f"if={scratch}",
        f"of={image}",
        "bs=1M",
        f"seek={offset}",
        "oflag=seek_bytes",
        "conv=notrunc,sparse",
        "status=none",
    )


def build_disk(path: Path, size: int, partitions: list[Partition], table: TableType = "gpt") -> DiskLayout:
    """Create the sparse raw image ``path`` of ``size`` bytes with ``partitions`` (1 MiB aligned)."""
    if size % MiB:
        raise ValueError("disk size must be a multiple of 1 MiB")
    for p in partitions:
        if p.size <= 0 or p.size % MiB:
            raise ValueError("partition sizes must be positive multiples of 1 MiB")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    layout = DiskLayout(path, size, table, ())
    if not partitions:
        return layout

    label = "gpt" if table == "gpt" else "dos"
    disk_id = lab_uuid(f"disk:{size}:{table}:{[(p.fs, p.label, p.size) for p in partitions]}")
    label_id = str(disk_id) if table == "gpt" else f"0x{disk_id.hex[:8]}"
    script = [f"label: {label}", f"label-id: {label_id}", "unit: sectors", ""]
    for number, p in enumerate(partitions, 1):
        part_uuid = f", uuid={fs_uuid(p, number, 'partition')}" if table == "gpt" else ""
        script.append(f"size={p.size // 512}, type={_TYPE_CODES[table][p.fs]}{part_uuid}")
    run_tool(
        "sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path), stdin="\n".join(script).encode()
    )
    info = json.loads(run_tool("sfdisk", "--json", str(path)))
    sector = int(info["partitiontable"].get("sectorsize", 512))
    placed = []
    for i, (spec, entry) in enumerate(zip(partitions, info["partitiontable"]["partitions"], strict=True)):
        start, psize = int(entry["start"]) * sector, int(entry["size"]) * sector
        if psize != spec.size:
            raise DiskBuildError(f"partition {i + 1}: sfdisk made {psize} bytes, asked {spec.size}")
        placed.append(PlacedPartition(i + 1, start, psize, spec))

    _write_file_systems(path, placed)
    return DiskLayout(path, size, table, tuple(placed))


def _write_file_systems(path: Path, placed: list[PlacedPartition]) -> None:
    """Make each placed partition's file system in a scratch image and write it at its offset."""
    with tempfile.TemporaryDirectory(prefix="lab-disk-", dir=path.parent) as tmp:
        work = Path(tmp)
        for pp in placed:
            if pp.spec.fs == "none":
                continue
            scratch = work / f"part{pp.number}.img"
            build_partition(pp.spec, pp.number, scratch, work)
            place(scratch, path, pp.start)
            scratch.unlink()


def build_dos_disk_with_logicals(
    path: Path, size: int, primaries: list[Partition], logicals: list[Partition]
) -> DiskLayout:
    """An MBR disk as Linux numbers it: ``primaries`` in slots 1, 2, ..., then an extended
    partition over the rest of the disk holding ``logicals``, which Linux (and ``sfdisk``)
    number 5, 6, ... Each logical partition sits behind its own extended boot record (1 MiB
    aligned, as ``sfdisk`` places them). The layout lists the primaries and the logicals (not
    the extended container) with their numbers."""
    if size % MiB:
        raise ValueError("disk size must be a multiple of 1 MiB")
    if len(primaries) > 3 or not logicals:
        raise ValueError("at most 3 primary partitions and at least one logical partition")
    for p in (*primaries, *logicals):
        if p.size <= 0 or p.size % MiB:
            raise ValueError("partition sizes must be positive multiples of 1 MiB")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    everything = [*primaries, *logicals]
    disk_id = lab_uuid(f"disk:{size}:dos+logical:{[(p.fs, p.label, p.size) for p in everything]}")
    script = ["label: dos", f"label-id: 0x{disk_id.hex[:8]}", "unit: sectors", ""]
    script += [f"size={p.size // 512}, type={_TYPE_CODES['dos'][p.fs]}" for p in primaries]
    script.append("type=5")  # the extended partition: the rest of the disk
    script += [f"size={p.size // 512}, type={_TYPE_CODES['dos'][p.fs]}" for p in logicals]
    run_tool(
        "sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path), stdin="\n".join(script).encode()
    )
    info = json.loads(run_tool("sfdisk", "--json", str(path)))
    sector = int(info["partitiontable"].get("sectorsize", 512))
    entries = [e for e in info["partitiontable"]["partitions"] if e["type"] not in ("5", "f", "85")]
    numbers = [*range(1, len(primaries) + 1), *range(5, 5 + len(logicals))]
    placed = []
    for number, spec, entry in zip(numbers, everything, entries, strict=True):
        node_number = int(str(entry["node"]).removeprefix(str(path)))
        if node_number != number:
            raise DiskBuildError(f"sfdisk numbered partition {number} as {node_number}")
        start, psize = int(entry["start"]) * sector, int(entry["size"]) * sector
        if psize != spec.size:
            raise DiskBuildError(f"partition {number}: sfdisk made {psize} bytes, asked {spec.size}")
        placed.append(PlacedPartition(number, start, psize, spec))
    _write_file_systems(path, placed)
    return DiskLayout(path, size, "dos", tuple(placed))
