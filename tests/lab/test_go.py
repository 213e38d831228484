"""The Go extension's own unit tests (journal parsing, merging, allocation map, change IDs)."""

from __future__ import annotations

import subprocess

import pytest

from lab.simulator import SOURCE_DIR, default_cache_dir, go_env


@pytest.mark.slow
def test_go_unit_tests() -> None:
    proc = subprocess.run(["go", "test", "."], cwd=SOURCE_DIR, env=go_env(default_cache_dir()),
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
