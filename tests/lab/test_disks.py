"""Disk images, the datastore mapping and the guest's journal, without the simulator."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lab import DatastoreMap, DatastorePathError, GuestDisk, Partition, build_disk, parse_datastore_path
from lab.datastore import flat_of, journal_of, raw_extent, write_descriptor

MiB = 1024 * 1024


def sfdisk_json(image: Path) -> dict[str, object]:
    out = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, check=True).stdout
    table: dict[str, object] = json.loads(out)["partitiontable"]
    return table


@pytest.mark.parametrize("table", ["gpt", "dos"])
def test_ext4_and_fat_partitions(tmp_path: Path, table: str) -> None:
    image = tmp_path / "d.img"
    layout = build_disk(
        image,
        64 * MiB,
        [
            Partition(16 * MiB, "ext4", "root", {"etc/hostname": b"h\n", "a/b/c.txt": b"deep\n"}),
            Partition(8 * MiB, "fat", "EFI", {"EFI/BOOT/x.efi": b"\x7fEFI" * 100}),
            Partition(4 * MiB, "none"),
        ],
        table=table,  # type: ignore[arg-type]
    )
    assert image.stat().st_size == 64 * MiB
    assert image.stat().st_blocks * 512 < 64 * MiB  # still sparse
    parts = sfdisk_json(image)
    assert parts["label"] == table
    assert [p.start for p in layout.partitions] == [
        int(p["start"]) * 512
        for p in parts["partitions"]  # type: ignore[attr-defined]
    ]
    root, efi, _ = layout.partitions
    cat = subprocess.run(
        ["debugfs", "-R", "cat /a/b/c.txt", f"{image}?offset={root.start}"], capture_output=True, check=True
    )
    assert cat.stdout == b"deep\n"
    label = subprocess.run(
        ["dumpe2fs", "-h", f"{image}?offset={root.start}"], capture_output=True, text=True, check=True
    )
    assert "Filesystem volume name:   root" in label.stdout
    efi_file = subprocess.run(
        ["mtype", "-i", f"{image}@@{efi.start}", "::/EFI/BOOT/x.efi"], capture_output=True, check=True
    )
    assert efi_file.stdout == b"\x7fEFI" * 100


def test_xfs_partition(tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    layout = build_disk(
        image, 400 * MiB, [Partition(320 * MiB, "xfs", "data", {"srv/hello.txt": b"hello\n"})]
    )
    part = layout.partitions[0]
    scratch = tmp_path / "part.img"
    skip, count = part.start // MiB, part.size // MiB
    dd = ["dd", f"if={image}", f"of={scratch}", "bs=1M", f"skip={skip}", f"count={count}", "conv=sparse"]
    subprocess.run([*dd, "status=none"], check=True)
    out = subprocess.run(["xfs_db", "-r", "-c", "label", "-c", "ls /srv", str(scratch)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert 'label = "data"' in out.stdout
    assert "hello.txt" in out.stdout


def test_xfs_needs_300_mib(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="XFS"):
        build_disk(tmp_path / "x.img", 64 * MiB, [Partition(32 * MiB, "xfs")])


def test_datastore_mapping(tmp_path: Path) -> None:
    dsmap = DatastoreMap.for_lab_dir(tmp_path, ["LocalDS_0"])
    assert parse_datastore_path("[LocalDS_0] vm1/vm1.vmdk")[0] == "LocalDS_0"
    desc = dsmap.resolve("[LocalDS_0] vm1/vm1.vmdk")
    assert desc == tmp_path / "datastores" / "LocalDS_0" / "vm1" / "vm1.vmdk"
    for bad in ("vm1/vm1.vmdk", "[Other] vm1.vmdk", "[LocalDS_0] ../escape.vmdk", "[LocalDS_0] /abs.vmdk"):
        with pytest.raises(DatastorePathError):
            dsmap.resolve(bad)
    desc.parent.mkdir(parents=True)
    flat_of(desc).write_bytes(b"\0" * 4096)
    write_descriptor(desc, 4096)
    assert 'RW 8 FLAT "vm1-flat.vmdk" 0' in desc.read_text()
    assert dsmap.image("[LocalDS_0] vm1/vm1.vmdk") == flat_of(desc)
    assert raw_extent(flat_of(desc)) == flat_of(desc)
    assert dsmap.journal("[LocalDS_0] vm1/vm1.vmdk") == journal_of(desc) == desc.parent / "vm1-ctk.jsonl"


def test_guest_writes_are_journalled(tmp_path: Path) -> None:
    desc = tmp_path / "d.vmdk"
    build_disk(flat_of(desc), 8 * MiB, [])
    write_descriptor(desc, 8 * MiB)
    g = GuestDisk(desc)
    assert g.write(4096, b"abc") == 1
    assert g.write(0, b"z" * 512) == 2
    uuid = g.reset_cbt()
    written = g.rewrite_random_chunks(3, chunk=MiB, seed=3, region=(2 * MiB, 8 * MiB))
    assert len({o for o, _ in written}) == 3 and all(2 * MiB <= o < 8 * MiB for o, _ in written)
    assert g.read(4096, 3) == b"abc"
    entries = g.entries()
    assert [(e.op, e.seq) for e in entries] == [
        ("write", 1), ("write", 2), ("reset", 2), ("write", 3), ("write", 4), ("write", 5)
    ]  # fmt: skip
    assert entries[2].uuid == uuid
    assert [(e.offset, e.length) for e in entries[3:]] == written
    lines = [json.loads(line) for line in g.journal.read_text().splitlines()]
    assert lines[0] == {"op": "write", "disk": "d.vmdk", "seq": 1, "offset": 4096, "length": 3}
    with pytest.raises(ValueError):
        g.write(8 * MiB - 1, b"xx")


def test_partition_from_a_directory(tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "usr" / "share").mkdir(parents=True)
    (src / "usr" / "share" / "doc.txt").write_bytes(b"from the tree\n")
    image = tmp_path / "d.img"
    layout = build_disk(
        image, 32 * MiB, [Partition(16 * MiB, "ext4", source=src, files={"etc/extra": b"e\n"})]
    )
    off = layout.partitions[0].start
    for path, want in (("/usr/share/doc.txt", b"from the tree\n"), ("/etc/extra", b"e\n")):
        out = subprocess.run(
            ["debugfs", "-R", f"cat {path}", f"{image}?offset={off}"], capture_output=True, check=True
        )
        assert out.stdout == want
