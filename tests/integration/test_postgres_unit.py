"""`vigil-postgres`, the bundled database's systemd service, run as systemd would run it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import psycopg
import pytest

from services.cli.stack import free_port
from tests.support import REPO


def test_password_from_credential_ready_reload_and_stop(tmp_path):
    """initdb takes the password from $CREDENTIALS_DIRECTORY, READY=1 once connectable, scram on TCP,
    SIGHUP (systemctl reload) keeps it running, SIGTERM stops it cleanly with exit 0."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db-password").write_text("s3cret-from-credential\n")
    (creds / "db-password").chmod(0o600)
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(90)
    port = free_port()
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds), "NOTIFY_SOCKET": str(notify)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from services.cli.stack import postgres_unit_main; raise SystemExit(postgres_unit_main())",
            str(tmp_path / "data"),
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert sock.recv(4096).startswith(b"READY=1")
        dsn = f"postgresql://vigil@127.0.0.1:{port}/vigil"
        with psycopg.connect(dsn, password="s3cret-from-credential") as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == "vigil"
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(dsn, password="wrong").close()
        proc.send_signal(signal.SIGHUP)
        with psycopg.connect(dsn, password="s3cret-from-credential", connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone()[0] == 1
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert not any(p.name.startswith("vigil-initdb-") for p in (tmp_path / "data").parent.iterdir())
