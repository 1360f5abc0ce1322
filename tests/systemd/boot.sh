#!/bin/sh
# Boot a real systemd as PID 1 of private PID, mount and network namespaces, on a copy-on-write root.
# Run as: unshare --pid --fork --mount --net tests/systemd/boot.sh DIR
# NEVER boot systemd on the host's own root: systemd-tmpfiles would empty the host's /tmp and the
# machine's enabled services would start. The overlay keeps every write (and /tmp, /run) private.
set -e
DIR=$1
mount --make-rprivate /
mount -t tmpfs tmpfs "$DIR"
mkdir "$DIR/upper" "$DIR/work" "$DIR/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$DIR/upper,workdir=$DIR/work" "$DIR/root"
mount --rbind /dev "$DIR/root/dev"
mount --rbind /sys "$DIR/root/sys"
mount -t proc proc "$DIR/root/proc"
mount -t tmpfs tmpfs "$DIR/root/run"
mount -t tmpfs tmpfs "$DIR/root/tmp"
ip link set lo up   # our own loopback: the appliance's ports (4222, 5432) never meet the host's
mkdir -p "$DIR/root/run/systemd/system"
cat > "$DIR/root/run/systemd/system/vigil-test.target" <<'EOT'
[Unit]
Description=vigil test boot: journald only; the test installs and starts vigil
Wants=systemd-journald.socket systemd-journald.service
EOT
exec chroot "$DIR/root" /lib/systemd/systemd --system --unit=vigil-test.target
