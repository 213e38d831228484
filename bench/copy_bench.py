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

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from harness import interleaved, run_cmd, setup, timed
from workload import rewrite_chunks

from pyapp._mover import Copy
from pyapp.nbd_export import NbdExport


def fresh(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def mover_copy(src: str, dst: str, **kw: object) -> Callable[[], object]:
    return lambda: Copy(src, dst, **kw).run()  # type: ignore[arg-type]


def peak_rss(argv: list[str]) -> int:
    """Peak RSS of a mover CLI run, from its JSON summary (VmHWM of its own address space)."""
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    peak: int = json.loads(out.stdout)["peak_rss_bytes"]
    return peak


def main() -> int:
    bench = setup(__doc__)
    args, work, size, source = bench.args, bench.work, bench.size, bench.source
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
        peer, ours = interleaved(args.runs, nbd_setup, run_cmd(["nbdcopy", "--flush", src.uri, dst_uri]),
                                 mover_copy(src.uri, dst_uri, allocated_only=True))
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

    cp = run_cmd(["cp", "--sparse=always", str(source), str(target)])
    mover = mover_copy(str(source), str(target), allocated_only=True)
    peer, ours = interleaved(args.runs, rm_target, cp, mover)
    cp_sync = f"cp --sparse=always {source} {target} && sync -f {target}"
    [durable] = interleaved(args.runs, rm_target, run_cmd(["sh", "-c", cp_sync]))
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
