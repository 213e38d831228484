"""QCOW2 and manifest benchmarks on the reference workload, as ratios against peers in one run.

    (a) raw file -> new QCOW2: mover / qemu-img convert -O qcow2               (goal <= 0.6)
    (b) incremental overlay (5% of chunks changed) / full (a)                  (goal <= 0.10)
    (c) consolidate a 10-layer chain / qemu-img convert -O qcow2 of its top    (goal <= 0.7)
    (d) cost of the inline BLAKE3 manifest on (a): with / without - 1          (goal <= 10%)
    (e) verify throughput / b3sum throughput on the same raw data              (goal >= 0.8)

``qemu-img convert`` writes with cache mode ``unsafe`` by default (no flush at all), while the
mover always flushes (fdatasync) before it returns; (a) and (c) are therefore reported twice:
against the default, and against ``qemu-img convert -t writeback``, which flushes at the end
and is the durable comparison. Each timing is the median of ``--runs`` runs, peer and mover
alternating, each into a fresh file after an ``os.sync()``. The mover is timed in-process
around the extension call (interpreter start-up excluded: the services keep the extension
loaded); peers around their whole command. (e) reads from the page cache for both tools (each
is run once before timing). Usage: ``python bench/qcow2_bench.py [--size-gib 4] [--runs 3]``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from harness import interleaved, run_cmd, setup
from workload import GiB, rewrite_chunks

from pyapp import _mover

LAYERS = 10


def remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
        Path(f"{p}.manifest").unlink(missing_ok=True)


def main() -> int:
    bench = setup(__doc__)
    args, work, size, source = bench.args, bench.work, bench.size, bench.source
    out = work / "out.qcow2"
    figures: dict[str, float] = {}

    def clean() -> None:
        remove(out)

    # (a) and (d): raw -> new QCOW2, with and without the inline manifest, against qemu-img.
    src = str(source)
    with_manifest = lambda: _mover.Copy(src, str(out), allocated_only=True).run()  # noqa: E731
    without = lambda: _mover.Copy(src, str(out), allocated_only=True, write_manifest=False).run()  # noqa: E731
    qemu_unsafe = run_cmd(["qemu-img", "convert", "-O", "qcow2", src, str(out)])
    qemu_durable = run_cmd(["qemu-img", "convert", "-t", "writeback", "-O", "qcow2", src, str(out)])
    ours, bare, peer, durable = interleaved(args.runs, clean, with_manifest, without, qemu_unsafe,
                                            qemu_durable)
    figures.update(full_mover_s=ours, full_mover_no_manifest_s=bare, full_qemu_img_s=peer,
                   full_qemu_img_writeback_s=durable, ratio_a_vs_qemu_img=ours / peer,
                   ratio_a_vs_qemu_img_writeback=ours / durable, cost_d_inline_blake3=ours / bare - 1)

    # (e) verify the full just written, against b3sum of the raw source (both from page cache).
    full = work / "full.qcow2"
    remove(full)
    _mover.Copy(src, str(full), allocated_only=True).run()
    b3 = run_cmd(["b3sum", "--no-names", src])
    verify = lambda: _mover.verify(str(full))  # noqa: E731
    b3(), verify()
    t_verify, t_b3 = interleaved(args.runs, lambda: None, verify, b3)
    figures.update(verify_s=t_verify, b3sum_s=t_b3, verify_gib_per_s=size / t_verify / GiB,
                   b3sum_gib_per_s=size / t_b3 / GiB, ratio_e_verify_vs_b3sum=t_b3 / t_verify)

    # (b) incremental: 5% of the chunks rewritten, copied as an overlay on the full.
    changed_src = work / "changed.raw"
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", src, str(changed_src)], check=True)
    changed = rewrite_chunks(changed_src, fraction=0.05)
    inc = work / "inc.qcow2"

    def incremental_pass() -> object:
        return _mover.Copy(str(changed_src), str(inc), extents=changed, backing=full).run()

    remove(inc)
    incremental_pass()  # the first pass reads the changed source from disk, as (a) does not
    [incremental] = interleaved(args.runs, lambda: remove(inc), incremental_pass)
    figures.update(incremental_s=incremental, ratio_b_incremental_vs_full=incremental / ours)
    remove(inc)

    # (c) a chain of 10: the full and 9 incrementals of 5% each, consolidated into a new full.
    chain = [full]
    for i in range(1, LAYERS):
        layer = work / f"layer{i}.qcow2"
        remove(layer)
        changed = rewrite_chunks(changed_src, fraction=0.05, seed=100 + i)
        _mover.Copy(str(changed_src), str(layer), extents=changed, backing=chain[-1]).run()
        chain.append(layer)
    top = str(chain[-1])
    synthetic = work / "synthetic.qcow2"
    ours_c, peer_c, durable_c = interleaved(
        args.runs, lambda: remove(synthetic),
        lambda: _mover.consolidate(top, output=synthetic),
        run_cmd(["qemu-img", "convert", "-O", "qcow2", top, str(synthetic)]),
        run_cmd(["qemu-img", "convert", "-t", "writeback", "-O", "qcow2", top, str(synthetic)]),
    )
    figures.update(consolidate_mover_s=ours_c, consolidate_qemu_img_s=peer_c,
                   consolidate_qemu_img_writeback_s=durable_c, ratio_c_vs_qemu_img=ours_c / peer_c,
                   ratio_c_vs_qemu_img_writeback=ours_c / durable_c)
    remove(synthetic, *chain)
    changed_src.unlink()
    shutil.rmtree(work / "__pycache__", ignore_errors=True)

    goals = {"ratio_a_vs_qemu_img": "<= 0.6", "ratio_a_vs_qemu_img_writeback": "<= 0.6",
             "ratio_b_incremental_vs_full": "<= 0.10", "ratio_c_vs_qemu_img": "<= 0.7",
             "ratio_c_vs_qemu_img_writeback": "<= 0.7", "cost_d_inline_blake3": "<= 0.10",
             "ratio_e_verify_vs_b3sum": ">= 0.8"}
    for k, v in figures.items():
        goal = f"  (goal {goals[k]})" if k in goals else ""
        print(f"{k:<36} {v:10.3f}{goal}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
