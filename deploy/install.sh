#!/usr/bin/env bash
# Put the OMA's or the VMA's systemd unit in place (docs/install.md, "Running as services").
#
#   deploy/install.sh oma [--database-url URL]   # on the OMA host; without a URL: embedded PostgreSQL
#   deploy/install.sh vma                        # on the VMA host
#
# Run as root from the checkout at /opt/mover after ./scripts/bootstrap.sh. Idempotent: the unit
# is replaced, existing configuration (/etc/oma/oma.env, /etc/vma/vma.json) is kept. The service
# is enabled and (re)started; `systemctl status oma-api` or `vma-api` shows it ready.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
units=/etc/systemd/system
role=${1:-}
shift || true

die() { echo "install.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
[ -x /opt/mover/.venv/bin/oma-api-server ] || die "/opt/mover/.venv is missing: run ./scripts/bootstrap.sh in /opt/mover first"

case "$role" in
oma)
    database_url=
    while [ $# -gt 0 ]; do
        case "$1" in
            --database-url) database_url=${2:?--database-url needs a URL}; shift 2 ;;
            *) die "unknown option $1" ;;
        esac
    done
    install -d -m 0700 /etc/oma /var/lib/oma
    [ -e /etc/oma/oma.env ] || install -m 0600 /dev/null /etc/oma/oma.env
    install -m 0644 "$here/systemd/oma-api.service" "$units/oma-api.service"
    dropin=$units/oma-api.service.d/embedded-postgres.conf
    if [ -n "$database_url" ]; then
        grep -v '^DATABASE_URL=' /etc/oma/oma.env > /etc/oma/oma.env.new || true
        echo "DATABASE_URL=$database_url" >> /etc/oma/oma.env.new
        chmod 0600 /etc/oma/oma.env.new && mv /etc/oma/oma.env.new /etc/oma/oma.env
        rm -f "$dropin"
    elif ! grep -q '^DATABASE_URL=' /etc/oma/oma.env; then
        # The embedded PostgreSQL runs as the user `pgserver` (created here: /etc is read-only to
        # the service) and opens the permissions of the directories above its files at each
        # start, which ProtectSystem=strict forbids: keep /usr, /boot and /etc read-only instead.
        id pgserver >/dev/null 2>&1 || useradd --system --shell /usr/sbin/nologin pgserver
        install -d "$units/oma-api.service.d"
        printf '[Service]\n# the embedded PostgreSQL (deploy/install.sh)\nProtectSystem=full\n' > "$dropin"
    fi
    systemctl daemon-reload
    systemctl enable oma-api.service
    systemctl restart oma-api.service
    echo "oma-api.service installed; create the first administrator with:"
    echo "  systemctl stop oma-api; /opt/mover/.venv/bin/oma-api-server --data-dir /var/lib/oma --create-admin admin; systemctl start oma-api"
    ;;
vma)
    id vma >/dev/null 2>&1 || useradd --system --home-dir /var/lib/vma --shell /usr/sbin/nologin vma
    install -d -m 0750 -o root -g vma /etc/vma
    [ -e /etc/vma/vma.json ] || { echo '{}' > /etc/vma/vma.json; chgrp vma /etc/vma/vma.json; chmod 0640 /etc/vma/vma.json; }
    install -m 0644 "$here/systemd/vma-api.service" "$units/vma-api.service"
    systemctl daemon-reload
    systemctl enable vma-api.service
    systemctl restart vma-api.service
    echo "vma-api.service installed (configuration: /etc/vma/vma.json, docs/vma.md)"
    ;;
*)
    die "usage: install.sh oma [--database-url URL] | install.sh vma"
    ;;
esac
