"""File-level restore benchmark: reading one large file out of a backup, as a ratio against
``debugfs``, e2fsprogs' own user-space ext4 reader.

    (a) restore read from the QCOW2 point / ``debugfs dump`` from the raw file system image
    (b) restore read from the raw image / ``debugfs dump`` from the same raw image

The restore read is what ``GET /restore/{id}/download`` does below HTTP: ``oma.restore.Mount``
(dissect's ext4 over the mover's QCOW2 reader) streaming the file in 1 MiB reads. (b) isolates
dissect's cost; (a) adds the QCOW2 reader's. The file system holds one file of ``--size-mib`` MiB
of random data plus small files, made by ``mke2fs -d`` (no partition table). Each timing is the
median of ``--runs`` runs, peer and restore alternating, from a warm page cache (each runs once
before timing): the figures compare the readers, not the disk. Usage:
``python bench/restore_bench.py [--size-mib 1024] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
from pathlib import Path

import trio
from harness import HERE, interleaved, run_cmd

from oma.restore.mount import Mount
from pyapp import mover

MiB = 1 << 20


def build(work: Path, size_mib: int) -> tuple[Path, Path]:
    """An ext4 image holding ``big.bin`` (random) and a few small files, and its QCOW2 backup."""
    raw, qcow2 = work / f"restore-{size_mib}m.ext4", work / f"restore-{size_mib}m.qcow2"
    if raw.exists() and qcow2.exists():
        return raw, qcow2
    tree = work / "restore-tree"
    (tree / "etc").mkdir(parents=True, exist_ok=True)  # kept: the check reads big.bin back
    (tree / "etc" / "hostname").write_text("bench\n")
    with (tree / "big.bin").open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MiB))
    fs_size = size_mib + max(64, size_mib // 8)
    raw.unlink(missing_ok=True)
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(raw), f"{fs_size}M"], check=True
    )
    qcow2.unlink(missing_ok=True)
    trio.run(lambda: mover.copy(str(raw), str(qcow2), allocated_only=True))
    return raw, qcow2


def restore_read(image: Path, *, digest: bool = False) -> str:
    """Stream ``/big.bin`` out of ``image`` in 1 MiB reads; its SHA-256 when ``digest``."""
    h = hashlib.sha256()
    mount = Mount.open(image)
    try:
        reader, _ = mount.open_file("/big.bin")
        with reader:
            while chunk := reader.read(MiB):
                if digest:
                    h.update(chunk)
    finally:
        mount.close()
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    raw, qcow2 = build(args.workdir, args.size_mib)
    # Both discard what they read: debugfs dumps into /dev/null.
    debugfs = run_cmd(["debugfs", "-R", "dump /big.bin /dev/null", str(raw)])
    with (args.workdir / "restore-tree" / "big.bin").open("rb") as f:
        expected = hashlib.file_digest(f, "sha256").hexdigest()
    if restore_read(qcow2, digest=True) != expected:
        raise SystemExit("the restore read did not return the file's bytes")
    for warm in (debugfs, lambda: restore_read(qcow2), lambda: restore_read(raw)):
        warm()
    peer, from_qcow2, from_raw = interleaved(
        args.runs, lambda: None, debugfs, lambda: restore_read(qcow2), lambda: restore_read(raw)
    )
    figures = {
        "size_mib": args.size_mib,
        "debugfs_s": round(peer, 3),
        "restore_qcow2_s": round(from_qcow2, 3),
        "restore_raw_s": round(from_raw, 3),
        "a_qcow2_vs_debugfs": round(from_qcow2 / peer, 2),
        "b_raw_vs_debugfs": round(from_raw / peer, 2),
        "restore_qcow2_mib_s": round(args.size_mib / from_qcow2, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
