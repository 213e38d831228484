"""The QCOW2 metadata fuzzer, for three minutes, in the slow set.

``mover-core/tests/qcow2_fuzz.rs`` mutates real images made by ``qemu-img`` and parses, opens,
maps and reads each one; in the normal ``cargo test`` it runs for a few seconds. Here it is built
in release mode with overflow checks and debug assertions on (in its own target directory, so the
extension's build is untouched) and run for ``MOVER_FUZZ_SECONDS`` (default 180) under an
address-space limit: a panic fails the test with the shrunk case, and an allocation the image
size does not justify aborts the child instead of swapping the machine.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.interop]

ROOT = Path(__file__).resolve().parents[2]
FUZZ_SECONDS = float(os.environ.get("MOVER_FUZZ_SECONDS", "180"))
# The images are about a megabyte; the reader's own bounds (L2 cache, inflate buffers) are tens of
# MiB. 2 GiB leaves room for the test harness and its threads, far below a runaway table.
ADDRESS_SPACE = 2 << 30


def build_fuzzer() -> Path:
    env = {
        **os.environ,
        "CARGO_TARGET_DIR": str(ROOT / "target" / "fuzz"),
        "CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS": "true",
        "CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS": "true",
    }
    argv = ["cargo", "test", "--release", "--no-default-features", "--manifest-path",
            str(ROOT / "mover-core" / "Cargo.toml"), "--test", "qcow2_fuzz", "--no-run",
            "--message-format=json"]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    for line in r.stdout.splitlines():
        msg = json.loads(line)
        if (msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "qcow2_fuzz"
                and msg.get("executable")):
            return Path(msg["executable"])
    raise AssertionError(f"cargo built no qcow2_fuzz test binary: {r.stderr[-2000:]}")


def limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.mark.timeout(int(FUZZ_SECONDS) + 900)
def test_qcow2_metadata_fuzzer_finds_no_panic_abort_or_runaway_allocation() -> None:
    binary = build_fuzzer()
    r = subprocess.run(
        [str(binary), "--exact", "fuzz_qcow2_metadata", "--nocapture"],
        env={**os.environ, "MOVER_FUZZ_SECONDS": str(FUZZ_SECONDS), "RUST_BACKTRACE": "1"},
        capture_output=True, text=True, timeout=FUZZ_SECONDS + 300, preexec_fn=limit_address_space,
        check=False,
    )
    how = f"signal {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"status {r.returncode}"
    assert r.returncode == 0, f"the fuzzer failed ({how}):\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    m = re.search(r"fuzz: (\d+) images from (\d+) seeds in ([\d.]+) s", r.stdout)
    assert m, r.stdout
    images, seeds, seconds = int(m[1]), int(m[2]), float(m[3])
    assert seeds >= 10 and seconds >= FUZZ_SECONDS * 0.95, m[0]
    assert images >= 20 * FUZZ_SECONDS, f"too few cases to mean anything: {m[0]}"
