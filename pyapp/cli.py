"""The engineer's ``mover`` command.

``mover copy SRC DST`` copies a disk between NBD exports (``nbd://host:port/export``,
``nbd+unix:///export?socket=PATH``) and raw files or block devices, with a progress bar when
standard error is a terminal and, with ``--json``, one JSON summary object on standard output.
Exit status: 0 done, 1 failed, 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pyapp._mover import Copy, CopyProgress, MoverError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def load_extents(path: str) -> list[tuple[int, int]]:
    """Read an extent list: a JSON array of ``[offset, length]`` pairs or of
    ``{"offset": …, "length": …}`` objects (an object with an ``extents`` array is accepted too)."""
    with open(path, encoding="utf-8") as f:
        data: Any = json.load(f)
    if isinstance(data, dict) and "extents" in data:
        data = data["extents"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of extents")
    out: list[tuple[int, int]] = []
    for i, e in enumerate(data):
        if isinstance(e, dict):
            pair = (e.get("offset"), e.get("length"))
        elif isinstance(e, list) and len(e) == 2:
            pair = (e[0], e[1])
        else:
            raise ValueError(f"{path}: extent {i} is neither [offset, length] nor an object")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
            raise ValueError(f"{path}: extent {i} needs non-negative integer offset and length")
        out.append((int(pair[0]), int(pair[1])))  # type: ignore[arg-type]
    return out


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (``VmHWM``), or None where /proc does not say.

    Not ``getrusage``: its ``ru_maxrss`` keeps the high-water mark of the image this process
    had before exec, i.e. of whatever process forked it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def summary(result: CopyProgress, source: str, target: str) -> dict[str, Any]:
    return {
        "source": source,
        "target": target,
        "bytes_planned": result.bytes_planned,
        "bytes_resumed": result.bytes_resumed,
        "bytes_read": result.bytes_read,
        "bytes_written": result.bytes_written,
        "bytes_zeroed": result.bytes_zeroed,
        "extents": result.extents_total,
        "seconds": round(result.seconds, 6),
        "throughput_bytes_per_s": round(result.throughput_bytes_per_s, 1),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def run_with_progress(job: Copy, *, show_bar: bool, label: str = "copy") -> CopyProgress:
    """Run ``job`` in a thread, drawing a progress bar meanwhile; Ctrl-C cancels it cleanly."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = job.run()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=work, name="mover-copy")
    thread.start()
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not show_bar,
               file=sys.stderr, dynamic_ncols=True)
    try:
        while thread.is_alive():
            thread.join(0.2)
            p = job.progress()
            if bar.total != p.bytes_planned:
                bar.total = p.bytes_planned
            bar.n = p.bytes_written + p.bytes_zeroed + p.bytes_resumed
            bar.set_postfix(written=_size(p.bytes_written), zeroed=_size(p.bytes_zeroed), refresh=False)
            bar.refresh()
    except KeyboardInterrupt:
        job.cancel()
        thread.join()
        raise
    finally:
        bar.close()
    if "error" in outcome:
        raise outcome["error"]
    result: CopyProgress = outcome["result"]
    return result


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def cmd_copy(args: argparse.Namespace) -> int:
    try:
        extents = load_extents(args.extents) if args.extents else None
    except (OSError, ValueError) as e:
        print(f"mover: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        job = Copy(
            args.source,
            args.target,
            extents=extents,
            allocated_only=args.allocated_only,
            connections=args.connections,
            requests=args.requests,
            request_size=args.request_size,
            checkpoint=args.checkpoint,
            target_is_zero=args.target_is_zero,
        )
        result = run_with_progress(job, show_bar=sys.stderr.isatty())
    except MoverError as e:
        report_error(e, args.json)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("mover: interrupted; the checkpoint (if any) records what was done", file=sys.stderr)
        return EXIT_INTERRUPTED
    out = summary(result, args.source, args.target)
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"copied {_size(out['bytes_planned'])}: {_size(out['bytes_written'])} written, "
            f"{_size(out['bytes_zeroed'])} zeroed, {_size(out['bytes_resumed'])} resumed, "
            f"in {out['seconds']:.2f} s ({_size(out['throughput_bytes_per_s'])}/s)"
        )
    return 0


def report_error(e: MoverError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": str(e), "code": type(e).__name__, "offset": e.offset,
                          "length": e.length, "errno": e.code}))
    print(f"mover: {type(e).__name__}: {e}", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mover", description="Move disk bytes between NBD exports and images.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("copy", help="copy a disk", description="Copy SRC to DST (NBD URIs or paths).")
    c.add_argument("source", metavar="SRC")
    c.add_argument("target", metavar="DST")
    plan = c.add_mutually_exclusive_group()
    plan.add_argument("--extents", metavar="FILE.json",
                      help="copy only these (offset, length) extents")
    plan.add_argument("--allocated-only", action="store_true",
                      help="copy only what the source reports as data")
    c.add_argument("--connections", type=int, default=4, metavar="N",
                   help="connections per endpoint (default 4)")
    c.add_argument("--requests", type=int, default=16, metavar="N", help="requests in flight per connection")
    c.add_argument("--request-size", type=int, default=1 << 20, metavar="BYTES", help="bytes per request")
    c.add_argument("--checkpoint", metavar="FILE", help="record progress here; resume from it if it exists")
    c.add_argument("--target-is-zero", action="store_true", help="the target reads as zeros already")
    c.add_argument("--json", action="store_true", help="print one JSON summary object at the end")
    c.set_defaults(func=cmd_copy)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
