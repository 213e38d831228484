"""Issue 20's comparisons as pytest-benchmark tests: whole processes, paired with the peer.

Each test is one comparison; a pedantic round runs every side once, alternating (A B, A B, ...),
each into a fresh target. pytest-benchmark times the round (both sides); the figures that count
are the per-side wait4 measurements, whose median per-round ratios go to conftest.RATIOS.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import suite
from conftest import RATIOS
from harness import HERE, Side, paired_ratio, run_process
from workload import MiB

QUICK_SIZE = 128 * MiB
FULL_SIZE = 1024 * MiB


@pytest.fixture(scope="session")
def quick(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--quick"))


@pytest.fixture(scope="session")
def work() -> Path:
    path = HERE / "work"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def rounds(quick: bool) -> int:
    return 3 if quick else 7


@pytest.fixture(scope="session")
def reference(work: Path, quick: bool) -> Path:
    return suite.reference(work, QUICK_SIZE if quick else FULL_SIZE)


@pytest.fixture(scope="session")
def fragmented(work: Path, quick: bool) -> Path:
    return suite.fragmented(work, QUICK_SIZE if quick else 2 * FULL_SIZE)


def paired(benchmark: Any, comparison: AbstractContextManager[list[Side]], rounds: int) -> list[Side]:
    with comparison as sides:
        for s in sides:
            s.samples = []
        calls = [0]

        def one_round() -> None:
            calls[0] += 1
            for s in sides:
                s.prepare()
                os.sync()
                sample = run_process(s.argv)
                if calls[0] > 1:  # the first call is pedantic's warm-up round
                    assert s.samples is not None
                    s.samples.append(sample)

        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1, iterations=1)
        return sides


def record(benchmark: Any, key: str, goal: str, ours: Side, peer: Side) -> None:
    r: dict[str, Any] = {
        "goal": goal,
        "wall": paired_ratio(ours, peer, "wall"),
        "cpu": paired_ratio(ours, peer, "cpu"),
        "rss": paired_ratio(ours, peer, "rss"),
        "detail": f"{ours.median('wall'):.3f} s / {peer.median('wall'):.3f} s ({peer.name})",
    }
    RATIOS[key] = r
    benchmark.extra_info.update({k: v for k, v in r.items() if k != "detail"}, peer=peer.name)
    assert r["wall"] > 0


def test_nbd_copy_vs_nbdcopy(benchmark: Any, work: Path, reference: Path, rounds: int) -> None:
    mover, peer = paired(benchmark, suite.nbd_copy(work, reference, durable_only=True), rounds)
    record(benchmark, "nbd_vs_nbdcopy_flush", "<= 0.7", mover, peer)
    RATIOS["nbd_peak_rss_mib"] = {"goal": "<= 64", "wall": None, "cpu": None,
                                  "rss": mover.median("rss") / MiB,
                                  "detail": f"nbdcopy {peer.median('rss') / MiB:.0f} MiB"}


def test_qcow2_vs_qemu_img(benchmark: Any, work: Path, reference: Path, rounds: int) -> None:
    mover, peer, bare = paired(benchmark, suite.qcow2_copy(work, reference, durable_only=True), rounds)
    record(benchmark, "qcow2_vs_qemu_img_writeback", "<= 0.6", mover, peer)
    record(benchmark, "qcow2_no_manifest_vs_qemu_img", "<= 0.6", bare, peer)


def test_incremental_vs_full(benchmark: Any, work: Path, reference: Path, rounds: int) -> None:
    inc, full = paired(benchmark, suite.incremental(work, reference), rounds)
    record(benchmark, "incremental_vs_full", "<= 0.10", inc, full)


def test_fragmented_qcow2_vs_qemu_img(benchmark: Any, work: Path, fragmented: Path, rounds: int) -> None:
    mover, peer, _ = paired(benchmark, suite.qcow2_copy(work, fragmented, durable_only=True), rounds)
    record(benchmark, "fragmented_qcow2_vs_qemu_img", "<= 0.6", mover, peer)


def test_fragmented_nbd_vs_nbdcopy(benchmark: Any, work: Path, fragmented: Path, rounds: int) -> None:
    mover, peer = paired(benchmark, suite.nbd_copy(work, fragmented, durable_only=True), rounds)
    record(benchmark, "fragmented_nbd_vs_nbdcopy_flush", "<= 0.7", mover, peer)


def test_startup(benchmark: Any, rounds: int) -> None:
    help_, python = paired(benchmark, suite.startup(), max(rounds, 5))
    record(benchmark, "startup_vs_python", "", help_, python)
    RATIOS["startup_ms"] = {"goal": "<= 40", "wall": help_.median("wall") * 1000, "cpu": None,
                            "rss": None, "detail": f"python -c pass {python.median('wall') * 1000:.0f} ms"}
