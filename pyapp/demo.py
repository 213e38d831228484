"""The demo: the mover's main job on the reference workload, end to end on this machine.

A 4 GiB guest disk (half of its 1 MiB chunks random, the rest holes) is served read-only by
``qemu-nbd``; a new, empty target volume is served writable by another ``qemu-nbd``. The mover
makes a full pass (allocated extents only), the guest then rewrites 5% of its chunks, and an
incremental pass copies just those extents, as a CBT-driven replication does. After each pass
``qemu-img compare`` checks that the target equals the source byte for byte.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pyapp._mover import Copy, CopyProgress
from pyapp.cli import _size, run_with_progress
from pyapp.nbd_export import NbdExport
from pyapp.workload import GiB, MiB, reference_disk, rewrite_chunks


@dataclass
class Pass:
    name: str
    result: CopyProgress
    equal: bool


def equal(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)],
                          check=False).returncode == 0


def copy_pass(name: str, source: Path, target: Path, workdir: Path,
              extents: list[tuple[int, int]] | None) -> Pass:
    with NbdExport(source, name="source", socket_path=workdir / "source.sock", read_only=True) as src, \
         NbdExport(target, name="target", socket_path=workdir / "target.sock") as dst:
        job = Copy(src.uri, dst.uri, extents=extents, allocated_only=extents is None)
        result = run_with_progress(job, show_bar=sys.stderr.isatty(), label=name)
    return Pass(name, result, equal(source, target))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("demo-data"))
    ap.add_argument("--size-gib", type=int, default=4)
    args = ap.parse_args(argv)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_gib * GiB

    reference = work / f"reference-{args.size_gib}g.raw"
    if not reference.exists():
        print(f"building the reference workload ({args.size_gib} GiB, half random, seed 1) ...", flush=True)
        reference_disk(reference, size=size)
    guest = work / "guest.raw"
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(reference), str(guest)], check=True)
    target = work / "target.raw"
    target.unlink(missing_ok=True)
    with open(target, "wb") as f:
        f.truncate(size)

    passes = [copy_pass("full pass", guest, target, work, None)]
    changed = rewrite_chunks(guest, fraction=0.05)
    passes.append(copy_pass("incremental", guest, target, work, changed))

    print()
    print(f"{'pass':<12} {'planned':>10} {'transferred':>12} {'zero-skipped':>13} {'seconds':>8} "
          f"{'throughput':>12}  target == source")
    for p in passes:
        r = p.result
        print(f"{p.name:<12} {_size(r.bytes_planned):>10} {_size(r.bytes_written):>12} "
              f"{_size(r.bytes_zeroed):>13} {r.seconds:>8.2f} {_size(r.throughput_bytes_per_s) + '/s':>12}  "
              f"{'yes' if p.equal else 'NO'}")
    full, inc = passes[0].result, passes[1].result
    print(f"\nthe incremental pass moved {_size(inc.bytes_written)} of a {_size(size)} disk "
          f"({len(changed)} changed {MiB >> 20} MiB chunks) in {inc.seconds / max(full.seconds, 1e-9):.1%} "
          f"of the full pass's time")
    guest.unlink()
    shutil.rmtree(work / "tmp", ignore_errors=True)
    return 0 if all(p.equal for p in passes) else 1


if __name__ == "__main__":
    sys.exit(main())
