"""Issue 13, item 10: the OMA's memory stays bounded under load.

The whole process, as the bench runs it (``bench/oma_api.py --rss``): the OMA as its own process
on a real PostgreSQL, seeded with VMs and finished replications, 20 keep-alive clients cycling
through GET /vms, GET /replications, POST /replications and GET /debug/logs for a 20 s warm-up and
90 s more, its RSS read from ``/proc/<pid>/status``. Before the fix the RSS doubled in a minute:
trio-asyncio kept every timer asyncpg cancelled (one per query, one per pool release) with the
context of the request that made it until the timer's deadline (up to 300 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rss_after_load_stays_within_1_5x_of_warmup(tmp_path: Path) -> None:
    out = tmp_path / "rss.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "oma_api.py"),
        "--rss",
        "--clients", "20",
        "--warmup", "20",
        "--duration", "90",
        "--vms", "2000",
        "--jobs", "2000",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["requests"] > 2000, report  # the load really ran
    assert report["ratio"] <= 1.5, (
        f"OMA RSS grew from {report['warmup_rss_mib']} MiB after the warm-up to {report['end_rss_mib']} MiB"
        f" (x{report['ratio']}); samples (s, MiB): {report['samples']}"
    )
