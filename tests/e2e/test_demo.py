"""The README's demo command, as a user runs it (without the bootstrap step)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end_within_three_minutes() -> None:
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pyapp.demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert time.monotonic() - started < 180
    out = r.stdout
    assert "demo passed" in out and "snapshots left in vCenter: 0" in out
    replication, _, backups = out.partition("backups of web01")
    assert replication.count(" yes") == 3  # three disks, each equal to its source after both passes
    # two backup points, every file restored from each equal to the guest's
    assert backups.count(" equal ") == 2 and "DIFFER" not in backups
    assert "chain verified against its manifests: yes" in backups
