"""Issue 13, item 10: the OMA's memory stays bounded under load.

The whole process, as the bench runs it (``bench/oma_api.py --rss``): the OMA as its own process
on a real PostgreSQL, seeded with VMs and finished replications, 20 keep-alive clients cycling
through GET /vms, GET /replications, POST /replications and GET /debug/logs for a 20 s warm-up and
90 s more, its RSS read from ``/proc/<pid>/status``. Before the fix the RSS doubled in a minute:
trio-asyncio kept every timer asyncpg cancelled (one per query, one per pool release) with the
context of the request that made it until the timer's deadline (up to 300 s).
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyapp.db import open_database

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


def cancelled_timers() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.TimerHandle) and o.cancelled())


async def test_cancelled_database_timers_are_not_kept(oma_dsn: str) -> None:
    """The cause, fast: each statement and each pool release schedules an asyncio timer that
    asyncpg cancels soon after; the bridge's loop must not keep them (and their contexts)."""
    async with open_database(oma_dsn, min_size=1, max_size=2) as db:
        before = cancelled_timers()
        for _ in range(2000):
            assert await db.fetchval("SELECT 1") == 1
        kept = cancelled_timers() - before
    assert kept < 500, f"{kept} cancelled timers kept alive after 2000 statements"
