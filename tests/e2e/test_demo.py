"""The README's demo command, as a user runs it (without the bootstrap step)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end_within_three_minutes(tmp_path: Path) -> None:
    started = time.monotonic()
    summary_file = tmp_path / "summary.json"
    r = subprocess.run(
        [sys.executable, "-m", "lab.demo", "--json", str(summary_file)],
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
    replication, _, rest = out.partition("CloudStack volumes made: 3")
    cloudstack, _, backups = rest.partition("backups of web01")
    assert replication.count(" yes") == 3  # three disks, each equal to its source after both passes
    # each a CloudStack volume kept through both passes, equal to its source
    assert cloudstack.count("same volume both passes: yes  equal to source: yes") == 3
    # two backup points, every file restored from each equal to the guest's
    assert backups.count(" equal ") == 2 and "DIFFER" not in backups
    assert "chain verified against its manifests: yes" in backups

    # --json FILE: the same summary as JSON
    summary = json.loads(summary_file.read_text())
    assert summary["passed"] is True and 0 < summary["seconds"] < 180
    passes = summary["replication"]["passes"]
    assert [(p["vm"], p["kind"]) for p in passes] == [
        ("web01", "initial"), ("db01", "initial"), ("web01", "incremental"), ("db01", "incremental")
    ]  # fmt: skip
    disks = [d for p in passes for d in p["disks"]]
    assert len(disks) == 6 and all(d["target_equals_source"] is True for d in disks)
    assert all(p["status"] == "completed" and p["error"] is None for p in passes)
    full = sum(d["bytes_written"] for p in passes[:2] for d in p["disks"])
    incremental = sum(d["bytes_written"] for p in passes[2:] for d in p["disks"])
    assert 0 < incremental < full
    assert summary["replication"]["snapshots_left"] == 0
    points = summary["backup"]["points"]
    assert [p["backup_type"] for p in points] == ["full", "incremental"]
    assert all(
        p["status"] == "completed" and p["files_equal"] is True and p["files_restored"] > 0 for p in points
    )
    assert summary["backup"]["chain_verified"] is True
    # the replicas are CloudStack volumes of the lab CloudStack, attached to the OMA VM, one per
    # disk, the same volume through both passes, each equal to its source
    volumes = summary["cloudstack"]["volumes"]
    assert summary["cloudstack"]["volumes_created"] == len(volumes) == 3
    assert len({v["cloudstack_volume_id"] for v in volumes}) == 3
    assert len({v["attached_to"] for v in volumes}) == 1
    assert all(v["same_volume_both_passes"] is True and v["target_equals_source"] is True for v in volumes)
    serials = ["virtio-" + v["cloudstack_volume_id"].replace("-", "")[:20] for v in volumes]
    assert all(v["device"].endswith(serial) for v, serial in zip(volumes, serials, strict=True))
