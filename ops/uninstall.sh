#!/bin/sh
# Remove vigil's units and venv. Data (/etc/vigil, /var/lib/vigil: database, JetStream, credentials)
# is kept unless --purge; camera media is never touched.
set -eu
PURGE=no
[ "${1:-}" = "--purge" ] && PURGE=yes
[ "$(id -u)" = 0 ] || { echo "uninstall.sh must run as root" >&2; exit 1; }
# Stop first and wait for every unit to be down (a glob in `disable --now` can fail on one unit
# and return before the others have stopped), then disable what is installed.
systemctl stop vigil.target 'vigil-*' 2>/dev/null || true
for unit in $(systemctl list-unit-files --no-legend 'vigil*' 2>/dev/null | awk '{print $1}'); do
    systemctl disable -q "$unit" 2>/dev/null || true
done
rm -f /etc/systemd/system/vigil.target /etc/systemd/system/vigil-*.service
rm -rf /etc/systemd/system/vigil.target.wants
rm -f /etc/systemd/system/vigil-.service.d/cluster.conf
rm -f /etc/polkit-1/rules.d/50-vigil-web.rules
systemctl daemon-reload
rm -rf /opt/vigil
if [ "$PURGE" = yes ]; then
    rm -rf /etc/vigil /var/lib/vigil
    for u in vigil vigil-nats vigil-postgres vigil-watcher vigil-detector vigil-aggregator vigil-recorder vigil-gpu-stats vigil-health vigil-retention vigil-analyzer vigil-notifier vigil-web; do
        userdel "$u" 2>/dev/null || true
    done
    echo "vigil removed, with its configuration, database and JetStream store"
else
    echo "vigil removed; kept /etc/vigil and /var/lib/vigil (run with --purge to delete them)"
fi
