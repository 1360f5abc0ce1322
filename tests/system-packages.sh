#!/bin/sh
# What the test suite needs from Debian beyond Python: chromium and chromedriver (the web UI's browser
# test, driven by selenium) and polkitd (the appliance test starts and stops units from the Services
# page through the installer's polkit rule). Installed when missing, as root with apt-get; elsewhere
# those tests skip and say why.
# vsftpd is only downloaded (into $DEBS, never installed on this host, where nothing should serve FTP):
# the appliance test puts it in the booted system's apt cache, and `install.sh --ftp` installs it there.
DEBS=/var/cache/vigil-tests/debs
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! ls "$DEBS"/vsftpd_*.deb >/dev/null 2>&1; then
    mkdir -p "$DEBS/partial"
    get() { apt-get install -y -qq --download-only --no-install-recommends -o Dir::Cache::archives="$DEBS" vsftpd >/dev/null 2>&1; }
    get || { apt-get update -qq >/dev/null 2>&1 && get; } || echo "could not download vsftpd: the appliance's FTP tests skip"
fi
need=""
[ -x /usr/bin/chromium ] || need="$need chromium"
[ -x /usr/bin/chromedriver ] || need="$need chromium-driver"
[ -x /usr/lib/polkit-1/polkitd ] || need="$need polkitd"
[ -n "$need" ] || exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing$need from Debian (browser and appliance tests)"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $need >/dev/null; } ||
        echo "could not install$need: the tests that need them skip"
else
    echo "not installing$need (needs root and apt-get): the tests that need them skip"
fi
exit 0
