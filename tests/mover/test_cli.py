"""The ``mover`` command behaving as command-line tools do, run as an operator runs it: the
console script of the virtual environment in a subprocess, its standard error on a real
pseudo-terminal where a progress bar could appear, its standard output on a real pipe.

Each behaviour is checked for each subcommand (copy, verify, checksum, consolidate, info):

- a usage error (unknown option, a value out of range, a missing input file) exits 2 with one
  line on standard error — never a traceback — and nothing on standard output, or with
  ``--json`` exactly the error object;
- ``--version`` prints the installed package's version;
- sizes meant for people are in IEC units (KiB, MiB, GiB), ``--json`` has bytes;
- a standard output closed early (``mover … | head -1``) ends the command quietly, status 141;
- ``--json`` makes standard output exactly one JSON document and standard error free of
  anything but errors, even on a terminal (no progress bar, no warnings).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from .conftest import MiB, Nbdkit, images_equal, write_disk

pytestmark = pytest.mark.interop

COMMANDS = ["copy", "verify", "checksum", "consolidate", "info"]
DISK = 4 * MiB


def mover_command() -> str:
    """The ``mover`` console script installed beside this interpreter (never ``python -m``)."""
    script = Path(sys.executable).parent / "mover"
    if script.exists():
        return str(script)
    found = shutil.which("mover")
    assert found, "the mover console script is not installed (pip install -e . / maturin develop)"
    return found


def mover(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([mover_command(), *map(str, args)], capture_output=True, text=True, timeout=120,
                          check=False, env=env)


def on_terminal(argv: list[str], timeout: float = 120) -> tuple[int, str, str]:
    """Run ``argv`` with standard error on a pseudo-terminal 200 columns wide (an operator's
    shell) and standard output on a pipe; return the status, standard output and everything
    the terminal received."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    received = bytearray()
    try:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the command, the terminal's last holder, has closed it
                break
            if not data:
                break
            received += data
        out, _ = proc.communicate(timeout=timeout)
    finally:
        os.close(leader)
    return proc.returncode, out.decode(), received.decode(errors="replace")


@dataclass
class Chain:
    """A raw disk, a full QCOW2 backup of it and an incremental on top, each with its manifest."""

    source: Path
    full: Path
    inc: Path


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    d = tmp_path_factory.mktemp("chain")
    source = d / "source.raw"
    write_disk(source, DISK, [(0, MiB), (2 * MiB + 4096, 300_000)])
    full = d / "full.qcow2"
    assert mover("copy", source, full, "--allocated-only").returncode == 0
    write_disk(source, DISK, [(0, MiB), (2 * MiB + 4096, 300_000), (3 * MiB, 65536)], seed=8)
    plan = d / "changed.json"
    plan.write_text(json.dumps([[0, MiB], [3 * MiB, 65536]]))
    inc = d / "inc.qcow2"
    r = mover("copy", source, inc, "--backing", full, "--extents", plan)
    assert r.returncode == 0, r.stderr
    return Chain(source, full, inc)


def valid(command: str, chain: Chain, out: Path) -> list[str]:
    """A command line that succeeds; whatever it creates goes into the directory ``out``."""
    commands: dict[str, list[str | Path]] = {
        "copy": ["copy", chain.source, out / "copy.raw"],
        "verify": ["verify", chain.inc, "--chain"],
        "checksum": ["checksum", chain.source],
        "consolidate": ["consolidate", chain.inc, "--output", out / "flat.qcow2"],
        "info": ["info", chain.inc],
    }
    return [str(a) for a in commands[command]]


# ---- usage errors -----------------------------------------------------------------------------

# id: (command line, what the one error line must name). {SRC} is the chain's raw disk, {FULL}
# its full backup, {DST} a target that must never be created, {MISSING} a file that does not exist.
USAGE_ERRORS: dict[str, tuple[list[str], str]] = {
    "no-command": ([], "required"),
    "unknown-command": (["frobnicate"], "frobnicate"),
    "copy-unknown-option": (["copy", "{SRC}", "{DST}", "--fast"], "--fast"),
    "copy-no-target": (["copy", "{SRC}"], "DST"),
    "copy-negative-connections": (["copy", "{SRC}", "{DST}", "--connections", "-1"], "--connections"),
    "copy-huge-connections": (["copy", "{SRC}", "{DST}", "--connections", str(1 << 70)], "--connections"),
    "copy-zero-requests": (["copy", "{SRC}", "{DST}", "--requests", "0"], "--requests"),
    "copy-fractional-request-size": (["copy", "{SRC}", "{DST}", "--request-size", "1.5"], "--request-size"),
    "copy-negative-request-size": (["copy", "{SRC}", "{DST}", "--request-size", "-65536"], "--request-size"),
    "copy-request-size-not-power-of-two": (["copy", "{SRC}", "{DST}", "--request-size", "100000"],
                                           "100000"),
    "copy-negative-cluster-size": (["copy", "{SRC}", "{DST}.qcow2", "--cluster-size", "-512"],
                                   "--cluster-size"),
    "copy-negative-timeout": (["copy", "{SRC}", "{DST}", "--request-timeout", "-5"], "--request-timeout"),
    "copy-nan-timeout": (["copy", "{SRC}", "{DST}", "--connect-timeout", "nan"], "--connect-timeout"),
    "copy-missing-source": (["copy", "{MISSING}", "{DST}"], "{MISSING}"),
    "copy-missing-backing": (["copy", "{SRC}", "{DST}.qcow2", "--backing", "{MISSING}"], "{MISSING}"),
    "copy-missing-plan": (["copy", "{SRC}", "{DST}", "--extents", "{MISSING}"], "{MISSING}"),
    "verify-no-image": (["verify"], "IMAGE"),
    "verify-missing-image": (["verify", "{MISSING}"], "{MISSING}"),
    "verify-missing-manifest": (["verify", "{FULL}", "--manifest", "{MISSING}"], "{MISSING}"),
    "verify-chain-and-manifest": (["verify", "{FULL}", "--chain", "--manifest", "{FULL}.manifest"],
                                  "--chain"),
    "checksum-negative-chunk-size": (["checksum", "{SRC}", "--chunk-size", "-1"], "--chunk-size"),
    "checksum-word-chunk-size": (["checksum", "{SRC}", "--chunk-size", "big"], "--chunk-size"),
    "checksum-chunk-size-too-large": (["checksum", "{SRC}", "--chunk-size", str(1 << 40)], "--chunk-size"),
    "checksum-missing-source": (["checksum", "{MISSING}"], "{MISSING}"),
    "consolidate-negative-layers": (["consolidate", "{FULL}", "--layers", "-1"], "--layers"),
    "consolidate-zero-layers": (["consolidate", "{FULL}", "--layers", "0"], "--layers"),
    "consolidate-word-layers": (["consolidate", "{FULL}", "--layers", "two"], "--layers"),
    "consolidate-no-plan": (["consolidate", "{FULL}"], "--layers"),
    "consolidate-zero-cluster-size": (["consolidate", "{FULL}", "--output", "{DST}.qcow2",
                                       "--cluster-size", "0"], "--cluster-size"),
    "consolidate-missing-top": (["consolidate", "{MISSING}", "--layers", "2"], "{MISSING}"),
    "info-no-image": (["info"], "IMAGE"),
    "info-missing-image": (["info", "{MISSING}"], "{MISSING}"),
    "info-unknown-option": (["info", "{FULL}", "--map"], "--map"),
}


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_error_is_one_line_and_status_2(chain: Chain, tmp_path: Path, case: str, as_json: bool) -> None:
    template, culprit = USAGE_ERRORS[case]
    names = {"SRC": chain.source, "FULL": chain.full, "DST": tmp_path / "dst.raw",
             "MISSING": tmp_path / "missing.raw"}

    def fill(arg: str) -> str:
        return arg.format(**names)

    argv = [fill(a) for a in template] + (["--json"] if as_json else [])
    r = mover(*argv)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mover") and fill(culprit) in lines[0], lines[0]
    if as_json:
        doc = json.loads(r.stdout)
        assert isinstance(doc, dict) and doc["code"] in {"UsageError", "InvalidPlanError"}, doc
        assert fill(culprit) in doc["error"], doc
    else:
        assert r.stdout == ""
    assert not any(p.name.startswith("dst") for p in tmp_path.iterdir()), "refused before anything is created"


def test_version_is_the_installed_package_version() -> None:
    r = mover("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"mover {version('vmware-cloudstack-mover')}\n"
    assert r.stderr == ""


# ---- sizes for people and for programs ----------------------------------------------------------

IEC_SIZE = re.compile(r"\b\d+(\.\d)? (B|KiB|MiB|GiB|TiB)\b")
# A number followed by a decimal (SI) prefix or tqdm's bare prefixes: "12.0MB", "3.00M", "5 kB/s".
SI_SIZE = re.compile(r"\d ?[kKMGT](?!iB)(B\b|/|\b)")


@pytest.mark.parametrize("command", COMMANDS)
def test_human_output_counts_in_iec_units_and_json_in_bytes(
    chain: Chain, tmp_path: Path, command: str,
) -> None:
    argv = valid(command, chain, tmp_path)
    text = mover(*argv)
    assert text.returncode == 0, text.stderr
    (tmp_path / "copy.raw").unlink(missing_ok=True)
    for leftover in tmp_path.glob("flat.qcow2*"):
        leftover.unlink()
    doc = json.loads(mover(*argv, "--json").stdout)
    if command == "info":
        # info's output is the chain as a JSON document in both forms (indented for people):
        # its sizes are bytes either way.
        assert json.loads(text.stdout) == doc
        assert doc["virtual_size"] == DISK
        return
    assert not SI_SIZE.search(text.stdout), text.stdout
    expected = {
        "copy": ("copied 4.0 MiB:", "bytes_planned"),
        "verify": (" MiB read in ", None),
        "checksum": ("(4.0 MiB: 4 chunks of 1.0 MiB)", "disk_size"),
        "consolidate": ("MiB written", "disk_size"),
    }[command]
    assert expected[0] in text.stdout, text.stdout
    assert IEC_SIZE.search(text.stdout), text.stdout
    if command == "verify":
        assert all(i["bytes_read"] > 0 and isinstance(i["bytes_read"], int) for i in doc["images"]), doc
    else:
        assert doc[expected[1]] == DISK, doc


def test_verify_names_the_differing_chunk_with_its_length_in_iec_units(chain: Chain, tmp_path: Path) -> None:
    target = tmp_path / "t.raw"
    assert mover("copy", chain.source, target, "--manifest", tmp_path / "t.manifest").returncode == 0
    with open(target, "r+b") as f:
        f.seek(MiB + 5)
        f.write(b"\xa5")
    r = mover("verify", target, "--manifest", tmp_path / "t.manifest")
    assert r.returncode == 1, r.stderr
    assert f"chunk 1 offset {MiB} length 1.0 MiB:" in r.stdout, r.stdout
    doc = json.loads(mover("verify", target, "--manifest", tmp_path / "t.manifest", "--json").stdout)
    assert doc["images"][0]["mismatches"][0]["length"] == MiB


@pytest.mark.parametrize("command", ["copy", "checksum"])
def test_progress_bar_counts_in_iec_units(
    tmp_path: Path, nbdkit: Callable[..., Nbdkit], command: str,
) -> None:
    """On a terminal the bar's figures are IEC (tqdm's own scaling prints ``MB`` and ``kB/s``)."""
    image = tmp_path / "source.raw"
    write_disk(image, 8 * MiB, [(0, 8 * MiB)])
    slow = nbdkit("--filter=delay", "file", f"file={image}", "rdelay=10ms")  # ~1.3 s in all
    argv = {"copy": ["copy", slow.uri, str(tmp_path / "t.raw"), "--connections", "1", "--requests", "1",
                     "--request-size", "65536"],
            "checksum": ["checksum", slow.uri, "--chunk-size", "65536"]}[command]
    status, _, terminal = on_terminal([mover_command(), *argv])
    assert status == 0, terminal
    assert f"{command}:" in terminal and "MiB" in terminal, terminal
    assert not SI_SIZE.search(terminal), terminal


# ---- a closed standard output -------------------------------------------------------------------

CLOSED_PIPE_CASES = [pytest.param(c, j, id=f"{c}-{'json' if j else 'text'}")
                     for c in COMMANDS for j in (False, True)]
CLOSED_PIPE_CASES.append(pytest.param("--help", False, id="help"))


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize(("command", "as_json"), CLOSED_PIPE_CASES)
def test_closed_stdout_ends_quietly_with_status_141(
    chain: Chain, tmp_path: Path, command: str, as_json: bool, buffered: bool,
) -> None:
    """``mover … | head -1`` where head has gone: no BrokenPipeError traceback, nothing on standard
    error, status 141 (128 + SIGPIPE, what a shell reports for a tool SIGPIPE stopped). Both
    with Python's block-buffered standard output (the error comes at the last flush) and an
    unbuffered one (``PYTHONUNBUFFERED``: the error comes from the print itself)."""
    argv = ["--help"] if command == "--help" else valid(command, chain, tmp_path)
    if as_json:
        argv.append("--json")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([mover_command(), *argv], stdin=subprocess.DEVNULL, stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=120, env=env, check=False)
    finally:
        os.close(write_end)
    assert r.returncode == 141, (r.returncode, r.stderr)
    assert r.stderr == ""
    if command == "copy":  # the work was done; only its report was not read
        assert images_equal(chain.source, tmp_path / "copy.raw")


# ---- --json: one document on standard output, errors only on standard error ---------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_json_is_one_document_and_a_terminal_gets_no_bar(chain: Chain, tmp_path: Path, command: str) -> None:
    status, out, terminal = on_terminal([mover_command(), *valid(command, chain, tmp_path), "--json"])
    assert status == 0, terminal
    assert terminal == "", "standard error is for errors only"
    doc = json.loads(out)
    assert isinstance(doc, dict)
    assert out.endswith("}\n") and out.count("\n") == 1, "exactly one JSON document, on one line"


def failing(command: str, chain: Chain, tmp_path: Path) -> list[str]:
    """A well-formed command line that fails at work (status 1)."""
    nowhere = f"nbd+unix:///?socket={tmp_path / 'nobody.sock'}"
    not_qcow2 = tmp_path / "bad.qcow2"
    not_qcow2.write_bytes(b"QFI\xfb")
    commands: dict[str, list[str | Path]] = {
        "copy": ["copy", chain.source, nowhere],
        "verify": ["verify", chain.source, "--manifest", chain.full],  # not a manifest
        "checksum": ["checksum", nowhere],
        "consolidate": ["consolidate", chain.inc, "--layers", "5"],  # the chain has two
        "info": ["info", not_qcow2],
    }
    return [str(a) for a in commands[command]]


@pytest.mark.parametrize("command", COMMANDS)
def test_json_failure_is_one_error_document_and_one_line(chain: Chain, tmp_path: Path, command: str) -> None:
    status, out, terminal = on_terminal([mover_command(), *failing(command, chain, tmp_path), "--json"])
    assert status == 1, (out, terminal)
    doc = json.loads(out)
    assert set(doc) >= {"error", "code", "offset", "length", "errno"} and doc["code"].endswith("Error"), doc
    lines = terminal.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mover: "), terminal


def flushless_nbdkit(nbdkit: Callable[..., Nbdkit], path: Path) -> Nbdkit:
    """A writable nbdkit export over ``path`` that cannot flush (no ``can_flush`` script)."""
    return nbdkit(
        "eval",
        f"get_size=echo {path.stat().st_size}",
        f"pread=dd if={path} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        f"pwrite=dd of={path} seek=$4 conv=notrunc oflag=seek_bytes status=none",
        "can_write=exit 0",
    )


def test_json_carries_the_non_durable_warning_alone(
    chain: Chain, tmp_path: Path, nbdkit: Callable[..., Nbdkit],
) -> None:
    target = tmp_path / "kit.raw"
    with open(target, "wb") as f:
        f.truncate(DISK)
    kit = flushless_nbdkit(nbdkit, target)
    status, out, terminal = on_terminal([mover_command(), "copy", str(chain.source), kit.uri,
                                         "--allocated-only", "--json"])
    assert status == 0, terminal
    assert terminal == ""
    assert json.loads(out)["durable"] is False
    text = mover("copy", chain.source, kit.uri, "--allocated-only")
    assert text.returncode == 0 and "cannot be made durable" in text.stderr


@pytest.mark.parametrize("command", ["copy", "checksum"])
def test_json_interrupted_is_one_error_document(
    tmp_path: Path, nbdkit: Callable[..., Nbdkit], command: str,
) -> None:
    image = tmp_path / "slow.raw"
    write_disk(image, 8 * MiB, [(0, 8 * MiB)])
    # copy: one request at a time, 128 of them; checksum reads many at once: a second each.
    delay = {"copy": "50ms", "checksum": "1"}[command]
    slow_source = nbdkit("--filter=delay", "file", f"file={image}", f"rdelay={delay}").uri
    checkpoint = tmp_path / "copy.checkpoint"
    argv = {"copy": ["copy", slow_source, str(tmp_path / "t.raw"), "--checkpoint", str(checkpoint),
                     "--connections", "1", "--requests", "1", "--request-size", "65536"],
            "checksum": ["checksum", slow_source, "--chunk-size", "65536"]}[command]
    proc = subprocess.Popen([mover_command(), *argv, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    doc: dict[str, Any] = json.loads(out)
    assert doc["code"] == "CancelledError" and doc["signal"] == "SIGTERM", doc
    if command == "copy":
        assert doc["checkpoint"] == str(checkpoint) and checkpoint.exists()
    assert len(err.strip().splitlines()) == 1, err
