"""The table of issue 20, measured with whole processes, paired and alternating.

    python bench/run.py [--sizes 1,2,4] [--fragmented-gib 2] [--rounds 7] [--results]

Each comparison runs its commands alternately (A B C A B C ...) after ``--warmup`` untimed
rounds, ``--rounds`` measured rounds, each run into a fresh target after ``os.sync()``, and
reports the median of the per-round ratios of wall time, CPU time (user + system of that child,
from wait4) and peak RSS (wait4's ru_maxrss of that child). The mover is the ``mover`` console
script; both sides are durable (the mover flushes; ``nbdcopy --flush``, ``qemu-img convert -t
writeback``); the non-durable peers (``nbdcopy`` without ``--flush``, ``qemu-img convert`` with its
default ``unsafe`` cache) are measured in the same rounds for reference. ``--results`` appends
the table, with the machine it ran on, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

import suite
from harness import HERE, Side, alternate, paired_ratio
from workload import GiB, MiB


@dataclass
class Row:
    figure: str
    goal: str
    limit: float  # the goal as a number: wall ratio (or ms, or MiB) at most this
    wall: float
    cpu: float
    rss: float
    detail: str

    @property
    def met(self) -> bool:
        return self.wall <= self.limit


def ratio_row(figure: str, goal: str, limit: float, ours: Side, peer: Side) -> Row:
    detail = (f"{ours.name} {ours.median('wall'):.2f} s / {peer.name} {peer.median('wall'):.2f} s; "
              f"CPU {ours.median('cpu'):.2f} / {peer.median('cpu'):.2f} s; "
              f"RSS {ours.median('rss') / MiB:.0f} / {peer.median('rss') / MiB:.0f} MiB")
    return Row(figure, goal, limit, paired_ratio(ours, peer, "wall"), paired_ratio(ours, peer, "cpu"),
               paired_ratio(ours, peer, "rss"), detail)


def measure(comparison: AbstractContextManager[list[Side]], rounds: int, warmup: int) -> list[Side]:
    with comparison as sides:
        return alternate(sides, rounds, warmup)


def comparisons(work: Path, sizes: list[int], frag_gib: int, rounds: int, warmup: int) -> Iterator[Row]:
    for gib in sizes:
        image = suite.reference(work, gib * GiB)
        mover, durable, plain = measure(suite.nbd_copy(work, image), rounds, warmup)
        yield ratio_row(f"NBD→NBD / `nbdcopy --flush`, {gib} GiB reference", "≤ 0.7", 0.7, mover, durable)
        yield ratio_row(f"  (reference) NBD→NBD / `nbdcopy` (no flush), {gib} GiB", "—", float("inf"),
                        mover, plain)
        rss = mover.median("rss") / MiB
        yield Row(f"peak RSS of `mover copy` NBD→NBD, {gib} GiB (MiB)", "≤ 64", 64, rss, float("nan"),
                  mover.median("rss") / durable.median("rss"),
                  f"mover {rss:.0f} MiB, nbdcopy {durable.median('rss') / MiB:.0f} MiB; "
                  "the ratio in the RSS column")
        ours, qemu, bare, unsafe = measure(suite.qcow2_copy(work, image), rounds, warmup)
        yield ratio_row(f"raw→new QCOW2 / `qemu-img convert -t writeback`, {gib} GiB", "≤ 0.6", 0.6,
                        ours, qemu)
        yield ratio_row(f"  the same, `--no-manifest`, {gib} GiB", "≤ 0.6", 0.6, bare, qemu)
        yield ratio_row(f"  (reference) raw→QCOW2 / `qemu-img convert` (unsafe), {gib} GiB", "—",
                        float("inf"), ours, unsafe)
        inc, full = measure(suite.incremental(work, image), rounds, warmup)
        yield ratio_row(f"incremental 5% / full, NBD, {gib} GiB", "≤ 0.10", 0.10, inc, full)
    if frag_gib:
        image = suite.fragmented(work, frag_gib * GiB)
        extents, allocated = suite.allocation(image)
        what = f"fragmented ext4 {frag_gib} GiB ({allocated / MiB:.0f} MiB in {extents} extents)"
        ours, qemu, bare, unsafe = measure(suite.qcow2_copy(work, image), rounds, warmup)
        yield ratio_row(f"raw→new QCOW2 / `qemu-img -t writeback`, {what}", "≤ 0.6", 0.6, ours, qemu)
        yield ratio_row(f"  (reference) / `qemu-img convert` (unsafe), {what}", "—", float("inf"),
                        ours, unsafe)
        mover, durable, plain = measure(suite.nbd_copy(work, image), rounds, warmup)
        yield ratio_row(f"NBD→NBD / `nbdcopy --flush`, {what}", "≤ 0.7", 0.7, mover, durable)
        yield ratio_row(f"  (reference) NBD→NBD / `nbdcopy` (no flush), {what}", "—", float("inf"),
                        mover, plain)
    help_, python = measure(suite.startup(), max(rounds, 15), warmup)
    ms = help_.median("wall") * 1000
    yield Row("`mover --help` start-up (ms)", "≤ 40", 40, ms, paired_ratio(help_, python, "cpu"),
              paired_ratio(help_, python, "rss"),
              f"{ms:.0f} ms; `python -c pass` {python.median('wall') * 1000:.0f} ms; "
              "CPU and RSS columns: ratio to `python -c pass`")


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now}; nproc {os.cpu_count()}; {model}; Linux {platform.release()}; load average {load}"


def table(rows: list[Row]) -> str:
    lines = ["| figure | goal | wall | CPU | RSS | met | detail (medians) |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        met = "" if r.goal == "—" else ("yes" if r.met else "**no**")
        cells = f"{r.wall:.3g} | {r.cpu:.3g} | {r.rss:.3g}".replace("nan", "—")
        lines.append(f"| {r.figure} | {r.goal} | {cells} | {met} | {r.detail} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,4", help="reference workload sizes in GiB (default 1,2,4)")
    ap.add_argument("--fragmented-gib", type=int, default=2, help="size of the fragmented image (0: skip)")
    ap.add_argument("--rounds", type=int, default=7, help="measured rounds per comparison (default 7)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--results", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--note", default="", help="a line to keep with the table in RESULTS.md")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    before = machine()
    rows: list[Row] = []
    for row in comparisons(args.workdir, [int(s) for s in args.sizes.split(",") if s], args.fragmented_gib,
                           args.rounds, args.warmup):
        rows.append(row)
        print(f"{row.figure}: wall {row.wall:.3f} CPU {row.cpu:.3f} RSS {row.rss:.3f}  ({row.detail})",
              file=sys.stderr, flush=True)
    after = machine().rsplit("load average ", 1)[1]
    text = table(rows)
    print(text)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if args.results:
        head = (f"\n## {before.split(';')[0]}\n\n{before}; load average after {after}. "
                f"`bench/run.py --sizes {args.sizes} --fragmented-gib {args.fragmented_gib} "
                f"--rounds {args.rounds} --warmup {args.warmup}`.")
        note = f" {args.note}" if args.note else ""
        with (HERE / "RESULTS.md").open("a") as f:
            f.write(f"{head}{note}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
