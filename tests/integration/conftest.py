"""Fixtures shared by the integration tests."""

from __future__ import annotations

import secrets

import pytest

from proto.topology import SERVICES
from services.cli.stack import NatsServer
from services.runtime.nats_auth import ADMIN_CREDENTIAL, ADMIN_USER, authorization_block, credential_name, user

WEB_API_TOKEN = "web-api-token-for-tests"


@pytest.fixture
def locked_nats(tmp_path):
    """A nats-server with vigil's authorization block: the admin and every service, each its own password
    (credential files in tmp_path/creds). Yields (server, creds dir, {user: password})."""
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    passwords = {}
    for name, cred in [(ADMIN_USER, ADMIN_CREDENTIAL)] + [(user(s), credential_name(s)) for s in SERVICES]:
        passwords[name] = secrets.token_hex(12)
        (creds / cred).write_text(passwords[name] + "\n")
        (creds / cred).chmod(0o600)
    # the web UI's login hash and API token (it starts with the rest)
    from services.web.auth import hash_password

    for cred, value in (("web-password", hash_password("web-test-password")), ("web-api-token", WEB_API_TOKEN)):
        (creds / cred).write_text(value + "\n")
        (creds / cred).chmod(0o600)
    server = NatsServer(
        tmp_path / "nats", log_file=tmp_path / "nats-server.log", extra_conf=authorization_block(passwords)
    ).start()
    yield server, creds, passwords
    server.kill()
