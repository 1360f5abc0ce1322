"""Least privilege on the bus: every service as its own NATS user, the pipeline works end to end with
no permission violation, and a service cannot publish or subscribe outside its subjects."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request

import nats
import nats.errors
import pytest

from proto.topology import SERVICES
from services.cli.stack import free_port
from services.runtime.nats_auth import inbox_prefix, user
from tests.integration.conftest import WEB_API_TOKEN
from tests.support import REPO, LoopbackHTTP, Services, drop, photo_bytes, query, wait_until, write_config


def attempt(url: str, name: str, password: str, action) -> list[str]:
    """Connect as `name`, run `action(nc)`, and return the errors the server sent back."""
    errors: list[str] = []

    async def go():
        async def on_error(exc):
            errors.append(str(exc))

        nc = await nats.connect(
            url,
            user=name,
            password=password,
            inbox_prefix=inbox_prefix(name),
            error_cb=on_error,
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )
        try:
            await action(nc)
            await nc.flush()
            await asyncio.sleep(0.3)
        finally:
            await nc.close()

    asyncio.run(go())
    return errors


def test_each_service_as_its_own_user(locked_nats, tmp_path, media, database, models_dir):
    server, creds, passwords = locked_nats
    hook = LoopbackHTTP()
    config = write_config(
        tmp_path / "vigil.toml",
        media=media,
        state=tmp_path / "state",
        nats_url=server.url,
        dsn=database,
        model="yolox-nano",
        models_dir=models_dir,
        health={"http_port": free_port(), "systemd": False},
        web={"http_port": (web_port := free_port())},
        notify={"rules": [{"name": "door", "cameras": ["front_door"], "urls": [f"json://127.0.0.1:{hook.port}/door"]}]},
    )
    env = {
        "CREDENTIALS_DIRECTORY": str(creds),
        "VIGIL_NATS__PER_SERVICE_USERS": "true",
        "VIGIL_NATS__PROVISION": "false",
    }

    # anonymous clients are refused once users exist
    with pytest.raises((nats.errors.NoServersError, nats.errors.Error)):
        asyncio.run(nats.connect(server.url, allow_reconnect=False, connect_timeout=2))
    # the admin declares the topology (the installer does this through vigil-nats' ExecStartPost)
    out = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "provision", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds), "VIGIL_CONFIG": ""},
    )
    assert out.returncode == 0, out.stderr

    stack = Services(config, tmp_path / "logs", env)
    try:
        stack.start(*SERVICES)
        stack.wait_ready(*SERVICES, timeout=60)
        drop(media / "front_door" / "astronaut.jpg", photo_bytes("astronaut"))
        wait_until(
            lambda: query(database, "SELECT 1 FROM events"),
            what="detection, event and alert through least-privilege users",
        )
        assert query(database, "SELECT kind FROM alerts") == [("person",)]
        # judged by the analyzer, recorded, and notified through the notifier's own bucket and streams
        wait_until(lambda: query(database, "SELECT 1 FROM event_analysis"), what="the event's analysis recorded")
        wait_until(lambda: hook.accepted, what="the notification delivered")
        wait_until(
            lambda: "retention run" in stack.log("retention") and "http listening" in stack.log("health"),
            what="retention and health working",
        )
        # the web UI reads its pages through its own user (the Services page, the dead letters)
        for page in ("services", "dead-letters", "events"):
            got = urllib.request.urlopen(
                urllib.request.Request(
                    f"http://127.0.0.1:{web_port}/api/v1/{page}", headers={"Authorization": f"Bearer {WEB_API_TOKEN}"}
                ),
                timeout=30,
            )
            assert got.status == 200, page
        log = (tmp_path / "nats-server.log").read_text()
        assert "Permissions Violation" not in log, [
            line for line in log.splitlines() if "Permissions Violation" in line
        ][:5]
    finally:
        stack.stop_all()
        hook.close()

    watcher, detector = user("watcher"), user("detector")

    async def publish_detection(nc):
        await nc.publish("vigil.detections.front_door", b"{}")

    async def subscribe_everything(nc):
        await nc.subscribe("vigil.>")

    async def read_anothers_replies(nc):
        await nc.subscribe(f"{inbox_prefix(user('recorder'))}.>")

    async def fetch_someone_elses_work(nc):
        await nc.publish("$JS.API.CONSUMER.MSG.NEXT.DETECTIONS.recorder-detections", b"1")

    async def delete_a_stream(nc):
        await nc.publish("$JS.API.STREAM.DELETE.UPLOADS", b"")

    assert (
        "permissions violation for publish"
        in " ".join(attempt(server.url, watcher, passwords[watcher], publish_detection)).lower()
    )
    assert (
        "permissions violation for subscription"
        in " ".join(attempt(server.url, watcher, passwords[watcher], subscribe_everything)).lower()
    )
    assert (
        "permissions violation for subscription"
        in " ".join(attempt(server.url, detector, passwords[detector], read_anothers_replies)).lower()
    )
    assert (
        "permissions violation for publish"
        in " ".join(attempt(server.url, detector, passwords[detector], fetch_someone_elses_work)).lower()
    )
    assert (
        "permissions violation for publish"
        in " ".join(attempt(server.url, detector, passwords[detector], delete_a_stream)).lower()
    )
    # and what it may do, it can
    assert (
        attempt(server.url, watcher, passwords[watcher], lambda nc: nc.publish("vigil.uploads.front_door", b"{}")) == []
    )
