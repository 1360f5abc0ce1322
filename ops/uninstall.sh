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
# The FTP server install.sh --ftp set up: stopped, its vigil configuration gone (the one it had before
# put back); the camera accounts can no longer log in (they were only in /etc/vigil/ftp-users).
if head -1 /etc/vsftpd.conf 2>/dev/null | grep -q '^# vigil camera uploads'; then
    systemctl disable -q --now vsftpd.service 2>/dev/null || true
    if [ -f /etc/vsftpd.conf.before-vigil ]; then mv /etc/vsftpd.conf.before-vigil /etc/vsftpd.conf; else rm -f /etc/vsftpd.conf; fi
    rm -f /etc/pam.d/vigil-ftp /etc/systemd/system/vsftpd.service.d/vigil.conf
    echo "vsftpd stopped and disabled, its vigil configuration removed"
fi
systemctl daemon-reload
rm -rf /opt/vigil
[ "$(readlink /usr/local/bin/vigil 2>/dev/null)" != /opt/vigil/venv/bin/vigil ] || rm -f /usr/local/bin/vigil
if [ "$PURGE" = yes ]; then
    rm -rf /etc/vigil /var/lib/vigil
    for u in vigil vigil-nats vigil-postgres vigil-watcher vigil-detector vigil-aggregator vigil-recorder vigil-gpu-stats vigil-health vigil-retention vigil-analyzer vigil-notifier vigil-web; do
        userdel "$u" 2>/dev/null || true
    done
    for u in $(getent passwd | cut -d: -f1 | grep '^vigil-cam-'); do userdel "$u" 2>/dev/null || true; done  # camera FTP accounts
    echo "vigil removed, with its configuration, database and JetStream store"
else
    echo "vigil removed; kept /etc/vigil and /var/lib/vigil (run with --purge to delete them)"
fi
