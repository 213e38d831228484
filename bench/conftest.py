"""pytest-benchmark suite of issue 20's comparisons (``pytest bench/ --benchmark-only``).

``--quick`` (what scripts/test.sh runs) uses a 128 MiB workload and a few rounds. At the end
the ratios are printed, written as JSON (``--bench-ratios``, default bench/work/ratios.json) and
compared with the committed bench/baseline.json: a ratio worse than its baseline by more than
the baseline's ``noise`` is reported as a WARNING line, never as a failure (the machines that
run this are shared and noisy). A run that improves a figure updates the baseline in the same
commit: ``--bench-update-baseline`` writes the measured ratios there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "baseline.json"
#: Filled by the tests: figure key -> {"wall": .., "cpu": .., "rss": .., "goal": .., "detail": ..}
RATIOS: dict[str, dict[str, Any]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("bench", "issue 20 comparisons")
    g.addoption("--quick", action="store_true", help="small workload (128 MiB), few rounds: the CI mode")
    g.addoption("--bench-ratios", type=Path, default=HERE / "work" / "ratios.json",
                help="write the ratios here")
    g.addoption("--bench-update-baseline", action="store_true",
                help="write the measured ratios to baseline.json")


def regressions(measured: dict[str, dict[str, Any]], baseline: dict[str, Any]) -> list[str]:
    """WARNING lines for every ratio worse than the baseline by more than its noise margin."""
    noise = float(baseline.get("noise", 0.25))
    warnings = []
    for key, base in baseline.get("ratios", {}).items():
        if key not in measured:
            continue
        for attr in ("wall", "cpu", "rss"):
            was, now = base.get(attr), measured[key].get(attr)
            if was is None or now is None:  # not measured for this figure
                continue
            if now > was * (1 + noise):
                warnings.append(f"WARNING: bench regression: {key} {attr} {now:.3f} against baseline "
                                f"{was:.3f} (+{(now / was - 1) * 100:.0f}%, noise margin {noise * 100:.0f}%)")
    return warnings


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not RATIOS:
        return
    tr = terminalreporter
    tr.section("issue 20 ratios (mover / peer, median of paired rounds)")
    tr.write_line(f"{'figure':<34} {'goal':>8} {'wall':>7} {'CPU':>7} {'RSS':>7}  detail")
    for key, r in RATIOS.items():
        cells = " ".join("      —" if r[a] is None else f"{r[a]:7.3f}" for a in ("wall", "cpu", "rss"))
        tr.write_line(f"{key:<34} {r['goal']:>8} {cells}  {r['detail']}")
    out: Path = config.getoption("--bench-ratios")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RATIOS, indent=2) + "\n")
    tr.write_line(f"ratios written to {out}")
    if config.getoption("--bench-update-baseline"):
        old = json.loads(BASELINE.read_text()) if BASELINE.exists() else {"noise": 0.25}
        old["ratios"] = {k: {a: v[a] for a in ("wall", "cpu", "rss")} for k, v in RATIOS.items()}
        BASELINE.write_text(json.dumps(old, indent=2) + "\n")
        tr.write_line(f"baseline updated: {BASELINE}")
        return
    if not BASELINE.exists():
        tr.write_line(f"WARNING: no baseline at {BASELINE}: nothing to compare with")
        return
    baseline = json.loads(BASELINE.read_text())
    warnings = regressions(RATIOS, baseline)
    for line in warnings:
        tr.write_line(line, yellow=True, bold=True)
    if not warnings:
        tr.write_line(f"no ratio worse than {BASELINE.name} beyond the noise margin "
                      f"({float(baseline.get('noise', 0.25)) * 100:.0f}%)")
