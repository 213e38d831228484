"""The engineer's ``mover`` command.

``mover copy SRC DST`` copies a disk between NBD exports (``nbd://host:port/export``,
``nbd+unix:///export?socket=PATH``), QCOW2 images and raw files or block devices; a target
path ending in ``.qcow2`` that does not exist becomes a new QCOW2 image (``--backing FILE`` for
an overlay) with a BLAKE3 manifest beside it. A QCOW2 source's backing files must lie under its
own directory unless ``--backing-root DIR`` allows another. ``mover verify``, ``checksum``, ``consolidate``
and ``info`` work on backup chains. Long work draws a progress bar when standard error is a
terminal (never with ``--json``); sizes read by people are in IEC units (KiB, MiB, GiB).

``--json`` makes standard output exactly one JSON document whatever happens — the summary, or
the error object (``error``, ``code``, ``offset``, ``length``, ``errno``) of a failure, a usage
error or an interruption — and standard error carries error lines only.

Exit status: 0 done, 1 failed (or, for ``verify``, chunks differ), 2 bad usage (an unknown
option, a value out of range, an input file that does not exist, an invalid ``--extents`` plan;
refused before anything is created), 130 / 143 interrupted by SIGINT / SIGTERM (for ``copy``:
once the target is flushed and the checkpoint saved; the same command resumes), 141 standard
output closed early (``mover … | head -1``; nothing is printed about it, as for a tool killed by
SIGPIPE).

Start-up is kept short (``mover --help``): the extension, tqdm, json and threading are imported
by the code that uses them, never at module level.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

# Not ``typing.TYPE_CHECKING``: importing typing alone is a tenth of the start-up budget. mypy
# takes any name TYPE_CHECKING as true; the annotations are strings (``from __future__``).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn, TypeVar

    from _typeshed import SupportsWrite
    from tqdm import tqdm

    from pyapp._mover import Copy, CopyProgress, MoverError, Tracker, VerifyReport

    T = TypeVar("T")

DISTRIBUTION = "vmware-cloudstack-mover"

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


class UsageError(Exception):
    """The command line is refused before any work starts (exit status 2). ``prog`` names the
    (sub)command, as argparse does."""

    def __init__(self, message: str, prog: str = "mover") -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block) and, with ``--json``, one JSON
    object on standard output: ``error`` raises :class:`UsageError` for :func:`main` to report."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        # argparse swallows a write error here; a closed pipe must reach main() (status 141).
        (file or sys.stdout).write(self.format_help())


class ShowVersion(argparse.Action):
    """``--version``: the installed package's version, read only when asked for
    (``importlib.metadata`` alone costs more than the rest of the start-up)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> NoReturn:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"mover {version(DISTRIBUTION)}")
        except PackageNotFoundError:
            parser.exit(EXIT_FAILED, f"mover: the {DISTRIBUTION} package is not installed; "
                                     "its version is unknown\n")
        parser.exit()


def count(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``lo`` to ``hi``."""

    def parse(text: str) -> int:
        try:
            n = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{n} is not from {lo} to {hi}")
        return n

    return parse


IEC = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def byte_size(lo: int, hi: int, what: str) -> Callable[[str], int]:
    """An argparse type: a power of two from ``lo`` to ``hi`` bytes (``what`` says the range
    in words), given in bytes or with an IEC unit (``64KiB``, ``1 MiB``)."""

    def parse(text: str) -> int:
        digits = text.strip()
        unit = digits.lstrip("0123456789")
        digits = digits[:len(digits) - len(unit)]
        unit = unit.strip().lower()
        if not digits.isascii() or not digits.isdigit() or unit not in IEC:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a size: give whole bytes, or a whole number of KiB, MiB or GiB")
        n = int(digits) * IEC[unit]
        if not (lo <= n <= hi and n & (n - 1) == 0):
            raise argparse.ArgumentTypeError(f"{text} is not a power of two from {what}")
        return n

    return parse


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < s < 1e9:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds (below 1e9)")
    return s


def need_file(path: str, what: str, prog: str) -> None:
    """Refuse (exit status 2) a local input path that does not exist; NBD URIs are left to the
    copy, which names what it could not reach."""
    if "://" not in path and not os.path.exists(path):
        raise UsageError(f"{what} {path}: no such file or directory", prog)


def print_json(doc: object) -> None:
    import json

    print(json.dumps(doc))


def load_extents(path: str) -> list[tuple[int, int]]:
    """Read an extent plan: a JSON array of ``[offset, length]`` pairs or of
    ``{"offset": …, "length": …}`` objects (an object with an ``extents`` array is accepted too).

    A plan file is what a change tracker reported, so it is taken strictly: extents in order,
    none empty, none overlapping the one before (touching is fine). Anything else is refused
    (``ValueError`` naming the file and the extent): a plan that is out of order or overlaps
    was not made by the tool the operator thinks, and guessing what it meant could copy the
    wrong areas. Extents past the end of the disk are refused by the copy itself, before the
    target is created."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
    except json.JSONDecodeError as bad:
        raise ValueError(f"{path}: not valid JSON ({bad})") from None
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
        offset, length = int(pair[0]), int(pair[1])  # type: ignore[arg-type]
        if length == 0:
            raise ValueError(f"{path}: extent {i} ({offset}, 0) is empty")
        if out:
            prev_offset, prev_length = out[-1]
            if offset < prev_offset:
                raise ValueError(f"{path}: extent {i} ({offset}, {length}) is out of order: "
                                 f"it starts before extent {i - 1} ({prev_offset}, {prev_length})")
            if offset < prev_offset + prev_length:
                raise ValueError(f"{path}: extent {i} ({offset}, {length}) overlaps extent {i - 1} "
                                 f"({prev_offset}, {prev_length})")
        out.append((offset, length))
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
        "manifest": result.manifest,
        "disk_digest": result.disk_digest,
        "durable": result.durable,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def copied(p: CopyProgress) -> int:
    return p.bytes_written + p.bytes_zeroed + p.bytes_resumed


def scanned(p: CopyProgress) -> int:
    return p.bytes_read + p.bytes_zeroed


def run_with_progress(job: Copy, *, show_bar: bool, label: str = "copy") -> CopyProgress:
    """Run ``job`` in a thread, drawing a progress bar meanwhile; Ctrl-C cancels it cleanly."""
    return run_tracked(job.run, job.progress, job.cancel, show_bar=show_bar, label=label, done=copied)


def run_tracked(run: Callable[[], T], progress: Callable[[], CopyProgress], cancel: Callable[[], None], *,
                show_bar: bool, label: str, done: Callable[[CopyProgress], int] = scanned) -> T:
    """Run ``run`` in a thread, drawing a bar from ``progress()`` meanwhile; Ctrl-C calls
    ``cancel()`` and waits for the thread."""
    import threading

    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = run()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=work, name=f"mover-{label}")
    thread.start()
    bar = progress_bar(label) if show_bar else None
    try:
        while thread.is_alive():
            thread.join(0.2)
            if bar is not None:
                draw(bar, progress(), done)
    except KeyboardInterrupt:
        cancel()
        thread.join()
        raise
    finally:
        if bar is not None:
            bar.close()
    if "error" in outcome:
        raise outcome["error"]
    result: T = outcome["result"]
    return result


def progress_bar(label: str) -> tqdm[Any]:
    """A bar on standard error whose figures are in IEC units: tqdm's own ``unit_scale`` writes
    SI prefixes (``MB``, and ``kB/s`` for 1000-byte rates), so the figures are ours, in the postfix."""
    from tqdm import tqdm

    return tqdm(total=0, desc=label, file=sys.stderr, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")


def draw(bar: tqdm[Any], p: CopyProgress, done: Callable[[CopyProgress], int]) -> None:
    if bar.total != p.bytes_planned:
        bar.total = p.bytes_planned
    bar.n = min(done(p), p.bytes_planned)
    bar.set_postfix_str(f"{iec_size(bar.n)} of {iec_size(p.bytes_planned)}, "
                        f"{iec_size(p.throughput_bytes_per_s)}/s, "
                        f"read {iec_size(p.bytes_read)}, written {iec_size(p.bytes_written)}", refresh=False)
    bar.refresh()


def iec_size(n: float) -> str:
    """``n`` bytes in IEC units, as people read them: ``512 B``, ``64.0 KiB``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


class StopSignals:
    """While active, SIGINT and SIGTERM do not kill the process or raise in the middle of the
    work: the first one cancels the job cleanly (the in-flight requests finish, the target is
    flushed, the checkpoint saved); later ones are ignored until it has. ``received`` names the
    first signal."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.cancel: Callable[[], None] | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
        if self.cancel is not None:
            self.cancel()

    def __enter__(self) -> StopSignals:
        for s in self.SIGNALS:
            # A signal the parent ignores (SIGINT of a background job, nohup) stays ignored.
            if signal.getsignal(s) is not signal.SIG_IGN:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def exit_status(self) -> int:
        assert self.received is not None
        return 128 + int(self.received)


def interrupted(stop: StopSignals, as_json: bool, detail: str = "", **extra: object) -> int:
    """Report the signal that stopped the work: one line on standard error (and, with ``--json``,
    the error object on standard output); the exit status is 128 + the signal's number."""
    assert stop.received is not None
    message = f"interrupted by {stop.received.name}"
    if as_json:
        print_json({"error": message, "code": "CancelledError", "offset": None, "length": None, "errno": None,
                    "signal": stop.received.name, **extra})
    print(f"mover: {message}{detail}", file=sys.stderr)
    return stop.exit_status


def cmd_copy(args: argparse.Namespace) -> int:
    with StopSignals() as stop:
        return copy_until_stopped(args, stop)


def copy_until_stopped(args: argparse.Namespace, stop: StopSignals) -> int:
    from pyapp._mover import CancelledError, Copy, InvalidPlanError, MoverError

    try:
        extents = load_extents(args.extents) if args.extents else None
    except (OSError, ValueError) as e:
        raise UsageError(f"invalid --extents plan: {e}", args.prog) from None
    need_file(args.source, "SRC", args.prog)
    if args.backing is not None:
        need_file(args.backing, "--backing", args.prog)
    if stop.received is not None:
        return interrupted(stop, args.json, " before the copy started")
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
            backing=args.backing,
            cluster_size=args.cluster_size,
            manifest=args.manifest,
            write_manifest=not args.no_manifest,
            zero_unlisted=args.zero_unlisted,
            request_timeout=args.request_timeout,
            connect_timeout=args.connect_timeout,
            reconnect_timeout=args.reconnect_timeout,
            allowed_backing_roots=args.backing_roots,
        )
        stop.cancel = job.cancel
        result = run_with_progress(job, show_bar=sys.stderr.isatty() and not args.json)
    except CancelledError:
        if stop.received is None:
            raise
        where = (f"checkpoint {args.checkpoint} records what is done; run the same command to resume"
                 if args.checkpoint else "no checkpoint was asked for (--checkpoint FILE)")
        return interrupted(stop, args.json, f": the target is flushed; {where}", checkpoint=args.checkpoint)
    except InvalidPlanError as e:
        # The core names the offending extent ("extent (offset, length) ..."); say which file.
        plan_file = args.extents if args.extents and "extent (" in str(e) else None
        report_error(e, args.json, context=f"--extents {plan_file}" if plan_file else None)
        return EXIT_USAGE
    except MoverError as e:
        report_error(e, args.json)
        return EXIT_FAILED
    out = summary(result, args.source, args.target)
    if args.json:
        print_json(out)
    else:
        print(
            f"copied {iec_size(out['bytes_planned'])}: {iec_size(out['bytes_written'])} written, "
            f"{iec_size(out['bytes_zeroed'])} zeroed, {iec_size(out['bytes_resumed'])} resumed, "
            f"in {out['seconds']:.2f} s ({iec_size(out['throughput_bytes_per_s'])}/s)"
        )
        if not result.durable:
            print("mover: the target cannot be made durable (its NBD server does not support flush): "
                  "the copied bytes may be lost if the server fails", file=sys.stderr)
    return 0


def tracked_call(args: argparse.Namespace, label: str, call: Callable[[Tracker], T]) -> T:
    from pyapp._mover import Tracker

    tracker = Tracker()
    stop: StopSignals | None = getattr(args, "stop", None)
    if stop is not None:
        stop.cancel = tracker.cancel
    return run_tracked(lambda: call(tracker), tracker.progress, tracker.cancel,
                       show_bar=sys.stderr.isatty() and not args.json, label=label)


def verify_dict(r: VerifyReport) -> dict[str, Any]:
    return {
        "image": r.image,
        "manifest": r.manifest,
        "ok": r.ok,
        "chunks": r.chunks,
        "bytes_read": r.bytes_read,
        "expected_digest": r.expected_digest,
        "found_digest": r.found_digest,
        "mismatches": [{"index": m.index, "offset": m.offset, "length": m.length,
                        "expected": m.expected, "found": m.found} for m in r.mismatches],
        "seconds": round(r.seconds, 6),
    }


def guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map the mover's errors, SIGINT and SIGTERM to exit statuses, as ``cmd_copy`` does: a
    signal cancels the work cleanly (never a ``KeyboardInterrupt`` raised while a thread is in
    the core) and the command exits 130 or 143."""

    def wrapper(args: argparse.Namespace) -> int:
        from pyapp._mover import CancelledError, MoverError

        with StopSignals() as stop:
            args.stop = stop
            try:
                return fn(args)
            except CancelledError:
                if stop.received is None:
                    raise
                return interrupted(stop, args.json)
            except MoverError as e:
                report_error(e, args.json)
                return EXIT_FAILED
            except KeyboardInterrupt:
                if args.json:
                    print_json({"error": "interrupted", "code": "CancelledError", "offset": None,
                                "length": None, "errno": None, "signal": "SIGINT"})
                print("mover: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED

    return wrapper


@guarded
def cmd_verify(args: argparse.Namespace) -> int:
    from pyapp import _mover

    if args.chain and args.manifest:
        raise UsageError("--chain uses the manifest beside each file; drop --manifest", args.prog)
    need_file(args.image, "IMAGE", args.prog)
    if args.manifest:
        need_file(args.manifest, "--manifest", args.prog)
    if args.chain:
        reports, unverified = tracked_call(args, "verify",
                                           lambda t: _mover.verify_chain(args.image, tracker=t))
    else:
        reports = [tracked_call(args, "verify",
                                lambda t: _mover.verify(args.image, manifest=args.manifest, tracker=t))]
        unverified = []
    ok = all(r.ok for r in reports)
    if args.json:
        print_json({"ok": ok, "images": [verify_dict(r) for r in reports], "unverified": unverified})
    else:
        for r in reports:
            state = "OK" if r.ok else f"{len(r.mismatches)} of {r.chunks} chunks DIFFER"
            print(f"{r.image}: {state} ({iec_size(r.bytes_read)} read in {r.seconds:.2f} s)")
            for m in r.mismatches:
                print(f"  chunk {m.index} offset {m.offset} length {iec_size(m.length)}: "
                      f"expected {m.expected}, found {m.found}")
        for u in unverified:
            print(f"{u}: no manifest, not verified")
    return 0 if ok else EXIT_FAILED


@guarded
def cmd_checksum(args: argparse.Namespace) -> int:
    from pyapp import _mover

    need_file(args.source, "SRC", args.prog)
    r = tracked_call(args, "checksum", lambda t: _mover.checksum(
        args.source, output=args.output, chunk_size=args.chunk_size, tracker=t))
    out = {"source": r.source, "manifest": r.manifest, "disk_size": r.disk_size, "chunk_size": r.chunk_size,
           "chunks": r.chunks, "disk_digest": r.disk_digest, "bytes_read": r.bytes_read,
           "seconds": round(r.seconds, 6)}
    if args.json:
        print_json(out)
    else:
        where = f", manifest {r.manifest}" if r.manifest else ""
        print(f"{r.disk_digest}  {r.source} ({iec_size(r.disk_size)}: {r.chunks} chunks of "
              f"{iec_size(r.chunk_size)}{where})")
    return 0


@guarded
def cmd_consolidate(args: argparse.Namespace) -> int:
    from pyapp import _mover

    if args.layers is None and args.output is None:
        raise UsageError("consolidate needs --layers N or --output FILE", args.prog)
    need_file(args.image, "TOP", args.prog)
    r = tracked_call(args, "consolidate", lambda t: _mover.consolidate(
        args.image, layers=args.layers, output=args.output, cluster_size=args.cluster_size, tracker=t))
    out = {"image": r.image, "merged": r.merged, "removed": r.removed, "disk_size": r.disk_size,
           "disk_digest": r.disk_digest, "bytes_written": r.bytes_written, "seconds": round(r.seconds, 6)}
    if args.json:
        print_json(out)
    else:
        print(f"{r.image}: {len(r.merged)} layers merged, {len(r.removed)} files removed, "
              f"{iec_size(r.bytes_written)} written in {r.seconds:.2f} s")
    return 0


@guarded
def cmd_info(args: argparse.Namespace) -> int:
    """The chain as JSON, in both modes (indented without ``--json``): it is a document for
    programs and people alike, so its sizes stay in bytes."""
    import json

    from pyapp import _mover

    need_file(args.image, "IMAGE", args.prog)
    doc = json.loads(_mover.info(args.image))
    print(json.dumps(doc) if args.json else json.dumps(doc, indent=2))
    return 0


def report_error(e: MoverError, as_json: bool, context: str | None = None) -> None:
    if as_json:
        print_json({"error": str(e), "code": type(e).__name__, "offset": e.offset,
                    "length": e.length, "errno": e.code})
    where = f" ({context})" if context else ""
    print(f"mover: {type(e).__name__}{where}: {e}", file=sys.stderr)


def report_usage(e: UsageError, as_json: bool) -> int:
    """One line on standard error (argparse's ``PROG: error: MESSAGE``, without the usage
    block), and with ``--json`` the error object on standard output."""
    if as_json:
        print_json({"error": str(e), "code": "UsageError", "offset": None, "length": None, "errno": None})
    print(f"{e.prog}: error: {e} (see {e.prog} --help)", file=sys.stderr)
    return EXIT_USAGE


# The core's limits (copy/mod.rs CopyOptions::check, qcow2/writer.rs, manifest.rs), checked here too
# so that a bad value is a usage error before anything is opened.
REQUEST_SIZE = byte_size(4 << 10, 32 << 20, "4 KiB to 32 MiB")
CLUSTER_SIZE = byte_size(512, 2 << 20, "512 B to 2 MiB")
CHUNK_SIZE = byte_size(4 << 10, 1 << 30, "4 KiB to 1 GiB")
MAX_CHAIN = 1000


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="mover", description="Move disk bytes between NBD exports and images.",
               epilog="Exit status: 0 done, 1 failed, 2 bad usage, 130/143 interrupted by SIGINT/SIGTERM, "
                      "141 standard output closed early.")
    p.add_argument("--version", action=ShowVersion, nargs=0, default=argparse.SUPPRESS,
                   help="print the mover's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("copy", help="copy a disk", description="Copy SRC to DST (NBD URIs or paths).")
    c.add_argument("source", metavar="SRC")
    c.add_argument("target", metavar="DST")
    plan = c.add_mutually_exclusive_group()
    plan.add_argument("--extents", metavar="FILE.json",
                      help="copy only these (offset, length) extents")
    plan.add_argument("--allocated-only", action="store_true",
                      help="copy only what the source reports as data")
    c.add_argument("--zero-unlisted", action="store_true",
                   help="with --extents: they are all the data; zero everything else on the target")
    c.add_argument("--connections", type=count(1, 64), default=4, metavar="N",
                   help="connections per endpoint, 1 to 64 (default 4)")
    c.add_argument("--requests", type=count(1, 1024), default=16, metavar="N",
                   help="requests in flight per connection, 1 to 1024 (default 16)")
    c.add_argument("--request-size", type=REQUEST_SIZE, default=1 << 20, metavar="BYTES",
                   help="bytes per request: a power of two from 4 KiB to 32 MiB, e.g. 262144 or 256KiB "
                        "(default 1 MiB)")
    c.add_argument("--checkpoint", metavar="FILE", help="record progress here; resume from it if it exists")
    c.add_argument("--target-is-zero", action="store_true", help="the target reads as zeros already")
    c.add_argument("--backing", metavar="FILE",
                   help="make the new QCOW2 target an overlay on FILE (its manifest is reused)")
    c.add_argument("--backing-root", metavar="DIR", action="append", dest="backing_roots", default=[],
                   help="a QCOW2 source's backing files may also lie under DIR (repeatable); by default "
                        "only the source image's own directory is allowed")
    c.add_argument("--cluster-size", type=CLUSTER_SIZE, default=1 << 16, metavar="BYTES",
                   help="cluster size of a new QCOW2 target: a power of two from 512 B to 2 MiB "
                        "(default 64 KiB)")
    c.add_argument("--manifest", metavar="FILE",
                   help="write a BLAKE3 manifest of the target here (automatic beside a new QCOW2 image)")
    c.add_argument("--no-manifest", action="store_true",
                   help="write no manifest, even beside a new QCOW2 image")
    c.add_argument("--request-timeout", type=seconds, default=60.0, metavar="SECONDS",
                   help="longest wait for an NBD reply before the connection counts as lost (default 60)")
    c.add_argument("--connect-timeout", type=seconds, default=30.0, metavar="SECONDS",
                   help="longest NBD connection attempt, handshake included (default 30)")
    c.add_argument("--reconnect-timeout", type=seconds, default=60.0, metavar="SECONDS",
                   help="how long to keep re-sending to a lost NBD server before failing (default 60)")
    c.add_argument("--json", action="store_true",
                   help="print one JSON summary object at the end (\"durable\": false when the "
                        "target's NBD server cannot flush)")
    c.set_defaults(func=cmd_copy)

    v = sub.add_parser("verify", help="re-read an image and compare it with its manifest",
                       description="Exit status 1 when chunks differ; they are listed.")
    v.add_argument("image", metavar="IMAGE")
    v.add_argument("--manifest", metavar="FILE", help="the manifest (default IMAGE.manifest)")
    v.add_argument("--chain", action="store_true",
                   help="verify every file of the chain against its own manifest")
    v.add_argument("--json", action="store_true", help="print one JSON summary object")
    v.set_defaults(func=cmd_verify)

    k = sub.add_parser("checksum", help="make a BLAKE3 manifest of any source")
    k.add_argument("source", metavar="SRC")
    k.add_argument("-o", "--output", metavar="FILE", help="save the manifest here")
    k.add_argument("--chunk-size", type=CHUNK_SIZE, default=1 << 20, metavar="BYTES",
                   help="a power of two from 4 KiB to 1 GiB (default 1 MiB)")
    k.add_argument("--json", action="store_true", help="print one JSON summary object")
    k.set_defaults(func=cmd_checksum)

    m = sub.add_parser("consolidate", help="flatten a chain or merge its oldest layers",
                       description="Crash-safe: the new image is written beside the old ones, verified, "
                                   "fsynced and renamed into place atomically.")
    m.add_argument("image", metavar="TOP")
    m.add_argument("--layers", type=count(1, MAX_CHAIN), metavar="N",
                   help="merge the oldest N layers in place (2: the oldest increment into the full)")
    m.add_argument("--output", metavar="FILE", help="write the whole chain flattened to this new file")
    m.add_argument("--cluster-size", type=CLUSTER_SIZE, default=1 << 16, metavar="BYTES",
                   help="a power of two from 512 B to 2 MiB (default 64 KiB)")
    m.add_argument("--json", action="store_true", help="print one JSON summary object")
    m.set_defaults(func=cmd_consolidate)

    i = sub.add_parser("info", help="a chain and its allocation map, as JSON")
    i.add_argument("image", metavar="IMAGE")
    i.add_argument("--json", action="store_true", help="compact JSON on one line")
    i.set_defaults(func=cmd_info)
    for command in (c, v, k, m, i):
        command.set_defaults(prog=command.prog)
    return p


def wants_json(argv: Sequence[str]) -> bool:
    """Whether ``--json`` was asked for, known before (and even when) parsing fails."""
    options = argv[:argv.index("--")] if "--" in argv else argv
    return "--json" in options


def quiet_after_closed_pipe() -> None:
    """Standard output's reader has gone (``mover … | head -1``). Point both output streams at
    /dev/null so that the interpreter's last flush of what is buffered cannot fail again (and
    print "Exception ignored … BrokenPipeError" on the way out)."""
    import contextlib

    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = parser().parse_args(arguments)
            code: int = args.func(args)
        except UsageError as e:
            code = report_usage(e, wants_json(arguments))
        except SystemExit as e:  # --help and --version, after printing
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else EXIT_FAILED
        sys.stdout.flush()
    except BrokenPipeError:
        # Not SIGPIPE's default action: that would also kill the process for an NBD socket the
        # server closed, which the core reports as an error instead.
        quiet_after_closed_pipe()
        return EXIT_BROKEN_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
