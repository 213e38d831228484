#!/usr/bin/env bash
# Install what is missing on a fresh machine, idempotently, then build the mover extension.
#
#   - Debian packages the product and its tests run (qemu-utils, nbdkit, libnbd-bin, ...);
#   - a virtual environment at .venv with the project's Python packages and console scripts;
#   - the Rust extension (pyapp._mover) built in release mode into that environment.
#
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again at any time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

APT_PACKAGES=(
    qemu-utils nbdkit libnbd-bin     # NBD servers and peers, qemu-img
    b3sum                            # BLAKE3 peer for the benchmarks
    time                             # GNU time: the benchmarks' CPU and peak RSS of each command
    unzip                            # the restore tests unpack zip archives with it too
    fdisk e2fsprogs xfsprogs mtools dosfstools ntfs-3g  # lab disk images without mounting
    nfs-common cifs-utils            # mount.nfs and mount.cifs for backup repositories
    golang-go golang-github-vmware-govmomi-dev  # the vSphere lab simulator
    openssh-client openssh-server    # the VMA -> OMA tunnel
    python3-venv
)

log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { log "cargo (Rust) is required and not installed"; exit 1; }

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$PYTHON" -m venv .venv
fi
export VIRTUAL_ENV="$ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"

# Python dependencies: reinstalled only when pyproject.toml changes.
mkdir -p .bootstrap
stamp=.bootstrap/pip-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    log "installing Python packages"
    pip install -q --upgrade pip 'maturin>=1.7,<2'
    deps=$(python - <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))
PY
)
    mapfile -t dep_list <<<"$deps"
    pip install -q "${dep_list[@]}"
    rm -f .bootstrap/pip-*
    touch "$stamp"
fi

# The extension: cargo's own change tracking makes this quick when nothing changed.
log "building the mover extension (release)"
maturin develop --release -q >.bootstrap/maturin.log 2>&1 || { cat .bootstrap/maturin.log >&2; log "the mover extension did not build"; exit 1; }
python -c 'import pyapp._mover'
