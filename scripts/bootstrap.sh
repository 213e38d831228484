#!/usr/bin/env bash
# Install what is missing on a fresh machine, idempotently, then build the mover extension.
#
#   - Debian packages the product and its tests run (nbdkit, libnbd-bin, ...), and the lab's
#     bootable guest (a Debian kernel, busybox, syslinux);
#   - one consistent qemu: qemu-utils and qemu-system-x86 of the same version (see install_qemu);
#   - a virtual environment at .venv with the project's Python packages and console scripts;
#   - the Rust extension (pyapp._mover) built in release mode into that environment.
#
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again at any time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

APT_PACKAGES=(
    nbdkit libnbd-bin                # NBD servers and peers (qemu-img and qemu-nbd: install_qemu)
    b3sum                            # BLAKE3 peer for the benchmarks
    time                             # GNU time: the benchmarks' CPU and peak RSS of each command
    unzip                            # the restore tests unpack zip archives with it too
    fdisk e2fsprogs xfsprogs mtools dosfstools ntfs-3g  # lab disk images without mounting
    nfs-common cifs-utils            # mount.nfs and mount.cifs for backup repositories
    golang-go golang-github-vmware-govmomi-dev  # the vSphere lab simulator
    openssh-client openssh-server    # the VMA -> OMA tunnel
    systemd                          # systemd-analyze: tests/test_systemd.py verifies the shipped units
    python3-venv
    linux-image-amd64 busybox-static syslinux syslinux-common  # the lab's bootable guest (lab/bootdisk)
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

# One qemu: qemu-img/qemu-nbd (qemu-utils) and the VM runner (qemu-system-x86) of one version.
# Some machines ship qemu-utils from Debian's backports suite (a ~bpo version) while apt's sources
# list only the release: a plain `apt-get install qemu-system-x86` would then pull the release's
# older qemu and downgrade or remove qemu-utils. So when the installed qemu-utils is a backports
# build, the backports suite of the mirror apt already uses is added (a sources file of its own,
# written only when no source lists that suite yet) and every qemu package is installed at the
# installed qemu-utils' version from there; when backports no longer has that exact version, all
# of them move to backports' current one together. Otherwise they come from the release, together.
QEMU_PACKAGES=(qemu-utils qemu-system-x86 qemu-system-common)

installed_version() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | sed -n 's/^install ok installed //p' || true; }

# The URI of the Debian mirror that serves suite $1, from apt's sources (deb822 and one-line).
mirror_of_suite() {
    local suite=$1 f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        case $f in
        *.sources)
            awk -v want="$suite" '
                function flush() { if (deb && hit && uri != "") { print uri; found = 1; exit } deb = hit = 0; uri = "" }
                /^[[:space:]]*$/ { flush(); next }
                /^[[:space:]]*#/ { next }
                tolower($1) == "types:"  { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
                tolower($1) == "uris:"   { uri = $2 }
                tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == want) hit = 1 }
                tolower($1) == "enabled:" && tolower($2) == "no" { deb = 0 }
                END { if (!found) flush() }' "$f" ;;
        *)
            sed -e 's/\[[^]]*\]//' "$f" | awk -v want="$suite" '$1 == "deb" && $3 == want { print $2; exit }' ;;
        esac
    done | head -n1
}

suite_is_listed() {
    local suite=$1
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -e 's/\[[^]]*\]//' | awk -v want="$suite" '$1 == "deb" && $3 == want { f = 1 } END { exit !f }' && return 0
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk -v want="$suite" 'tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == want) f = 1 } END { exit !f }'
}

# Whether apt can install package $1 at version $2.
apt_has_version() { apt-cache madison "$1" 2>/dev/null | awk -F'|' -v v="$2" '{ gsub(/ /, "", $2) } $2 == v { f = 1 } END { exit !f }'; }

install_qemu() {
    local utils system codename suite mirror sources
    utils=$(installed_version qemu-utils)
    system=$(installed_version qemu-system-x86)
    if [ -n "$utils" ] && [ "$utils" = "$system" ] && [ "$(installed_version qemu-system-common)" = "$utils" ]; then
        log "qemu $utils: qemu-utils and qemu-system-x86 already agree"
        return 0
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    case $utils in
    *~bpo*)
        codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
        suite="$codename-backports"
        sources=/etc/apt/sources.list.d/$suite.sources
        if ! suite_is_listed "$suite"; then
            mirror=$(mirror_of_suite "$codename")
            [ -n "$mirror" ] || { log "qemu-utils $utils comes from $suite, and no apt source serves $codename to take the mirror from"; exit 1; }
            log "adding $suite from $mirror to apt's sources ($sources)"
            printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                "$mirror" "$suite" | as_root tee "$sources" >/dev/null
            as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        fi
        local version=$utils
        if ! apt_has_version qemu-system-x86 "$version"; then
            version=$(apt-cache madison qemu-system-x86 | awk -F'|' -v s="$suite" '$3 ~ s { gsub(/ /, "", $2); print $2; exit }')
            [ -n "$version" ] || { log "$suite has no qemu-system-x86"; exit 1; }
            log "$suite no longer has qemu $utils: moving qemu-utils to $version with the rest"
        fi
        log "installing qemu $version from $suite (qemu-utils was $utils, qemu-system-x86 ${system:-absent}): ${QEMU_PACKAGES[*]} qemu-system-data"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t "$suite" \
            "${QEMU_PACKAGES[@]/%/=$version}" qemu-system-data >/dev/null ;;
    *)
        # From the release: pinned to the installed qemu-utils when there is one and the release
        # still has it, else the release's candidate for all of them.
        if [ -n "$utils" ] && apt_has_version qemu-system-x86 "$utils"; then
            log "installing qemu $utils from the release to match qemu-utils: ${QEMU_PACKAGES[*]}"
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${QEMU_PACKAGES[@]/%/=$utils}" >/dev/null
        else
            log "installing qemu from the release (qemu-utils was ${utils:-absent}): ${QEMU_PACKAGES[*]}"
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${QEMU_PACKAGES[@]}" >/dev/null
        fi ;;
    esac
    utils=$(installed_version qemu-utils)
    system=$(installed_version qemu-system-x86)
    [ "$utils" = "$system" ] || { log "qemu is not consistent: qemu-utils $utils, qemu-system-x86 $system"; exit 1; }
    local img sys
    img=$(qemu-img --version | sed -n '1s/.*version \([^ ]*\).*/\1/p')
    sys=$(qemu-system-x86_64 --version | sed -n '1s/.*version \([^ ]*\).*/\1/p')
    [ "$img" = "$sys" ] || { log "qemu-img $img and qemu-system-x86_64 $sys differ"; exit 1; }
    log "qemu $utils: qemu-img, qemu-nbd and qemu-system-x86_64 $img"
}
install_qemu

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
