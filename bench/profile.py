"""Profile the mover and its peer on the NBD and QCOW2 paths (docs/profiling.md keeps what it showed).

    python bench/profile.py [--size-gib 1] [--out bench/work/profile]

For each command of ``suite.nbd_copy`` and ``suite.qcow2_copy`` (durable sides only), on the
reference workload, into a fresh target each time:

    strace -c -f -o OUT/<name>.strace -- CMD              syscall counts and time, all threads
    perf stat -e task-clock,context-switches,cpu-migrations,page-faults -- CMD
    perf record -e cpu-clock -F 999 -g -o OUT/<name>.data -- CMD
    perf report --stdio --no-children --sort dso,symbol  top symbols (self time)

``cpu-clock`` (a software event) because virtual machines often have no hardware counters.
Only the client process is profiled; the qemu-nbd servers at both ends are the same for both.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import suite
from harness import HERE, Side
from workload import GiB


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def profile(path: str, side: Side, out: Path) -> None:
    name = f"{path}-{slug(side.name)}"
    runs = {
        "strace": ["strace", "-c", "-f", "-o", str(out / f"{name}.strace"), "--", *side.argv],
        "perf stat": ["perf", "stat", "-o", str(out / f"{name}.stat"),
                      "-e", "task-clock,context-switches,cpu-migrations,page-faults", "--", *side.argv],
        "perf record": ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-g",
                        "-o", str(out / f"{name}.data"), "--", *side.argv],
    }  # fmt: skip
    for what, argv in runs.items():
        side.prepare()
        os.sync()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"{name}: {what} done", file=sys.stderr)
    report = subprocess.run(
        ["perf", "report", "--stdio", "--no-children", "--sort", "dso,symbol",
         "-i", str(out / f"{name}.data"), "--percent-limit", "1.5", "-g", "none"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (out / f"{name}.report").write_text(report)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=HERE / "work" / "profile")
    args = ap.parse_args()
    suite.need("strace", "perf")
    out: Path = args.workdir
    out.mkdir(parents=True, exist_ok=True)
    image = suite.reference(out, args.size_gib * GiB)
    with suite.nbd_copy(out, image, durable_only=True) as sides:
        for side in sides:
            profile("nbd", side, out)
    with suite.qcow2_copy(out, image, durable_only=True) as sides:
        for side in sides:
            profile("qcow2", side, out)
    print(f"profiles in {out}: *.strace, *.stat, *.report (perf report --stdio of *.data)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
