"""The ``mover`` command as an operator runs it: the console script of the virtual environment,
real signals, real peers (nbdkit with the ``delay`` filter as a slow source), and qemu-img as the
judge of what was written (``compare``, ``check``, ``map``)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .conftest import MiB, Nbdkit

pytestmark = pytest.mark.interop

GiB = 1 << 30
TiB = 1 << 40
CLUSTER = 64 << 10


def mover_command() -> str:
    """The ``mover`` console script installed beside this interpreter (never ``python -m``)."""
    script = Path(sys.executable).parent / "mover"
    if not script.exists():
        found = shutil.which("mover")
        assert found, "the mover console script is not installed (pip install -e . / maturin develop)"
        return found
    return str(script)


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is required by this test and is not installed"
    return found


def mover(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([mover_command(), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def summary(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("qemu-img"), *args], capture_output=True, text=True, check=False)


def write_pattern(path: Path, size: int, seed: int = 3) -> bytes:
    """A disk of ``size`` bytes mixing random data, zeros written as data (allocated in the
    file) and holes, at offsets that do not line up with clusters or requests."""
    rng = random.Random(seed)
    data = bytearray(size)
    pos = 0
    with open(path, "wb") as f:
        f.truncate(size)
        while pos < size:
            length = min(rng.choice([4096, 12288, 40960, 65536, 200704, 1 << 20]), size - pos)
            kind = rng.choice(["data", "data", "written-zeros", "hole"])
            if kind == "data":
                chunk = rng.randbytes(length)
                data[pos:pos + length] = chunk
                f.seek(pos)
                f.write(chunk)
            elif kind == "written-zeros":
                f.seek(pos)
                f.write(bytes(length))
            pos += length
    return bytes(data)


# ---- signals and resume ---------------------------------------------------------------------

DISK = 24 * MiB


@pytest.mark.parametrize(("target_name", "signum"), [
    pytest.param(name, sig, id=f"{name.split('.')[1]}-{sig.name}")
    for name in ("target.raw", "target.qcow2") for sig in (signal.SIGINT, signal.SIGTERM)
])
def test_signal_checkpoints_and_the_same_command_resumes(
    tmp_path: Path, nbdkit: Callable[..., Nbdkit], target_name: str, signum: signal.Signals,
) -> None:
    tool("nbdkit")
    image = tmp_path / "source.raw"
    write_pattern(image, DISK)
    # 384 requests of 64 KiB, one at a time, each read delayed: about 8 s for the whole copy.
    slow = nbdkit("--filter=delay", "file", f"file={image}", "rdelay=20ms")
    target = tmp_path / target_name
    checkpoint = tmp_path / "copy.checkpoint"
    manifest = ["--manifest", str(tmp_path / "target.manifest")] if target_name.endswith(".raw") else []
    argv = [mover_command(), "copy", slow.uri, str(target), "--checkpoint", str(checkpoint),
            "--connections", "1", "--requests", "1", "--request-size", str(64 << 10), "--json", *manifest]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, (proc.returncode, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert signum.name in lines[0] and str(checkpoint) in lines[0], lines[0]
    saved = json.loads(checkpoint.read_text())
    done = sum(end - start for start, end in saved["done"])
    assert 0 < done < saved["items"], saved
    if target_name.endswith(".qcow2"):
        check = qemu_img("check", str(target))
        assert check.returncode == 0, check.stdout + check.stderr

    # The same command, once more, continues where the checkpoint says.
    resumed = summary(subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False))
    assert 0 < resumed["bytes_resumed"] < DISK
    reference = tmp_path / ("reference" + target.suffix)
    ref_manifest = ["--manifest", str(tmp_path / "reference.manifest")] if manifest else []
    whole = summary(mover("copy", str(image), str(reference), "--request-size", str(64 << 10), "--json",
                          *ref_manifest))
    fmt = "qcow2" if target_name.endswith(".qcow2") else "raw"
    cmp = qemu_img("compare", "-f", fmt, "-F", fmt, str(target), str(reference))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    cmp = qemu_img("compare", "-f", fmt, "-F", "raw", str(target), str(image))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert resumed["disk_digest"] is not None
    assert resumed["disk_digest"] == whole["disk_digest"]
    assert Path(resumed["manifest"]).read_bytes() == Path(whole["manifest"]).read_bytes()
    if fmt == "qcow2":
        check = qemu_img("check", str(target))
        assert check.returncode == 0, check.stdout + check.stderr
        assert mover("verify", str(target)).returncode == 0


def test_a_signal_stops_checksum_cleanly(tmp_path: Path, nbdkit: Callable[..., Nbdkit]) -> None:
    image = tmp_path / "source.raw"
    write_pattern(image, DISK)
    slow = nbdkit("--filter=delay", "file", f"file={image}", "rdelay=1")
    proc = subprocess.Popen([mover_command(), "checksum", slow.uri], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, stderr)
    assert stderr.strip().splitlines() == ["mover: interrupted by SIGTERM"]


def test_resume_into_an_overlay(tmp_path: Path, nbdkit: Callable[..., Nbdkit]) -> None:
    """An incremental (overlay) target is resumed too, and its manifest is the same as an
    uninterrupted pass's."""
    image = tmp_path / "source.raw"
    write_pattern(image, DISK, seed=5)
    base = tmp_path / "base.qcow2"
    summary(mover("copy", str(image), str(base), "--json"))
    rng = random.Random(9)
    changed = sorted({rng.randrange(0, DISK // (256 << 10)) * (256 << 10) for _ in range(40)})
    with open(image, "r+b") as f:
        for off in changed:
            f.seek(off)
            f.write(rng.randbytes(256 << 10))
    extents = tmp_path / "changed.json"
    extents.write_text(json.dumps([[off, 256 << 10] for off in changed]))
    slow = nbdkit("--filter=delay", "file", f"file={image}", "rdelay=40ms")
    target = tmp_path / "inc.qcow2"
    checkpoint = tmp_path / "inc.checkpoint"
    argv = [mover_command(), "copy", slow.uri, str(target), "--backing", str(base), "--extents", str(extents),
            "--checkpoint", str(checkpoint), "--connections", "1", "--requests", "1",
            "--request-size", str(64 << 10), "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    resumed = summary(subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False))
    assert resumed["bytes_resumed"] > 0
    reference = tmp_path / "inc-ref.qcow2"
    whole = summary(mover("copy", str(image), str(reference), "--backing", str(base), "--extents",
                          str(extents), "--request-size", str(64 << 10), "--json"))
    assert resumed["disk_digest"] == whole["disk_digest"]
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(target), str(image))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    check = qemu_img("check", str(target))
    assert check.returncode == 0, check.stdout + check.stderr


def test_an_existing_qcow2_without_its_checkpoint_is_still_refused(tmp_path: Path) -> None:
    image = tmp_path / "source.raw"
    write_pattern(image, 4 * MiB)
    target = tmp_path / "t.qcow2"
    summary(mover("copy", str(image), str(target), "--json"))
    before = target.read_bytes()
    r = mover("copy", str(image), str(target), "--checkpoint", str(tmp_path / "none.checkpoint"))
    assert r.returncode != 0
    assert "existing QCOW2" in r.stderr
    assert target.read_bytes() == before


# ---- extent plans ---------------------------------------------------------------------------

BAD_PLANS = {
    "overlap": "[[0, 131072], [65536, 65536]]",
    "unsorted": "[[1048576, 4096], [0, 4096]]",
    "past-the-end": f"[[0, 4096], [{4 * MiB - 4096}, 8192]]",
    "malformed": "[[0, 4096], [8192,",
    "negative": "[[0, -1]]",
    "not-pairs": "[[0, 4096, 7]]",
    "empty-extent": "[[0, 0]]",
}


@pytest.mark.parametrize("target_name", ["t.raw", "t.qcow2"])
@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_invalid_extent_plan_is_refused_before_the_target_exists(
    tmp_path: Path, case: str, target_name: str,
) -> None:
    image = tmp_path / "source.raw"
    write_pattern(image, 4 * MiB)
    plan = tmp_path / "plan.json"
    plan.write_text(BAD_PLANS[case])
    target = tmp_path / target_name
    r = mover("copy", str(image), str(target), "--extents", str(plan))
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(plan) in lines[0], r.stderr
    assert not target.exists()
    assert not Path(f"{target}.manifest").exists()


def test_touching_sorted_extents_are_a_valid_plan(tmp_path: Path) -> None:
    image = tmp_path / "source.raw"
    write_pattern(image, 4 * MiB)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([[0, 65536], {"offset": 65536, "length": 4096}, [4 * MiB - 4096, 4096]]))
    r = summary(mover("copy", str(image), str(tmp_path / "t.raw"), "--extents", str(plan), "--json"))
    assert r["bytes_planned"] == 65536 + 4096 + 4096


# ---- zeros ----------------------------------------------------------------------------------

def zero_clusters(data: bytes, unit: int) -> list[int]:
    return [i for i in range(0, len(data), unit) if not any(data[i:i + unit])]


def data_ranges(path: Path, fmt: str) -> list[tuple[int, int]]:
    r = qemu_img("map", "--output=json", "-f", fmt, str(path))
    assert r.returncode == 0, r.stderr
    return [(e["start"], e["start"] + e["length"]) for e in json.loads(r.stdout) if e["data"]]


def overlaps(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s < end and start < e for s, e in ranges)


@pytest.mark.parametrize("plan", [[], ["--allocated-only"]], ids=["all", "allocated"])
@pytest.mark.parametrize("request_size", [4096, 16384, 65536, 262144, 1 << 20, 4 << 20])
def test_zero_clusters_are_never_written_as_data(tmp_path: Path, request_size: int, plan: list[str]) -> None:
    image = tmp_path / "source.raw"
    data = write_pattern(image, 16 * MiB, seed=request_size)
    for name, fmt, unit in [("t.qcow2", "qcow2", CLUSTER), ("t.raw", "raw", 4096)]:
        target = tmp_path / name
        summary(mover("copy", str(image), str(target), "--request-size", str(request_size), "--json", *plan))
        cmp = qemu_img("compare", "-f", fmt, "-F", "raw", str(target), str(image))
        assert cmp.returncode == 0, cmp.stdout
        mapped = data_ranges(target, fmt)
        bad = [z for z in zero_clusters(data, unit) if overlaps(mapped, z, z + unit)]
        assert not bad, f"{len(bad)} zero {fmt} clusters written as data, first at {bad[0]}"
        if fmt == "qcow2":
            check = qemu_img("check", str(target))
            assert check.returncode == 0, check.stdout


# ---- memory ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target_name", ["big.qcow2", "big.raw"])
def test_sparse_copy_of_a_2_tib_disk_stays_small(tmp_path: Path, target_name: str) -> None:
    image = tmp_path / "huge.raw"
    extents = [(0, MiB), (700 * GiB + 12345, 3 * MiB), (TiB + 4096, MiB), (2 * TiB - MiB, MiB)]
    rng = random.Random(1)
    with open(image, "wb") as f:
        f.truncate(2 * TiB)
        for off, length in extents:
            f.seek(off)
            f.write(rng.randbytes(length))
    target = tmp_path / target_name
    extra = ["--manifest", str(tmp_path / "big.manifest")] if target_name.endswith(".raw") else []
    r = summary(mover("copy", str(image), str(target), "--allocated-only", "--json", *extra, timeout=540))
    assert r["peak_rss_bytes"] is not None
    assert r["peak_rss_bytes"] <= 256 * MiB, f"peak RSS {r['peak_rss_bytes'] / MiB:.0f} MiB"
    fmt = "qcow2" if target_name.endswith(".qcow2") else "raw"
    cmp = qemu_img("compare", "-f", fmt, "-F", "raw", str(target), str(image))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    if fmt == "qcow2":
        check = qemu_img("check", str(target))
        assert check.returncode == 0, check.stdout
    os.unlink(image)
