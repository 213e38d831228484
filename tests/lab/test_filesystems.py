"""NTFS and LVM2 lab partitions, reproducible builds and guests rewriting a partition's files.

The oracle is dissect reading the images (the same parsers the OMA's file-level restore uses),
and, for LVM2, the checksums lvm2 itself verifies.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from dissect.extfs import ExtFS
from dissect.ntfs import NTFS
from dissect.volume.disk import Disk
from dissect.volume.lvm import LVM2

from lab import GuestDisk, MiB, Partition, build_disk
from lab.datastore import flat_of, write_descriptor
from lab.guest import REWRITE_BLOCK, rewrite_partition
from lab.lvm import lvm_crc

FILES = {"etc/hostname": b"guest-1\n", "data/deep/nested.bin": bytes(range(256)) * 300}


def _ext_files(fh: object, names: list[str]) -> dict[str, bytes]:
    fs = ExtFS(fh)
    return {n: fs.get(n).open().read() for n in names}


def test_ntfs_partition_holds_its_files(tmp_path: Path) -> None:
    layout = build_disk(
        tmp_path / "n.img",
        48 * MiB,
        [
            Partition(
                32 * MiB, "ntfs", "DATA", {"report.txt": b"ntfs report\n", "big.bin": b"\x01" * (3 * MiB)}
            )
        ],
    )
    with layout.path.open("rb") as fh:
        (part,) = Disk(fh).partitions
        assert part.offset == layout.partitions[0].start
        fs = NTFS(part.open())
        assert fs.volume_name == "DATA"
        assert fs.mft.get("report.txt").open().read() == b"ntfs report\n"
        assert fs.mft.get("big.bin").size() == 3 * MiB
    with pytest.raises(ValueError, match="root only"):
        build_disk(tmp_path / "m.img", 48 * MiB, [Partition(32 * MiB, "ntfs", files={"a/b.txt": b"x"})])


def test_lvm_partition_holds_an_ext4_logical_volume(tmp_path: Path) -> None:
    layout = build_disk(
        tmp_path / "l.img",
        64 * MiB,
        [Partition(48 * MiB, "lvm", files=FILES, volume_group="vg_lab", logical_volume="lv_root")],
        table="dos",
    )
    start = layout.partitions[0].start
    with layout.path.open("rb") as fh:
        (part,) = Disk(fh).partitions
        assert part.type == 0x8E
        lvm = LVM2(part.open())
        assert lvm.vg.name == "vg_lab"
        (lv,) = lvm.vg.lv
        assert lv.name == "lv_root" and lv.type == "striped"
        assert _ext_files(lv.open(), ["/etc/hostname", "/data/deep/nested.bin"]) == {
            "/etc/hostname": FILES["etc/hostname"],
            "/data/deep/nested.bin": FILES["data/deep/nested.bin"],
        }
        # The checksums lvm2 verifies: the label from offset_xl on, the mda header from byte 4 on.
        fh.seek(start + 512)
        label = fh.read(512)
        assert label[:8] == b"LABELONE" and struct.unpack_from("<I", label, 16)[0] == lvm_crc(label[20:])
        fh.seek(start + 4096)
        mda = fh.read(512)
        assert struct.unpack_from("<I", mda, 0)[0] == lvm_crc(mda[4:])


def test_builds_are_reproducible(tmp_path: Path) -> None:
    parts = [Partition(24 * MiB, "ext4", "root", FILES, symlinks={"link": "etc/hostname"}),
             Partition(16 * MiB, "fat", "EFI", {"EFI/Boot/Loader.efi": b"MZ" * 100})]  # fmt: skip
    a = build_disk(tmp_path / "a.img", 48 * MiB, parts)
    time.sleep(1.1)  # host times (a file's ctime) move on: they must not reach the image
    b = build_disk(tmp_path / "b.img", 48 * MiB, parts)
    assert a.path.read_bytes() == b.path.read_bytes()


def test_rewrite_partition_writes_only_changed_blocks_as_guest_writes(tmp_path: Path) -> None:
    desc = tmp_path / "vm1.vmdk"
    layout = build_disk(
        flat_of(desc),
        64 * MiB,
        [
            Partition(16 * MiB, "fat", "BOOT", {"Boot.cfg": b"boot\n"}),
            Partition(40 * MiB, "ext4", "root", FILES),
        ],
    )
    write_descriptor(desc, 64 * MiB)
    guest = GuestDisk(desc)
    before = flat_of(desc).read_bytes()
    new_files = {**FILES, "etc/hostname": b"guest-2\n", "var/log/new.log": b"log line\n" * 5000}
    written = rewrite_partition(guest, layout, 2, new_files)

    part = layout.partitions[1]
    assert written and all(part.start <= o and o + n <= part.start + part.size for o, n in written)
    assert all(o % REWRITE_BLOCK == 0 and n % REWRITE_BLOCK == 0 for o, n in written)
    assert sum(n for _, n in written) < 4 * MiB  # a few blocks, not the partition
    entries = [(e.offset, e.length) for e in guest.entries() if e.op == "write"]
    assert entries == written
    after = flat_of(desc).read_bytes()
    changed = [
        i
        for i in range(0, len(after), REWRITE_BLOCK)
        if after[i : i + REWRITE_BLOCK] != before[i : i + REWRITE_BLOCK]
    ]
    assert changed and all(any(o <= i < o + n for o, n in written) for i in changed)
    with flat_of(desc).open("rb") as fh:
        fs_stream = Disk(fh).partitions[1].open()
        assert _ext_files(fs_stream, ["/etc/hostname", "/var/log/new.log"]) == {
            "/etc/hostname": b"guest-2\n",
            "/var/log/new.log": b"log line\n" * 5000,
        }
    # The same content again: nothing to write.
    assert rewrite_partition(flat_of(desc), layout, 2, new_files) == []
