"""File-level restore without a kernel mount: ``dissect.volume`` finds the partition and
``dissect.extfs`` reads files of an ext4 file system through :func:`pyapp.mover.open_image`,
on QCOW2 chains made by ``qemu-img`` and by the mover.

The disk is built without mounting anything: an MBR partition table written by ``sfdisk`` on a
sparse file, and an ext4 partition image made by ``mke2fs -d DIR`` and copied into place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from dissect.extfs import ExtFS
from dissect.volume.disk import Disk

from pyapp import mover

pytestmark = pytest.mark.interop

MiB = 1 << 20
DISK = 64 * MiB
PART_START = MiB
PART_SIZE = 48 * MiB


def build_disk(path: Path, files: dict[str, bytes], work: Path) -> None:
    root = work / "root"
    shutil.rmtree(root, ignore_errors=True)
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    part = work / "part.img"
    part.unlink(missing_ok=True)
    # Fixed UUID and hash seed: the two versions of the disk differ only where files do.
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-U", "c0ffee00-0000-4000-8000-000000000001",
                    "-E", "hash_seed=c0ffee00-0000-4000-8000-000000000002", "-d", str(root), str(part),
                    f"{PART_SIZE // 1024}k"],
                   check=True, env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"})
    with open(path, "wb") as f:
        f.truncate(DISK)
    table = f"label: dos\nstart={PART_START // 512}, size={PART_SIZE // 512}, type=83\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True)
    subprocess.run(["dd", f"if={part}", f"of={path}", "bs=1M", f"seek={PART_START // MiB}",
                    "conv=notrunc,sparse", "status=none"], check=True)


def read_files(image: Path, names: list[str]) -> dict[str, bytes]:
    with mover.open_image(image) as fh:
        disk = Disk(fh)
        parts = [p for p in disk.partitions if p.size > 0]
        assert len(parts) == 1 and parts[0].offset == PART_START
        fs = ExtFS(parts[0].open())
        return {n: fs.get(n).open().read() for n in names}


def changed_chunks(a: Path, b: Path) -> list[tuple[int, int]]:
    """The 1 MiB chunks that differ between two raw disks, as CBT would report them."""
    out = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for i in range(DISK // MiB):
            if fa.read(MiB) != fb.read(MiB):
                out.append((i * MiB, MiB))
    return out


async def test_dissect_reads_ext4_files_through_qcow2_chains(tmp_path: Path) -> None:
    rng = random.Random(5)
    v1 = {"etc/hostname": b"guest-1\n", "data/blob.bin": rng.randbytes(3 * MiB + 123),
          "data/notes.txt": b"first version\n" * 100}
    v2 = {**v1, "etc/hostname": b"guest-2\n", "data/new.bin": rng.randbytes(MiB + 7)}
    raw1, raw2 = tmp_path / "v1.raw", tmp_path / "v2.raw"
    build_disk(raw1, v1, tmp_path)
    build_disk(raw2, v2, tmp_path)
    names1 = ["/" + n for n in v1]
    names2 = ["/" + n for n in v2]
    want1 = {"/" + k: v for k, v in v1.items()}
    want2 = {"/" + k: v for k, v in v2.items()}
    assert read_files(raw1, names1) == want1

    # A chain made by qemu-img: a full, and an overlay holding the second version's changes.
    q_full, q_inc = tmp_path / "q-full.qcow2", tmp_path / "q-inc.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw1), str(q_full)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", q_full.name, "-F", "qcow2", str(q_inc)],
                   check=True)
    new = raw2.read_bytes()
    for off, length in changed_chunks(raw1, raw2):
        pattern = tmp_path / "chunk.bin"
        pattern.write_bytes(new[off:off + length])
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {pattern} {off} {length}", str(q_inc)],
                       check=True, capture_output=True)
    assert read_files(q_full, names1) == want1
    assert read_files(q_inc, names2) == want2

    # The same chain written by the mover: a full, then an incremental of the changed chunks.
    m_full, m_inc = tmp_path / "m-full.qcow2", tmp_path / "m-inc.qcow2"
    await mover.copy(str(raw1), str(m_full), allocated_only=True)
    await mover.copy(str(raw2), str(m_inc), extents=changed_chunks(raw1, raw2), backing=m_full)
    assert read_files(m_full, names1) == want1
    assert read_files(m_inc, names2) == want2
    assert (await mover.verify(str(m_inc))).ok
    doc = await mover.info(m_inc)
    assert doc["layers"][0]["backing_file"] == "m-full.qcow2"
    assert json.dumps(doc)
