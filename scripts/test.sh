#!/usr/bin/env bash
# Install what is missing, then run the whole test suite: lints as gates, the Rust unit and
# interop tests, the extension's stub check, and pytest. Arguments go to pytest
# (e.g. `./scripts/test.sh -m "not slow"` for the fast loop).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
./scripts/bootstrap.sh
export VIRTUAL_ENV="$ROOT/.venv" PATH="$ROOT/.venv/bin:$PATH" PYO3_PYTHON="$ROOT/.venv/bin/python"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "rustfmt";   cargo fmt --all -- --check
step "clippy";    cargo clippy --quiet --no-default-features --all-targets -- -D warnings
                  cargo clippy --quiet --features python --lib -- -D warnings
step "cargo test"; cargo test --no-default-features --quiet 2>&1 | grep -vE '^\s*$'
step "ruff";      ruff check pyapp vma oma lab tests bench
step "imports";   lint-imports --no-logo --no-cache
step "mypy";      mypy
step "stubtest";  python -m mypy.stubtest pyapp._mover
step "pytest";    pytest "$@"
# Issue 20's ratios on a small workload, paired with the peers: printed, kept as JSON and compared
# with bench/baseline.json; a regression is a WARNING line, never a failure (shared, noisy machines).
step "bench (quick)"; pytest bench/ --benchmark-only -q -p no:cacheprovider --quick \
                  --benchmark-json bench/work/benchmark.json --bench-ratios bench/work/ratios.json
