"""Copy-engine benchmarks on the reference workload, as ratios against peers in the same run.

    (a) NBD -> NBD full copy, qemu-nbd at both ends: mover / nbdcopy       (goal <= 0.7)
    (b) raw file -> raw file: mover / cp --sparse=always                   (goal <= 1.0)
    (c) incremental pass (5% of chunks, explicit extents) / full pass      (goal <= 0.10)
    (d) peak RSS of a mover copy process                                   (goal <= 256 MiB)

Each timing is the median of ``--runs`` runs, peers and mover alternating, each run into a
fresh sparse target. The mover is timed in-process around ``Copy.run()`` (endpoint connection
included, interpreter start-up not: the services keep the extension loaded); peers are timed
around their whole command. Usage: ``python bench/copy_bench.py [--size-gib 4] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pyapp._mover import Copy
from pyapp.nbd_export import NbdExport
from pyapp.workload import GiB, reference_disk, rewrite_chunks

HERE = Path(__file__).resolve().parent


def fresh(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def mover_copy(src: str, dst: str, **kw: object) -> Callable[[], object]:
    return lambda: Copy(src, dst, **kw).run()  # type: ignore[arg-type]


def run_cmd(argv: list[str]) -> Callable[[], object]:
    return lambda: subprocess.run(argv, check=True)


def median_pair(runs: int, setup: Callable[[], None], ours: Callable[[], object],
                peer: Callable[[], object]) -> tuple[float, float]:
    a, b = [], []
    for _ in range(runs):
        setup()
        os.sync()
        b.append(timed(peer))
        setup()
        os.sync()
        a.append(timed(ours))
    return statistics.median(a), statistics.median(b)


def peak_rss(argv: list[str]) -> int:
    """Peak RSS of a mover CLI run, from its JSON summary (VmHWM of its own address space)."""
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    peak: int = json.loads(out.stdout)["peak_rss_bytes"]
    return peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_gib * GiB
    source = work / f"reference-{args.size_gib}g.raw"
    if not source.exists():
        print("building the reference workload ...", file=sys.stderr)
        reference_disk(source, size=size)
    target = work / "target.raw"
    figures: dict[str, float] = {}

    # (a) NBD -> NBD against nbdcopy, qemu-nbd at both ends. The target export writes with
    # O_DIRECT (--cache=none) and both tools flush it before they finish (nbdcopy --flush), so
    # both end durable. The read-only source is measured twice: through the page cache (how a
    # source that was just read, or a network source, behaves: the primary figure) and with
    # O_DIRECT reads, where both tools share the disk's bandwidth.
    dst: list[NbdExport] = []

    def nbd_setup() -> None:
        for d in dst:
            d.stop()
        dst.clear()
        fresh(target, size)
        dst.append(NbdExport(target, name="dst", socket_path=work / "dst.sock").start())

    dst_uri = f"nbd+unix:///dst?socket={work / 'dst.sock'}"
    for cache, suffix in (("none", "_direct_source"), ("writeback", "")):
        src = NbdExport(source, name="src", socket_path=work / "src.sock", read_only=True,
                        cache=cache).start()
        ours, peer = median_pair(args.runs, nbd_setup, mover_copy(src.uri, dst_uri, allocated_only=True),
                                 run_cmd(["nbdcopy", "--flush", src.uri, dst_uri]))
        src.stop()
        figures.update({f"nbd_full_mover_s{suffix}": ours, f"nbd_full_nbdcopy_s{suffix}": peer,
                        f"ratio_a_nbd_vs_nbdcopy{suffix}": ours / peer})
    src = NbdExport(source, name="src", socket_path=work / "src.sock", read_only=True,
                    cache="writeback").start()
    ours = figures["nbd_full_mover_s"]

    # (c) incremental over the same exports: 5% of the chunks rewritten in a copy of the source.
    nbd_setup()
    Copy(src.uri, dst_uri, allocated_only=True).run()
    src.stop()
    changed_src = work / "changed.raw"
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(source), str(changed_src)], check=True)
    changed = rewrite_chunks(changed_src, fraction=0.05)
    src = NbdExport(changed_src, name="src", socket_path=work / "src.sock", read_only=True,
                    cache="writeback").start()
    incremental = statistics.median(
        timed(mover_copy(src.uri, dst_uri, extents=changed)) for _ in range(args.runs)
    )
    figures.update(incremental_s=incremental, ratio_c_incremental_vs_full=incremental / ours)
    src.stop()
    for d in dst:
        d.stop()
    changed_src.unlink()

    # (b) raw -> raw against cp --sparse=always. The mover flushes its target before it reports
    # success; cp does not, so the durable comparison is against cp followed by a sync of the
    # file. Both ratios are reported.
    def rm_target() -> None:
        target.unlink(missing_ok=True)

    ours, peer = median_pair(args.runs, rm_target, mover_copy(str(source), str(target), allocated_only=True),
                             run_cmd(["cp", "--sparse=always", str(source), str(target)]))
    cp_sync = f"cp --sparse=always {source} {target} && sync -f {target}"
    _, durable = median_pair(args.runs, rm_target, lambda: None, run_cmd(["sh", "-c", cp_sync]))
    figures.update(file_mover_s=ours, file_cp_s=peer, file_cp_sync_s=durable,
                   ratio_b_file_vs_cp=ours / peer, ratio_b_file_vs_cp_sync=ours / durable)

    # (d) peak RSS of a whole mover process copying the disk NBD -> NBD.
    with NbdExport(source, name="src", socket_path=work / "src.sock", read_only=True, cache="writeback") as s:
        nbd_setup()
        figures["peak_rss_mib"] = peak_rss([sys.executable, "-m", "pyapp.cli", "copy", s.uri, dst_uri,
                                            "--allocated-only", "--json"]) / (1 << 20)
        for d in dst:
            d.stop()
    target.unlink(missing_ok=True)

    goals = {
        "ratio_a_nbd_vs_nbdcopy": 0.7,
        "ratio_a_nbd_vs_nbdcopy_direct_source": 0.7,
        "ratio_b_file_vs_cp": 1.0,
        "ratio_c_incremental_vs_full": 0.10,
        "peak_rss_mib": 256,
    }
    for k, v in figures.items():
        goal = f"  (goal <= {goals[k]})" if k in goals else ""
        print(f"{k:<32} {v:10.3f}{goal}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
