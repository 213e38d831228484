"""The benchmark's own measuring parts (bench/harness.py, bench/suite.py, bench/conftest.py): a
yardstick that misreports makes every ratio of issue 20 wrong, so it is tested like code."""

from __future__ import annotations

import importlib.util
import re
import resource
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the bench modules import each other by plain name
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_peak_rss_is_the_commands_own_not_the_harness() -> None:
    """Linux carries peak RSS across execve: a command started straight from this (large)
    interpreter would report at least the interpreter's peak. The harness must not."""
    harness = load("harness")
    ours = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert ours > 30 << 20, "the test needs a large parent to show the difference"
    small = harness.run_process(["true"])
    assert small.rss < 8 << 20, f"`true` reported {small.rss >> 20} MiB: the parent's peak leaked in"
    # A command that really uses memory reports it.
    touch = "b = bytearray(64 << 20); b[::4096] = b'x' * (16 << 10)"
    big = harness.run_process([sys.executable, "-c", touch])
    assert big.rss > 64 << 20
    assert big.cpu > 0 and big.wall >= big.cpu * 0.5


def test_failing_command_raises() -> None:
    harness = load("harness")
    with pytest.raises(subprocess.CalledProcessError):
        harness.run_process(["false"])


def test_alternate_runs_sides_in_turn_after_warmup() -> None:
    harness = load("harness")
    order: list[str] = []
    a = harness.Side("a", ["true"], lambda: order.append("a"))
    b = harness.Side("b", ["true"], lambda: order.append("b"))
    harness.alternate([a, b], rounds=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert len(a.samples) == len(b.samples) == 3
    assert harness.paired_ratio(a, b, "wall") > 0


def test_regression_beyond_noise_is_a_warning_line() -> None:
    conftest = load("conftest")
    baseline = {"noise": 0.25, "ratios": {"nbd": {"wall": 1.0, "cpu": 1.0, "rss": None},
                                          "gone": {"wall": 1.0, "cpu": 1.0, "rss": 1.0}}}
    measured = {"nbd": {"wall": 1.3, "cpu": 1.2, "rss": 2.0}}
    lines = conftest.regressions(measured, baseline)
    assert len(lines) == 1
    assert lines[0].startswith("WARNING: bench regression: nbd wall 1.300")


def test_fragmented_image_is_a_clean_ext4_in_many_extents(tmp_path: Path) -> None:
    suite = load("suite")
    image = suite.fragmented(tmp_path, 64 << 20)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True, text=True).stdout
    extents, allocated = suite.allocation(image)
    assert extents > 40, extents
    assert 5 << 20 < allocated < 40 << 20, allocated
    match = re.search(r"(\d+)/\d+ files", fsck)
    assert match is not None, fsck
    assert int(match.group(1)) > 100  # inodes in use: the files left, their directories
