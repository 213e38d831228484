"""Consolidating backup chains: synthetic fulls, retention merges, and crash safety.

The crash-safety test runs ``mover consolidate`` in a subprocess and kills it with SIGKILL at
random moments over many runs; after every kill each restore point still present must read
exactly as its raw snapshot (``qemu-img compare``), pass ``qemu-img check`` and verify against
its manifest, the restore points newer than the merge must all be there, and the only stray
files allowed are the consolidation's temporary ones, which the next run removes.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyapp import _mover

from .conftest import MiB, images_equal, write_disk

pytestmark = pytest.mark.interop

SIZE = 48 * MiB
LAYERS = 4


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pyapp.cli", *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def check_clean(image: Path) -> None:
    r = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, f"{image}: {r.stdout}{r.stderr}"


def build_chain(work: Path) -> tuple[list[Path], list[Path]]:
    """A full and LAYERS-1 incrementals written by the mover, with raw snapshots, oldest first."""
    work.mkdir()
    rng = random.Random(9)
    disk = work / "disk.raw.snap"
    write_disk(disk, SIZE, [(i * MiB, MiB) for i in range(0, SIZE // MiB, 2)], seed=9)
    images: list[Path] = []
    snaps: list[Path] = []
    for i in range(LAYERS):
        changed: list[tuple[int, int]] = []
        if i:
            with open(disk, "r+b") as f:
                for _ in range(8):
                    off = rng.randrange(0, SIZE - MiB)
                    length = rng.choice([4096, 100_000, MiB])
                    f.seek(off)
                    f.write(bytes(length) if rng.random() < 0.25 else rng.randbytes(length))
                    changed.append((off, length))
        snap = work / f"b{i}.snap"
        shutil.copyfile(disk, snap)
        img = work / f"b{i}.qcow2"
        job = _mover.Copy(str(disk), str(img), allocated_only=not i, extents=changed or None,
                          backing=images[-1] if images else None)
        job.run()
        images.append(img)
        snaps.append(snap)
    disk.unlink()
    return images, snaps


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    return build_chain(tmp_path_factory.mktemp("chain") / "template")


def fresh_copy(template: tuple[list[Path], list[Path]], where: Path) -> tuple[list[Path], list[Path]]:
    src = template[0][0].parent
    shutil.copytree(src, where)
    return [where / p.name for p in template[0]], [where / p.name for p in template[1]]


def test_synthetic_full_and_retention_merge(template: tuple[list[Path], list[Path]], tmp_path: Path) -> None:
    images, snaps = fresh_copy(template, tmp_path / "c")
    top = images[-1]
    out = tmp_path / "c" / "synthetic.qcow2"
    r = cli("consolidate", str(top), "--output", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["merged"] == [str(p) for p in reversed(images)] and doc["removed"] == []
    check_clean(out)
    assert images_equal(out, snaps[-1], fmt_a="qcow2")
    assert json.loads(_mover.info(out))["depth"] == 1
    assert cli("verify", str(out)).returncode == 0
    assert cli("consolidate", str(top), "--output", str(out)).returncode == 1, "never overwrites"

    # Retention: the oldest increment merged into the full.
    r = cli("consolidate", str(top), "--layers", "2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["image"] == str(images[1]) and doc["removed"] == [str(images[0])]
    assert not images[0].exists()
    for img, snap in zip(images[1:], snaps[1:], strict=True):
        check_clean(img)
        assert images_equal(img, snap, fmt_a="qcow2"), img
    assert json.loads(_mover.info(top))["depth"] == LAYERS - 1
    assert cli("verify", str(top), "--chain").returncode == 0

    assert cli("consolidate", str(top)).returncode == 2
    bad = cli("consolidate", str(top), "--layers", "1", "--json")
    assert bad.returncode == 1 and json.loads(bad.stdout)["code"] == "InvalidPlanError"


def assert_restore_points(images: list[Path], snaps: list[Path], merged: int) -> None:
    """Every restore point present reads as its snapshot; those newer than the merge point are
    all present; nothing but temporary files is left over."""
    keep = merged - 1  # the oldest restore point that must survive (0-based, oldest first)
    for i, (img, snap) in enumerate(zip(images, snaps, strict=True)):
        if not img.exists():
            assert i < keep, f"restore point {img.name} vanished"
            continue
        check_clean(img)
        assert images_equal(img, snap, fmt_a="qcow2"), f"{img.name} changed"
        if Path(f"{img}.manifest").exists():
            assert _mover.verify(str(img)).ok, f"{img.name} does not verify"
    known = {p.name for p in images} | {f"{p.name}.manifest" for p in images} | {p.name for p in snaps}
    stray = [p.name for p in images[0].parent.iterdir() if p.name not in known]
    assert all(".consolidate-tmp" in n for n in stray), stray


def crash_runs(template: tuple[list[Path], list[Path]], tmp_path: Path, runs: int) -> None:
    # How long a run takes, to spread the kills over its whole life.
    images, _ = fresh_copy(template, tmp_path / "timing")
    t0 = time.monotonic()
    assert cli("consolidate", str(images[-1]), "--layers", "3").returncode == 0
    whole = time.monotonic() - t0
    rng = random.Random(20)
    seen: dict[str, int] = {}
    for run in range(runs):
        images, snaps = fresh_copy(template, tmp_path / f"run{run}")
        merged = 2 + run % 2
        argv = [sys.executable, "-m", "pyapp.cli", "consolidate", str(images[-1]), "--layers", str(merged)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, whole * 1.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = crash_state(images, merged)
        seen[state] = seen.get(state, 0) + 1
        assert_restore_points(images, snaps, merged)
        if run % 4 == 0:
            # The next consolidation finishes the job and leaves nothing behind.
            r = cli("consolidate", str(images[-1]), "--layers", "2")
            assert r.returncode == 0, r.stderr
            assert_restore_points(images, snaps, LAYERS)
            assert not [p for p in images[0].parent.iterdir() if ".consolidate-tmp" in p.name]
        shutil.rmtree(images[0].parent)
    print(f"consolidate killed {runs} times ({whole:.2f} s a run): {seen}")
    assert seen.get("writing", 0) + seen.get("renamed", 0) > 0, f"no kill landed mid-consolidation: {seen}"


def crash_state(images: list[Path], merged: int) -> str:
    """Where the killed consolidation was: not started, writing its temporary file, renamed
    into place (older files not yet all removed), or done."""
    if any(".consolidate-tmp" in p.name for p in images[0].parent.iterdir()):
        return "writing"
    point = images[merged - 1]
    if json.loads(_mover.info(point))["depth"] > 1:
        return "not started"
    return "renamed" if images[0].exists() else "done"


def test_consolidate_killed_at_random_points_loses_no_restore_point(
    template: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    crash_runs(template, tmp_path, runs=20)


@pytest.mark.slow
def test_consolidate_killed_at_random_points_many_runs(
    template: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    crash_runs(template, tmp_path, runs=150)
