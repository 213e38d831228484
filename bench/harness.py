"""What the benchmark scripts share: their command line, the reference workload on disk, and
timing that alternates tools within each round and takes medians.

Each timed run starts from a fresh target (``setup``) after an ``os.sync()``, so one tool's
dirty pages are not written back on the next tool's clock.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyapp.workload import GiB, reference_disk

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Setup:
    args: argparse.Namespace
    work: Path
    size: int
    source: Path


def setup(doc: str | None) -> Setup:
    """Parse the common options and make sure the reference workload exists in the work dir."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return Setup(args, work, size, source)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_cmd(argv: list[str]) -> Callable[[], object]:
    return lambda: subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def interleaved(runs: int, setup: Callable[[], None], *fns: Callable[[], object]) -> list[float]:
    """Medians of each function, the functions alternating within every round."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            setup()
            os.sync()
            times[i].append(timed(fn))
    return [statistics.median(t) for t in times]
