"""vigil under a real systemd: installed the way ops/install.sh installs it, driven with systemctl.

Boots systemd as PID 1 of private namespaces on a copy-on-write root (tests/systemd/boot.sh), never on
the host's own root. Skipped only where that is impossible (not root, namespaces forbidden).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, find_models_dir, photo_bytes, wait_until
from tests.systemd.harness import BootedSystemd, can_boot

reason = can_boot()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"cannot boot systemd here: {reason}")

SERVICES = (
    "vigil-nats",
    "vigil-postgresql",
    "vigil-watcher",
    "vigil-aggregator",
    "vigil-recorder",
    "vigil-detector@cpu",
    "vigil-gpu-stats",
    "vigil-health",
    "vigil-retention",
    "vigil-analyzer",
    "vigil-notifier",
    "vigil-web",
)
# vsftpd's packages, downloaded (never installed on this host) by tests/system-packages.sh
FTP_DEBS = sorted(Path("/var/cache/vigil-tests/debs").glob("*.deb")) if os.path.isfile("/usr/bin/apt-get") else []
WEB_PASSWORD = "appliance-web-pw"
MEDIA = "/srv/vigil/media"
HOOK_PORT = 8099
HOOK_SECRET = "door-hook-s3cret"
HOOK_SERVER = f"""
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open("/var/tmp/hook.jsonl", "a") as f:
            f.write(json.dumps({{"auth": self.headers.get("Authorization"), "body": body.decode()}}) + "\\n")
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
http.server.HTTPServer(("127.0.0.1", {HOOK_PORT}), H).serve_forever()
"""


class Appliance:
    def __init__(self, sd: BootedSystemd) -> None:
        self.sd = sd

    def sql(self, query: str) -> list[list[str]]:
        from services.cli.stack import Postgres

        password = (self.sd.root / "etc/vigil/credentials/db-password").read_text().strip()
        out = self.sd.run_on_its_network(
            str(Postgres.bindir() / "psql"), f"postgresql://vigil:{password}@127.0.0.1:5432/vigil", "-tAF|", "-c", query
        )
        if out.returncode != 0:
            return []
        return [line.split("|") for line in out.stdout.strip().splitlines() if line]

    def unacked(self) -> dict:
        """{consumer: (pending, ack pending)}, asked over the appliance's own loopback with its password."""
        password = (self.sd.root / "etc/vigil/credentials/nats-password").read_text().strip()
        code = (
            "import asyncio, json, nats\nfrom proto.topology import CONSUMERS\n"
            "async def m():\n"
            f"    nc = await nats.connect('nats://127.0.0.1:4222', user='vigil', password={password!r})\n"
            "    js = nc.jetstream(); out = {}\n"
            "    for c in CONSUMERS:\n"
            "        i = await js.consumer_info(c.stream, c.durable); out[c.durable] = [i.num_pending, i.num_ack_pending]\n"
            "    await nc.close(); print(json.dumps(out))\n"
            "asyncio.run(m())\n"
        )
        out = self.sd.run_on_its_network(sys.executable, "-c", code)
        return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-500:]}

    def drop(self, camera: str, name: str, data: bytes) -> None:
        """Upload a file the way a camera does, from inside the booted system (hidden name, then rename)."""
        import base64

        folder = f"{MEDIA}/{camera}"
        self.sd.run(
            "sh",
            "-c",
            f"mkdir -p {folder} && base64 -d > {folder}/.{name}.tmp && mv {folder}/.{name}.tmp {folder}/{name}",
            input=base64.b64encode(data).decode(),
        )

    def state(self, unit: str) -> dict[str, str]:
        return self.sd.show(unit, "ActiveState", "SubState", "NRestarts", "MainPID", "ExecMainStatus", "Result")

    def wait_active(self, unit: str, timeout: float = 90) -> dict:
        try:
            return wait_until(
                lambda: (s := self.state(unit))["ActiveState"] == "active" and s, timeout=timeout, what=f"{unit} active"
            )
        except AssertionError as exc:
            journal = self.sd.run("journalctl", "-u", unit, "-n", "40", "--no-pager", check=False).stdout
            raise AssertionError(f"{exc}\n{journal[-4000:]}") from None

    def rows(self) -> int:
        r = self.sql("SELECT count(*) FROM detections")
        return int(r[0][0]) if r else 0


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    sd = BootedSystemd(tmp_path_factory.mktemp("systemd") / "root").boot()
    try:
        root = sd.root
        sd.run("chmod", "o+rx", "/root")  # inside the overlay only: CI's Python lives under /root/.pyenv
        ftp = []
        if FTP_DEBS:  # downloaded by tests/system-packages.sh: apt inside the booted system installs them offline
            (root / "var/cache/apt/archives").mkdir(parents=True, exist_ok=True)
            for deb in FTP_DEBS:
                shutil.copy(deb, root / "var/cache/apt/archives" / deb.name)
            ftp = ["--ftp", "--ftp-ports", "40100-40115"]
        result = sd.run(str(REPO / "ops" / "install.sh"), "--venv", sys.prefix, "--no-start", *ftp, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "web UI login: user admin, password " in result.stdout  # shown once, to whoever installs
        assert (root / "etc/vigil/credentials/web-password").read_text().startswith("$2b$")  # the hash, never it
        # a known password for the tests below (what `vigil web password` does)
        from services.web.auth import hash_password

        sd.run("sh", "-c", "umask 077; cat > /etc/vigil/credentials/web-password", input=hash_password(WEB_PASSWORD))
        # Test-only drop-ins, for this sandbox rather than for vigil:
        # - CI's Python lives under /root/.pyenv, which ProtectHome=yes would hide (appliances use /usr/bin/python3);
        # - systemd 252 booted inside these namespaces does not deliver LoadCredential= (the directory it
        #   names in $CREDENTIALS_DIRECTORY does not exist in the service's mount namespace). So each unit
        #   gets what LoadCredential= would give it - its own credentials only, owned by its own user,
        #   mode 0400 - bind-mounted where CREDENTIALS_DIRECTORY points. Every unit runs as its real user;
        # - a short detector watchdog so the hang test takes seconds.
        # (Drop-ins apply in file-name order across the prefix and unit directories: zz- comes last.)
        # a notify secret, as an operator puts it: one file in /etc/vigil/credentials/notify/
        sd.run("sh", "-c", f"umask 077; printf %s {HOOK_SECRET} > /etc/vigil/credentials/notify/hook")
        (root / "etc/systemd/system/vigil-.service.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/systemd/system/vigil-.service.d/test.conf").write_text(
            "[Service]\nProtectHome=read-only\nLoadCredential=\nEnvironment=CREDENTIALS_DIRECTORY=/run/vigil-test-credentials\n"
        )
        for unit_file in sorted((root / "etc/systemd/system").glob("vigil-*.service")):
            text = unit_file.read_text()
            owner = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("User="))
            store = f"/var/lib/vigil-test-creds/{unit_file.name}"
            script = [f"install -d -m 0500 -o {owner} -g {owner} {store}"]
            for line in text.splitlines():
                if line.startswith("LoadCredential="):
                    name, src = line.split("=", 1)[1].split(":", 1)
                    # a folder is loaded file by file as NAME_FILE (the notifier's notify/ secrets)
                    script.append(
                        f'if [ -d {src} ]; then for f in {src}/*; do [ -f "$f" ] || continue;'
                        f' install -m 0400 -o {owner} -g {owner} "$f" {store}/{name}_$(basename "$f"); done;'
                        f" else install -m 0400 -o {owner} -g {owner} {src} {store}/{name}; fi"
                    )
            sd.run("sh", "-c", " && ".join(script))
            (root / f"etc/systemd/system/{unit_file.name}.d").mkdir(parents=True, exist_ok=True)
            (root / f"etc/systemd/system/{unit_file.name}.d/test-credentials.conf").write_text(
                f"[Service]\nBindReadOnlyPaths={store}:/run/vigil-test-credentials\n"
            )
        (root / "etc/systemd/system/vigil-detector@.service.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/systemd/system/vigil-detector@.service.d/zz-test-watchdog.conf").write_text(
            "[Service]\nWatchdogSec=6\nRestartSec=1\n"
        )
        models = find_models_dir()
        config = (root / "etc/vigil/vigil.toml").read_text()
        config = (
            config.replace("settle_seconds = 2.0", "settle_seconds = 0.5")
            .replace("idle_seconds = 30.0", "idle_seconds = 3.0")
            .replace("incomplete_seconds = 120.0", "incomplete_seconds = 8.0")
        )
        if models is None:
            config = config.replace('model = "yolox-nano"', 'model = "none"')
        else:
            config = config.replace('models_dir = "/var/lib/vigil/models"', f'models_dir = "{models}"')
        config += (
            '\n[[notify.rules]]\nname = "door"\ncameras = ["front_door"]\nlabels = ["person"]\n'
            f'urls = ["json://vigil:{{secret:hook}}@127.0.0.1:{HOOK_PORT}/hook"]\n'
        )
        (root / "etc/vigil/vigil.toml").write_text(config)
        # a JSON webhook target inside the appliance (a transient unit on its loopback)
        sd.run(
            "systemd-run",
            "--unit=vigil-test-hook",
            "-p",
            "Environment=PYTHONDONTWRITEBYTECODE=1",
            sys.executable,
            "-c",
            HOOK_SERVER,
        )
        sd.run("systemctl", "daemon-reload")
        sd.run(
            "systemctl", "start", "dbus.socket", check=False
        )  # health asks systemd over the system bus, as a real box has it
        sd.run("systemctl", "start", "--no-block", "vigil.target")
        app = Appliance(sd)
        for unit in SERVICES:
            app.wait_active(unit)
        yield app
    finally:
        # The whole journal of the run, for whoever reads a failure.
        journal = sd.run("journalctl", "-u", "vigil-*", "--no-pager", "-o", "short-precise", check=False).stdout
        (tmp_path_factory.getbasetemp() / "systemd-journal.txt").write_text(journal)
        sd.shutdown()


def test_every_unit_becomes_active_and_photos_become_rows(appliance):
    """`systemctl start vigil.target` brings every unit up (READY=1 received); photos land in PostgreSQL."""
    for unit in SERVICES:
        assert appliance.state(unit)["ActiveState"] == "active", unit
    appliance.drop("front_door", "astronaut.jpg", photo_bytes("astronaut"))
    appliance.drop("backyard", "chelsea.jpg", photo_bytes("chelsea"))
    rows = wait_until(
        lambda: (r := appliance.sql("SELECT path, labels FROM detections ORDER BY path")) and len(r) == 2 and r,
        what="two rows",
    )
    if find_models_dir() is not None:
        assert "cat" in rows[0][1] and "person" in rows[1][1]
        # each event judged by vigil-analyzer and recorded (the person at the door above the cat)
        judged = wait_until(
            lambda: (
                (r := appliance.sql("SELECT camera, risk_level, risk_score FROM event_analysis ORDER BY camera"))
                and len(r) == 2
                and r
            ),
            what="two analyses",
        )
        assert judged[0][0] == "backyard" and judged[1][0] == "front_door" and int(judged[1][2]) > int(judged[0][2]), (
            judged
        )


def test_a_person_at_the_door_is_notified_with_the_secret_from_its_credential(appliance):
    """vigil-notifier (its own user, its secret through LoadCredential=notify:...) delivers the rule
    `door` for the astronaut's event to a webhook; the secret reaches the target and no log line."""
    import base64

    if find_models_dir() is None:
        pytest.skip("no model: no person, no event to notify")
    appliance.drop("front_door", "astronaut-2.jpg", photo_bytes("astronaut"))
    got = wait_until(
        lambda: (r := appliance.sd.run("cat", "/var/tmp/hook.jsonl", check=False)).returncode == 0 and r.stdout.strip(),
        timeout=90,
        what="a notification at the webhook",
    )
    first = json.loads(got.splitlines()[0])
    body = json.loads(first["body"])
    assert body["title"].endswith("risk on front_door") and "Person" in body["message"], body
    assert base64.b64decode(first["auth"].split()[1]).decode() == f"vigil:{HOOK_SECRET}"
    journal = appliance.sd.run("journalctl", "-u", "vigil-notifier", "--no-pager", "-o", "cat", check=False).stdout
    assert '"rule fired"' in journal or "rule fired" in journal
    assert HOOK_SECRET not in journal


WEB_CLIENT = """
import http.cookiejar, re, sys, urllib.parse, urllib.request
jar = http.cookiejar.CookieJar()
op = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
base = "http://127.0.0.1:8470"
page = op.open(base + "/login").read().decode()
token = re.search(r'name="login_csrf" value="([^"]+)"', page).group(1)
form = {"login_csrf": token, "username": "admin", "password": sys.argv[1], "next": "/services"}
page = op.open(base + "/login", urllib.parse.urlencode(form).encode()).read().decode()
csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
for unit, action in zip(sys.argv[2::2], sys.argv[3::2]):
    done = op.open(base + f"/services/{unit}/{action}", urllib.parse.urlencode({"csrf": csrf}).encode()).read().decode()
    print(re.search(r'class="flash[^"]*"[^>]*>([^<]*)<', done).group(1))
"""


def test_the_services_page_stops_and_starts_units_through_polkit(appliance):
    """The web UI's user asks systemd over D-Bus; the installer's polkit rule allows the vigil service
    units (and those verbs) only. The page's verdict follows (health sees the unit inactive)."""
    web = appliance.sd.run_on_its_network(
        sys.executable, "-c", WEB_CLIENT, WEB_PASSWORD, "vigil-gpu-stats.service", "stop", "vigil-nats.service", "stop"
    )
    assert web.returncode == 0, web.stdout + web.stderr
    lines = web.stdout.strip().splitlines()
    assert lines[0] == "stop vigil-gpu-stats.service: ok", lines
    assert "is not a vigil service unit" in lines[1], lines
    assert appliance.state("vigil-gpu-stats")["ActiveState"] == "inactive"
    assert appliance.state("vigil-nats")["ActiveState"] == "active"
    # polkit itself: the same user may not stop what is not vigil's, whatever the web code would ask
    denied = appliance.sd.run(
        "setpriv", "--reuid=vigil-web", "--regid=vigil-web", "--init-groups",
        "systemctl", "stop", "systemd-journald.service", check=False,
    )  # fmt: skip
    assert denied.returncode != 0 and appliance.state("systemd-journald")["ActiveState"] == "active", denied.stderr
    web = appliance.sd.run_on_its_network(
        sys.executable, "-c", WEB_CLIENT, WEB_PASSWORD, "vigil-gpu-stats.service", "start"
    )
    assert web.stdout.strip() == "start vigil-gpu-stats.service: ok", web.stdout + web.stderr
    appliance.wait_active("vigil-gpu-stats")
    audit = appliance.sql("SELECT actor, action, target, result FROM audit_log WHERE via = 'web' ORDER BY id")
    assert ["admin", "stop", "vigil-gpu-stats.service", "ok"] in audit, audit
    assert ["admin", "start", "vigil-gpu-stats.service", "ok"] in audit, audit


def test_units_verify(appliance):
    out = appliance.sd.run(
        "systemd-analyze", "verify", "vigil.target", *(f"{u}.service" for u in SERVICES), check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_each_unit_sees_only_its_own_state(appliance):
    """One system user for every unit: without InaccessiblePaths= the detector (which decodes hostile
    files) could rewrite pg_hba.conf, the JetStream store, the watcher's ledger, or read the route
    password in nats.conf and every credential. Checked inside each running unit's mount namespace
    (a hidden file is an empty node there, a hidden folder an empty one: `test -s` sees neither)."""
    private = {
        "vigil-postgresql": "/var/lib/vigil/postgresql/PG_VERSION",
        "vigil-nats": "/etc/vigil/nats.conf",
        "vigil-watcher": "/var/lib/vigil/watcher/ledger.sqlite3",
    }
    for path in [*private.values(), "/etc/vigil/credentials/db-password"]:
        assert appliance.sd.run("test", "-s", path, check=False).returncode == 0, (
            f"{path} missing on the appliance itself"
        )
    for unit in SERVICES:
        pid = appliance.state(unit)["MainPID"]
        probe = appliance.sd.run("nsenter", "-t", pid, "-m", "-r", "test", "-e", "/etc/vigil/vigil.toml", check=False)
        assert probe.returncode == 0, (unit, probe.stderr)  # the probe itself works in that namespace
        seen = {
            path
            for path in [*private.values(), "/etc/vigil/credentials/db-password"]
            if appliance.sd.run("nsenter", "-t", pid, "-m", "-r", "test", "-s", path, check=False).returncode == 0
        }
        assert seen == ({private[unit]} if unit in private else set()), unit
    # and not around the fence: with one user for every unit, /proc/<pid>/root of another unit led to
    # its files (the review appended to pg_hba.conf that way); with a user per unit the kernel says no
    pg = appliance.state("vigil-postgresql")["MainPID"]

    def read_as(user: str) -> int:
        return appliance.sd.run(
            "setpriv",
            f"--reuid={user}",
            f"--regid={user}",
            "--init-groups",
            "cat",
            f"/proc/{pg}/root/var/lib/vigil/postgresql/PG_VERSION",
            check=False,
        ).returncode

    assert read_as("vigil-postgres") == 0  # the probe works
    for other in ("vigil-detector", "vigil-watcher", "vigil-recorder", "vigil-nats", "vigil"):
        assert read_as(other) != 0, other


def test_every_unit_runs_as_its_own_user(appliance):
    users = {}
    for unit in SERVICES:
        pid = appliance.state(unit)["MainPID"]
        uid = appliance.sd.run("stat", "-c", "%U", f"/proc/{pid}").stdout.strip()
        users[unit] = uid
    assert len(set(users.values())) == len(users) and all(u.startswith("vigil-") for u in users.values()), users
    conf = appliance.sd.run("stat", "-c", "%U:%G %a", "/etc/vigil/nats.conf").stdout.strip()
    assert conf == "root:vigil-nats 640"  # the route password: nats-server alone


def test_services_use_their_own_database_roles(appliance):
    """The installer turns per_service_roles on; vigil-postgresql made the roles at its start, and the
    recorder writes as vigil_recorder (services/database.py), not as the owner."""
    assert "per_service_roles = true" in (appliance.sd.root / "etc/vigil/vigil.toml").read_text()
    roles = {r[0] for r in appliance.sql("SELECT rolname FROM pg_roles WHERE rolname LIKE 'vigil\\_%'")}
    assert roles >= {"vigil_recorder", "vigil_retention", "vigil_health"}, roles
    users = wait_until(
        lambda: (
            {r[0] for r in appliance.sql("SELECT usename FROM pg_stat_activity WHERE usename IS NOT NULL")}
            & {"vigil_recorder"}
        ),
        what="the recorder connected as its own role",
    )
    assert users == {"vigil_recorder"}


def test_a_file_vigil_cannot_read_is_rejected_visibly_alerted_and_taken_once_fixed(appliance):
    """The watcher runs as vigil-watcher here, not root: a file an FTP server wrote with umask 077 (root's,
    0600) is a rejection naming its owner and mode, health raises camera_unreadable for its camera, and
    a chmod (no new version of the file) makes it detected and the alert resolved. Hostile names beside
    it are refused one by one, and the watcher goes on."""
    import base64

    photo = base64.b64encode(photo_bytes("coffee", scale=0.3)).decode()
    folder = "/srv/vigil/media/backyard"
    appliance.sd.run(
        "sh", "-c", f"mkdir -p {folder} && umask 077 && base64 -d > /var/tmp/locked.jpg && mv /var/tmp/locked.jpg {folder}/locked.jpg",
        input=photo,
    )  # fmt: skip
    for name in (b"bad\x01name.jpg", b"line\nbreak.jpg", b"caf\xe9.jpg"):  # a control character, a newline, not UTF-8
        code = f"import os; os.close(os.open({folder.encode() + b'/' + name!r}, os.O_CREAT | os.O_WRONLY, 0o644))"
        appliance.sd.run(sys.executable, "-c", code)

    def rejections():
        rows = appliance.sql("SELECT path, reason FROM dead_letters WHERE stage = 'watcher'")
        return dict(rows) if len(rows) >= 4 else None

    reasons = wait_until(rejections, what="four rejections recorded", timeout=60)
    assert reasons["backyard/locked.jpg"] == "rejected by the watcher: not readable by vigil (owner root, mode 0600)", (
        reasons
    )
    assert any("\\x01" in p for p in reasons) and any("\\xe9" in p for p in reasons), reasons  # escaped, recorded
    alert = wait_until(
        lambda: appliance.sql("SELECT message FROM alerts WHERE kind = 'camera_unreadable' AND camera = 'backyard'"),
        what="camera_unreadable raised",
    )
    assert "backyard/locked.jpg: not readable by vigil (owner root, mode 0600)" in alert[0][0]
    assert appliance.state("vigil-watcher")["ActiveState"] == "active"
    appliance.sd.run("chmod", "0644", "/srv/vigil/media/backyard/locked.jpg")
    wait_until(
        lambda: appliance.sql("SELECT 1 FROM detections WHERE path = 'backyard/locked.jpg'"),
        what="detected once readable",
    )
    wait_until(
        lambda: appliance.sql(
            "SELECT 1 FROM alerts WHERE kind = 'camera_unreadable' AND camera = 'backyard' AND state = 'resolved'"
        ),
        what="camera_unreadable resolved",
    )
    # written in place with umask 077, as vsftpd's default does: the installer's default ACL on the media
    # root (services/runtime/acl.py) keeps it readable for group vigil, so it is simply detected
    appliance.sd.run("sh", "-c", f"umask 077 && base64 -d > {folder}/umask077.jpg", input=photo)
    mode = appliance.sd.run("stat", "-c", "%a", f"{folder}/umask077.jpg").stdout.strip()
    wait_until(
        lambda: appliance.sql("SELECT 1 FROM detections WHERE path = 'backyard/umask077.jpg'"),
        what=f"umask077.jpg ({mode})",
    )


def test_journal_has_structured_fields(appliance):
    """Log records reach the journal as fields: `journalctl -u vigil-detector@cpu CAMERA=front_door` works."""
    good = photo_bytes("coffee")
    appliance.drop("front_door", "corrupt.jpg", good[:20] + b"\x00" * 100 + b"\xff\xd9")
    entries = wait_until(
        lambda: [
            json.loads(line)
            for line in appliance.sd.run(
                "journalctl", "-u", "vigil-detector@cpu", "CAMERA=front_door", "-o", "json", "--no-pager", check=False
            ).stdout.splitlines()
        ],
        what="a detector journal entry for front_door",
    )
    entry = next(e for e in entries if e.get("MESSAGE", "").startswith("dead-lettered"))
    assert entry["PRIORITY"] == "4" and entry["SYSLOG_IDENTIFIER"] == "vigil-detector" and entry["STAGE"] == "detector"
    assert (entry["FILE_ID"] and "corrupt" in entry["REASON"]) or "decode" in entry["REASON"]


def ftp_plan(appliance, plan: list[dict]) -> dict:
    """Run tests/systemd/ftp_camera.py with PLAN on the appliance's loopback: {step name: result}."""
    path = appliance.sd.workdir.parent / "ftp-plan.json"
    path.write_text(json.dumps(plan))
    out = appliance.sd.run_on_its_network(
        sys.executable, str(REPO / "tests/systemd/ftp_camera.py"), str(path), timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def vigil_cli(appliance, *args: str) -> dict:
    out = appliance.sd.run(f"{sys.prefix}/bin/vigil", *args, "--json", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(
    not FTP_DEBS, reason="vsftpd's packages not downloaded (tests/system-packages.sh needs root and apt)"
)
def test_cameras_upload_over_ftp_as_cameras_do_and_only_into_their_own_folder(appliance):
    """`install.sh --ftp` set up vsftpd; `vigil camera add front_door --ftp` makes the account. A camera
    client (ftplib and curl, passive, throttled to 16 KB/s) uploads with a temporary name then RNFR/RNTO,
    with a direct STOR of a growing file, four files at once, and with a connection dropped mid-file
    that is resumed with APPE; every whole file is recorded once, and the one never resumed is rejected
    visibly. Another camera's account sees none of it; anonymous and unlisted users are refused."""
    import hashlib

    from services.watcher.files import file_id

    sd = appliance.sd
    assert sd.show("vsftpd.service", "ActiveState")["ActiveState"] == "active"
    door = vigil_cli(appliance, "camera", "add", "front_door", "--ftp")["ftp"]
    yard = vigil_cli(appliance, "camera", "add", "back_yard", "--ftp")["ftp"]
    assert door["user"] == "vigil-cam-front_door" and door["remote_folder"] == "/upload"
    assert door["port"] == 21 and door["passive_ports"] == "40100-40115" and "plain" in door["tls"]
    assert (sd.root / "etc/vigil/credentials/ftp/front_door").read_text().strip() == door["password"]
    assert door["password"] not in (sd.root / "etc/vigil/vigil.toml").read_text()
    shell = sd.run("getent", "passwd", "vigil-cam-front_door").stdout.strip().split(":")
    assert shell[5] == f"{MEDIA}/front_door" and shell[6] == "/usr/sbin/nologin"

    def photo(i: int) -> bytes:  # about 20 KB: a second or two at 16 KB/s
        return photo_bytes(("astronaut", "chelsea", "coffee", "camera")[i % 4], quality=70 + i, scale=0.3)

    cam = {"user": door["user"], "password": door["password"]}
    files = {f"upload/p{i}.jpg": photo(i) for i in range(8)}
    files["upload/2026-12-02/curl.jpg"] = photo(9)
    results = ftp_plan(appliance, [
        {"rename": {**cam, "do": "rename", "path": "upload/p0.jpg", "hex": files["upload/p0.jpg"].hex()},
         "stor": {**cam, "do": "stor", "path": "upload/p1.jpg", "hex": files["upload/p1.jpg"].hex()},
         "dropped": {**cam, "do": "drop", "path": "upload/p2.jpg", "hex": files["upload/p2.jpg"].hex()},
         "abandoned": {**cam, "do": "drop", "path": "upload/p3.jpg", "hex": files["upload/p3.jpg"].hex()},
         **{f"parallel{i}": {**cam, "do": "stor", "path": f"upload/p{i}.jpg", "hex": files[f"upload/p{i}.jpg"].hex()}
            for i in (4, 5, 6, 7)}},
    ])  # fmt: skip
    assert all("error" not in r for r in results.values()), results
    time.sleep(4)  # the dropped uploads have settled (0.5 s): still, neither may be detected
    assert (
        appliance.sql(
            "SELECT path FROM detections WHERE path IN ('front_door/upload/p2.jpg', 'front_door/upload/p3.jpg')"
        )
        == []
    )
    resumed = ftp_plan(
        appliance, [{"appe": {**cam, "do": "appe", "path": "upload/p2.jpg", "hex": files["upload/p2.jpg"].hex()}}]
    )
    assert resumed["appe"]["had"] == results["dropped"]["sent"], resumed
    # curl: a date folder made by the camera (--ftp-create-dirs), passive, throttled
    (sd.root / "var/tmp/curl.jpg").write_bytes(files["upload/2026-12-02/curl.jpg"])
    out = sd.run_on_its_network(
        "curl", "-sS", "--ftp-pasv", "--ftp-create-dirs", "--limit-rate", "16k", "-T", str(sd.root / "var/tmp/curl.jpg"),
        "--user", f"{cam['user']}:{cam['password']}", "ftp://127.0.0.1/upload/2026-12-02/curl.jpg",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    whole = {k: v for k, v in files.items() if k != "upload/p3.jpg"}

    def recorded():
        rows = appliance.sql("SELECT path, file_id FROM detections WHERE path LIKE 'front_door/upload/%'")
        return rows if len(rows) >= len(whole) else None

    rows = wait_until(recorded, timeout=90, what="every whole FTP upload recorded")
    assert sorted(map(tuple, rows)) == sorted(
        (f"front_door/{k}", file_id("front_door", f"front_door/{k}", hashlib.sha256(v).hexdigest()))
        for k, v in whole.items()
    )  # each once, and each the whole file
    letter = wait_until(
        lambda: appliance.sql("SELECT reason FROM dead_letters WHERE path = 'front_door/upload/p3.jpg'"),
        timeout=60, what="the upload never resumed rejected",
    )  # fmt: skip
    assert letter[0][0].startswith("rejected by the watcher: truncated upload: JPEG without its end marker (EOI)")
    stat = sd.run("stat", "-c", "%U %G %a", f"{MEDIA}/front_door/upload/p1.jpg").stdout.split()
    assert stat == ["vigil-cam-front_door", "vigil", "660"], stat  # umask 027, then the default ACL's group vigil rw

    # the other camera, anonymous, a system user, a wrong password, active mode: each refused
    other = {"user": yard["user"], "password": yard["password"]}
    seen = ftp_plan(appliance, [{
        "list_own": {**other, "do": "list", "path": "/"},
        "cwd_up": {**other, "do": "cwd", "path": "../front_door"},
        "cwd_abs": {**other, "do": "cwd", "path": f"{MEDIA}/front_door/upload"},
        "read": {**other, "do": "retr", "path": "../front_door/upload/p1.jpg"},
        "write": {**other, "do": "stor", "path": "../front_door/upload/evil.jpg", "hex": photo(1).hex()},
        "root_write": {**other, "do": "stor", "path": "/evil.jpg", "hex": photo(1).hex()},
        "read_own": {**cam, "do": "retr", "path": "upload/p1.jpg"},
        "anonymous": {"user": "anonymous", "password": "a@b.c", "do": "login"},
        "ftp": {"user": "ftp", "password": "ftp", "do": "login"},
        "vigil": {"user": "vigil-watcher", "password": "x", "do": "login"},
        "wrong": {**cam, "password": "not-it", "do": "login"},
        "active": {**cam, "do": "stor", "active": True, "path": "upload/active.jpg", "hex": photo(1).hex()},
    }])  # fmt: skip
    assert seen["list_own"].get("names") in (["/upload"], ["upload"]), seen["list_own"]
    for name in ("cwd_up", "cwd_abs"):  # chrooted: there is no front_door from there
        assert "error" in seen[name] or seen[name]["pwd"] == "/", seen[name]
    for name in ("read", "write", "root_write", "read_own", "anonymous", "ftp", "vigil", "wrong", "active"):
        assert "error" in seen[name], (name, seen[name])
    for name in ("anonymous", "ftp", "vigil", "wrong"):
        assert "530" in seen[name]["error"], (name, seen[name])
    listing = sd.run("find", f"{MEDIA}/front_door", f"{MEDIA}/back_yard", "-name", "*evil*").stdout
    assert listing == "", listing

    # a new password: the old one stops working at once
    rotated = vigil_cli(appliance, "camera", "rotate", "front_door")["ftp"]["password"]
    again = ftp_plan(appliance, [{"old": {**cam, "do": "login"}, "new": {**cam, "password": rotated, "do": "login"}}])
    assert "530" in again["old"]["error"] and again["new"] == {"login": "ok"}, again
    listed = {c["camera"]: c for c in vigil_cli(appliance, "camera", "list")}
    assert listed["front_door"]["ftp_account"] == "vigil-cam-front_door"
    gone = vigil_cli(appliance, "camera", "remove", "back_yard")
    assert gone["ftp_account_removed"] and gone["media_removed"]
    assert "530" in ftp_plan(appliance, [{"gone": {**other, "do": "login"}}])["gone"]["error"]
    # FTPS: the installer again (an upgrade in place keeps --ftp), now with --ftps: TLS is then required
    out = sd.run(str(REPO / "ops" / "install.sh"), "--venv", sys.prefix, "--no-start", "--ftps", check=False)
    assert out.returncode == 0 and "FTPS certificate" in out.stdout, out.stdout + out.stderr
    cam["password"] = rotated
    appliance.wait_active("vsftpd")  # Type=simple: "active" at its fork, listening a moment later
    wait_until(
        lambda: "refused" not in str(ftp_plan(appliance, [{"up": {**cam, "do": "login", "tls": True}}])),
        what="vsftpd listening again",
    )
    tls = ftp_plan(appliance, [{
        "plain": {**cam, "do": "login"},
        "tls": {**cam, "do": "stor", "tls": True, "path": "upload/tls.jpg", "hex": photo(11).hex()},
    }])  # fmt: skip
    assert "530" in tls["plain"]["error"] and "error" not in tls["tls"], tls
    (sd.root / "var/tmp/curl-tls.jpg").write_bytes(photo(12))
    out = sd.run_on_its_network(
        "curl", "-sS", "--ssl-reqd", "--insecure", "--ftp-pasv", "-T", str(sd.root / "var/tmp/curl-tls.jpg"),
        "--user", f"{cam['user']}:{cam['password']}", "ftp://127.0.0.1/upload/curl-tls.jpg",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    wait_until(
        lambda: len(appliance.sql("SELECT 1 FROM detections WHERE path IN ('front_door/upload/tls.jpg', 'front_door/upload/curl-tls.jpg')")) == 2,
        what="the FTPS uploads recorded",
    )  # fmt: skip
    # vsftpd's unit, hardened by the installer's drop-in
    score = sd.run("systemd-analyze", "security", "vsftpd.service", "--no-pager", check=False).stdout
    level = float(re.search(r"Overall exposure level for vsftpd.service: ([0-9.]+)", score).group(1))
    assert level <= 3.0, score[-3000:]  # 9.6 without the drop-in: Debian's unit is not hardened at all


def test_stop_drains_and_exits_zero(appliance):
    """`systemctl stop vigil-detector@cpu`: a clean drain, exit status 0, nothing left unacked."""
    appliance.sd.run("systemctl", "stop", "vigil-detector@cpu")
    state = appliance.state("vigil-detector@cpu")
    assert state["ActiveState"] == "inactive" and state["ExecMainStatus"] == "0" and state["Result"] == "success", state
    appliance.sd.run("systemctl", "start", "vigil-detector@cpu")
    appliance.wait_active("vigil-detector@cpu")
    assert wait_until(
        lambda: (u := appliance.unacked()) and all(v == [0, 0] for v in u.values()) and u, what="nothing unacked"
    )


def test_hung_detector_is_restarted_by_the_watchdog(appliance):
    """SIGSTOP the detector: systemd's watchdog fires, restarts it, and files dropped meanwhile are detected."""
    before = appliance.state("vigil-detector@cpu")
    appliance.sd.run("kill", "-STOP", before["MainPID"])
    start_rows = appliance.rows()
    appliance.drop("backyard", "while-hung.jpg", photo_bytes("coffee", scale=0.5))
    state = wait_until(
        lambda: (
            (s := appliance.state("vigil-detector@cpu"))["NRestarts"] != before["NRestarts"]
            and s["ActiveState"] == "active"
            and s
        ),
        timeout=60,
        what="watchdog restart",
    )
    assert state["MainPID"] != before["MainPID"]
    journal = appliance.sd.run("journalctl", "-u", "vigil-detector@cpu", "--no-pager", check=False).stdout
    assert "Watchdog timeout" in journal
    wait_until(lambda: appliance.rows() == start_rows + 1, what="the file dropped while hung")


@pytest.mark.parametrize(
    "unit",
    ["vigil-watcher", "vigil-aggregator", "vigil-recorder", "vigil-detector@cpu", "vigil-nats", "vigil-postgresql"],
)
def test_kill_9_is_restarted_and_loses_nothing(appliance, unit):
    before = appliance.state(unit)
    start_rows = appliance.rows()
    appliance.sd.run("kill", "-9", before["MainPID"])
    wait_until(
        lambda: (s := appliance.state(unit))["NRestarts"] != before["NRestarts"] and s["ActiveState"] == "active",
        timeout=60,
        what=f"{unit} restarted",
    )
    appliance.drop("front_door", f"after-kill-{unit}.jpg", photo_bytes("astronaut", scale=0.5, quality=70 + len(unit)))
    wait_until(lambda: appliance.rows() == start_rows + 1, timeout=60, what=f"a file after {unit} was killed")


def test_health_sees_units_and_restarts(appliance):
    """vigil-health reads systemd: every service has its unit, the kills above show as restarts, all healthy."""
    code = (
        "import json, urllib.request\n"
        "print(urllib.request.urlopen('http://127.0.0.1:9470/status', timeout=5).read().decode())\n"
    )

    def status():
        out = appliance.sd.run_on_its_network(sys.executable, "-c", code)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def unhealthy():
        d = status()
        return (
            [
                (s["service"], s["instance"], s["verdict"], s["reason"])
                for s in d["services"]
                if s["verdict"] != "healthy"
            ]
            if d
            else ["no answer"]
        )

    wait_until(
        lambda: not (last := unhealthy()) or print(last), timeout=60, what="every service healthy per vigil-health"
    )
    doc = status()
    assert doc["systemd"] == "available"
    units = {s["unit"]: s for s in doc["services"]}
    assert {"vigil-watcher.service", "vigil-detector@cpu.service", "vigil-health.service"} <= set(units)
    assert (
        units["vigil-watcher.service"]["restarts"] >= 1 and units["vigil-watcher.service"]["active_state"] == "active"
    )


def test_installer_again_upgrades_in_place(appliance):
    """A second run keeps the config and the credentials, and the pipeline keeps working."""
    root = appliance.sd.root
    secret = (root / "etc/vigil/credentials/nats-password").read_text()
    config = (root / "etc/vigil/vigil.toml").read_text()
    out = appliance.sd.run(str(REPO / "ops" / "install.sh"), "--venv", sys.prefix, check=False)  # with restart
    assert out.returncode == 0, out.stdout + out.stderr
    assert (root / "etc/vigil/credentials/nats-password").read_text() == secret
    assert (root / "etc/vigil/vigil.toml").read_text() == config and (root / "etc/vigil/vigil.toml.new").exists()
    for unit in SERVICES:
        appliance.wait_active(unit)
    start_rows = appliance.rows()
    appliance.drop("backyard", "after-upgrade.jpg", photo_bytes("chelsea", scale=0.5))
    wait_until(lambda: appliance.rows() == start_rows + 1, what="a file after the upgrade")


def test_uninstall_keeps_data_unless_purged(appliance):
    root = appliance.sd.root
    out = appliance.sd.run(str(REPO / "ops" / "uninstall.sh"), check=False)
    assert out.returncode == 0, out.stderr
    assert not (root / "etc/systemd/system/vigil-watcher.service").exists() and not (root / "opt/vigil").exists()
    assert (root / "etc/vigil/credentials/db-password").exists() and (root / "var/lib/vigil/postgresql").exists()
    assert appliance.state("vigil-watcher")["ActiveState"] == "inactive"
    out = appliance.sd.run(str(REPO / "ops" / "uninstall.sh"), "--purge", check=False)
    assert out.returncode == 0 and not (root / "etc/vigil").exists() and not (root / "var/lib/vigil").exists()


def test_installer_roles_for_a_cluster(appliance):
    """After the purge above: a cluster node's nats.conf (checked by nats-server -t), then a detector-only
    host that installs just its detectors and gpu-stats, pointed at the cluster."""
    root, sd = appliance.sd.root, appliance.sd
    creds = root / "var/tmp/creds-from-first-node"  # written through the booted system's own root
    creds.mkdir(parents=True)
    for name in (
        "nats-password",
        "db-password",
        "nats-watcher",
        "nats-detector",
        "nats-aggregator",
        "nats-recorder",
        "nats-gpu-stats",
        "nats-health",
        "nats-retention",
    ):
        (creds / name).write_text(f"secret-{name}\n")
        (creds / name).chmod(0o600)
    servers = "nats://10.9.0.1:4222,nats://10.9.0.2:4222,nats://10.9.0.3:4222"
    out = sd.run(
        str(REPO / "ops" / "install.sh"),
        "--venv",
        sys.prefix,
        "--no-start",
        "--node-name",
        "n1",
        "--listen",
        "10.9.0.1",
        "--cluster-routes",
        "nats-route://10.9.0.2:6222,nats-route://10.9.0.3:6222",
        "--servers",
        servers,
        "--replicas",
        "3",
        "--credentials-from",
        "/var/tmp/creds-from-first-node",
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    conf = (root / "etc/vigil/nats.conf").read_text()
    assert 'server_name: "n1"' in conf and 'listen: "10.9.0.1:4222"' in conf
    route_pw = (
        (root / "etc/vigil/credentials/nats-route").read_text().strip()
    )  # generated: not in the first node's copy
    assert (
        f'"nats-route://route:{route_pw}@10.9.0.3:6222"' in conf
        and f'authorization {{ user: "route", password: "{route_pw}" }}' in conf
    )
    test = sd.run(f"{sys.prefix}/bin/nats-server", "-t", "-c", "/etc/vigil/nats.conf", check=False)
    assert test.returncode == 0, test.stdout + test.stderr
    assert (
        root / "etc/vigil/credentials/nats-detector"
    ).read_text() == "secret-nats-detector\n"  # same users on every node
    toml = (root / "etc/vigil/vigil.toml").read_text()
    assert (
        'servers = ["nats://10.9.0.1:4222", "nats://10.9.0.2:4222", "nats://10.9.0.3:4222"]' in toml
        and "\nreplicas = 3 " in toml
    )
    assert "IPAddressAllow=any" in (root / "etc/systemd/system/vigil-.service.d/cluster.conf").read_text()
    assert sd.run(str(REPO / "ops" / "uninstall.sh"), "--purge", check=False).returncode == 0

    out = sd.run(
        str(REPO / "ops" / "install.sh"),
        "--venv",
        sys.prefix,
        "--no-start",
        "--role",
        "detector",
        "--detectors",
        "0,1",
        "--servers",
        servers,
        "--replicas",
        "3",
        "--credentials-from",
        "/var/tmp/creds-from-first-node",
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    units = sorted(p.name for p in (root / "etc/systemd/system").glob("vigil*") if p.suffix in (".service", ".target"))
    assert units == ["vigil-detector@.service", "vigil-gpu-stats.service", "vigil.target"], units
    assert (
        not (root / "etc/vigil/nats.conf").exists()
        and "Wants=" not in (root / "etc/systemd/system/vigil.target").read_text()
    )
    for unit in ("vigil-detector@0.service", "vigil-detector@1.service", "vigil-gpu-stats.service"):
        assert sd.run("systemctl", "is-enabled", unit, check=False).stdout.strip() == "enabled", unit
    assert 'servers = ["nats://10.9.0.1:4222"' in (root / "etc/vigil/vigil.toml").read_text()
    assert sorted(p.name for p in (root / "etc/vigil/credentials").iterdir()) == [
        "nats-detector",
        "nats-gpu-stats",
    ]  # never the admin's
    assert sd.run(str(REPO / "ops" / "uninstall.sh"), "--purge", check=False).returncode == 0

    # the other NATS nodes: the bus only
    out = sd.run(
        str(REPO / "ops" / "install.sh"),
        "--venv",
        sys.prefix,
        "--no-start",
        "--role",
        "bus",
        "--node-name",
        "n2",
        "--listen",
        "10.9.0.2",
        "--cluster-routes",
        "nats-route://10.9.0.1:6222,nats-route://10.9.0.3:6222",
        "--servers",
        servers,
        "--replicas",
        "3",
        "--credentials-from",
        "/var/tmp/creds-from-first-node",
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    units = sorted(p.name for p in (root / "etc/systemd/system").glob("vigil*") if p.suffix in (".service", ".target"))
    assert units == ["vigil-nats.service", "vigil.target"], units
    assert 'server_name: "n2"' in (root / "etc/vigil/nats.conf").read_text()
    assert "ROLE='bus'" in (root / "etc/vigil/install.env").read_text()
    again = sd.run(
        str(REPO / "ops" / "install.sh"), "--venv", sys.prefix, "--no-start", check=False
    )  # an upgrade without flags
    assert again.returncode == 0 and 'server_name: "n2"' in (root / "etc/vigil/nats.conf").read_text(), (
        again.stdout + again.stderr
    )
    assert sd.run(str(REPO / "ops" / "uninstall.sh"), "--purge", check=False).returncode == 0
