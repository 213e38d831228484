#!/usr/bin/env bash
# Install what is missing, then run the product's main job end to end on embedded defaults.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
./scripts/bootstrap.sh
exec "$ROOT/.venv/bin/python" -m lab.demo "$@"
