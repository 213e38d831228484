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
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workload import GiB, reference_disk

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


# --- Whole processes, paired --------------------------------------------------------------------
# The yardstick of issue 20: every figure compares whole commands (the `mover` console script
# against nbdcopy / qemu-img), run alternately A B A B ... after a warm-up, each run measured by
# wait4(2) on that one child: wall clock, CPU (user + system), peak RSS (ru_maxrss).


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds
    cpu: float  # user + system seconds of the child
    rss: int  # peak resident set of the child, bytes


@dataclass
class Side:
    """One command of a comparison and what must happen (untimed) before each of its runs."""

    name: str
    argv: list[str]
    prepare: Callable[[], None] = lambda: None
    samples: list[Sample] | None = None

    def median(self, attr: str) -> float:
        assert self.samples
        return statistics.median(float(getattr(s, attr)) for s in self.samples)


#: GNU time starts the measured command: see run_process.
TIME = "/usr/bin/time"


def run_process(argv: list[str]) -> Sample:
    """Run ``argv`` to completion and measure that child alone.

    The command is started by GNU time, which forks it and reports its ``ru_maxrss`` from its own
    ``wait4``. Not by this interpreter directly: Linux carries a process's peak RSS across
    ``execve`` (``signal->maxrss`` takes the old address space's high-water mark), and a child
    forked or vforked from a 50 MiB Python would report at least 50 MiB whatever it then runs.
    ``time`` is 2 MiB. Wall time is this process's clock around the whole command; CPU is user +
    system from our own ``wait4`` of ``time``, whose rusage includes its reaped child (``time``
    itself adds well under a millisecond, and reports only to 10 ms)."""
    if not Path(TIME).exists():
        raise RuntimeError(f"the benchmark needs GNU time at {TIME} (Debian package time)")
    with tempfile.NamedTemporaryFile("r", prefix="bench-time-") as out:
        t = time.perf_counter()
        p = subprocess.Popen([TIME, "-f", "%M", "-o", out.name, *argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert p.stderr is not None
        err = p.stderr.read()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        p.stderr.close()
        if p.returncode != 0:
            raise subprocess.CalledProcessError(p.returncode, argv, stderr=err)
        rss_kib = int(out.read().split()[-1])
    return Sample(wall=wall, cpu=ru.ru_utime + ru.ru_stime, rss=rss_kib * 1024)


def alternate(sides: list[Side], rounds: int, warmup: int = 1) -> list[Side]:
    """Run the sides alternately (A B A B ...): ``warmup`` untimed rounds, then ``rounds``
    measured ones; each run after its side's ``prepare`` and an ``os.sync()``."""
    for side in sides:
        side.samples = []
    for r in range(warmup + rounds):
        for side in sides:
            side.prepare()
            os.sync()
            sample = run_process(side.argv)
            if r >= warmup:
                assert side.samples is not None
                side.samples.append(sample)
    return sides


def paired_ratio(ours: Side, peer: Side, attr: str) -> float:
    """The median of the per-round ratios ours / peer (the pairing cancels slow drifts of the
    machine better than a ratio of medians)."""
    assert ours.samples and peer.samples
    return statistics.median(
        float(getattr(a, attr)) / max(float(getattr(b, attr)), 1e-9)
        for a, b in zip(ours.samples, peer.samples, strict=True)
    )
