"""The hostile review's findings (issue 13), each against the real thing: PostgreSQL, NATS with the
installer's permissions, the running services."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import nats
import psycopg
import pytest

import proto
from proto.topology import AGGREGATOR_STATE_BUCKET, HEARTBEAT_BUCKET
from services.health.checks import read_heartbeats
from services.recorder.service import is_bad_row
from services.runtime.nats_auth import ADMIN_USER, user
from tests.integration.test_nats_permissions import attempt
from tests.support import REPO, query, wait_until, write_config


def test_a_nul_byte_is_a_bad_row_not_a_database_outage(database):
    """psycopg refuses a NUL in a text value itself, with a DataError that has no SQLSTATE: taken for
    "database away", it held the recorder's batch forever. It is the row's fault, like class 22/23."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (path text PRIMARY KEY)")
        with pytest.raises(psycopg.Error) as nul:
            conn.execute("INSERT INTO t VALUES (%s)", ("x\x00.jpg",))
        assert nul.value.sqlstate is None and is_bad_row(nul.value)
        conn.execute("INSERT INTO t VALUES ('a')")
        with pytest.raises(psycopg.Error) as dup:
            conn.execute("INSERT INTO t VALUES ('a')")
        assert is_bad_row(dup.value)  # 23505
    with pytest.raises(psycopg.OperationalError) as away:
        psycopg.connect(database.rsplit("/", 1)[0] + "/no_such_database", connect_timeout=3)
    assert not is_bad_row(away.value)  # the database's state: hold the batch and wait


# ---- the bus, with the installer's permissions ------------------------------------------------------
def admin(url: str, passwords: dict, action):
    async def go():
        nc = await nats.connect(url, user=ADMIN_USER, password=passwords[ADMIN_USER])
        try:
            return await action(nc)
        finally:
            await nc.close()

    return asyncio.run(go())


def cli(config, creds, *args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds), "VIGIL_CONFIG": ""},
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def provisioned(locked_nats, tmp_path, media, database):
    server, creds, passwords = locked_nats
    config = write_config(
        tmp_path / "vigil.toml",
        media=media,
        state=tmp_path / "state",
        nats_url=server.url,
        dsn=database,
        model="none",
        models_dir=None,
    )
    out = cli(config, creds, "provision")
    assert out.returncode == 0, out.stderr
    return server, creds, passwords, config


def violations(errors: list[str]) -> str:
    return " ".join(errors).lower()


def test_a_forged_dead_letter_cannot_be_retried_into_the_api(provisioned):
    """As vigil-detector, a letter whose original subject is $JS.API.STREAM.DELETE.UPLOADS looked like an
    ordinary decode failure, and `vigil dlq retry` (the admin) deleted the UPLOADS stream. Retry goes
    only to the letter's own stage input, with its camera and a payload of that stage's type; and a
    stage may write letters only under its own vigil.dlq.<stage>."""
    server, creds, passwords, config = provisioned
    detector = user("detector")
    forged = proto.DeadLetter(
        stage="detector",
        reason="image could not be decoded",
        original_subject="$JS.API.STREAM.DELETE.UPLOADS",
        original_payload="",
        camera="front_door",
        path="front_door/x.jpg",
    )

    async def forge(nc):
        await nc.publish("vigil.dlq.detector.front_door", proto.encode(forged), headers=proto.headers_for(forged))

    async def forge_as_recorder(nc):
        await nc.publish("vigil.dlq.recorder.front_door", proto.encode(forged), headers=proto.headers_for(forged))

    assert attempt(server.url, detector, passwords[detector], forge) == []  # its own letters: allowed
    assert "permissions violation for publish" in violations(
        attempt(server.url, detector, passwords[detector], forge_as_recorder)
    )
    (letter,) = wait_until(
        lambda: (
            cli(config, creds, "dlq", "list", "--json").stdout.strip() not in ("", "[]")
            and json.loads(cli(config, creds, "dlq", "list", "--json").stdout)
        ),
        what="the forged letter",
    )
    assert letter["retry"].startswith("no:")
    out = cli(config, creds, "dlq", "retry", str(letter["seq"]), "--yes", "--json")
    assert out.returncode == 2 and "cannot be retried" in out.stderr

    async def streams(nc):
        return [s.config.name for s in await nc.jetstream().streams_info()]

    assert "UPLOADS" in admin(server.url, passwords, streams)


def test_no_stage_can_delete_or_redirect_another_stages_work(provisioned):
    """STREAM.MSG.DELETE was granted to every consumer (the aggregator deleted a detection the recorder
    had not seen); CONSUMER.CREATE on a KV bucket let the aggregator aim a push consumer at
    vigil.uploads.front_door and write into UPLOADS without publish rights."""
    server, _creds, passwords, _config = provisioned
    aggregator, recorder = user("aggregator"), user("recorder")

    async def delete_a_detection(nc):
        await nc.publish("$JS.API.STREAM.MSG.DELETE.DETECTIONS", b'{"seq": 1}')

    async def push_into_uploads(nc):
        cfg = {
            "stream_name": f"KV_{AGGREGATOR_STATE_BUCKET}",
            "config": {"deliver_subject": "vigil.uploads.front_door", "ack_policy": "none"},
        }
        await nc.publish(f"$JS.API.CONSUMER.CREATE.KV_{AGGREGATOR_STATE_BUCKET}", json.dumps(cfg).encode())

    async def named_consumer(nc):
        cfg = {
            "stream_name": f"KV_{AGGREGATOR_STATE_BUCKET}",
            "config": {"name": "x", "deliver_subject": "vigil.uploads.front_door"},
        }
        await nc.publish(f"$JS.API.CONSUMER.CREATE.KV_{AGGREGATOR_STATE_BUCKET}.x", json.dumps(cfg).encode())

    for who in (aggregator, recorder):
        assert "permissions violation for publish" in violations(
            attempt(server.url, who, passwords[who], delete_a_detection)
        ), who
    for action in (push_into_uploads, named_consumer):
        assert "permissions violation for publish" in violations(
            attempt(server.url, aggregator, passwords[aggregator], action)
        )

    async def consumers(nc):
        return (await nc.jetstream().stream_info(f"KV_{AGGREGATOR_STATE_BUCKET}")).state.consumer_count

    assert admin(server.url, passwords, consumers) == 0


def test_no_service_can_speak_for_another_in_health(provisioned):
    """Health took service and instance from the heartbeat's payload. Each service may write only its
    own `<service>.>` keys, and a payload that names another service or instance than its key is dropped."""
    server, _creds, passwords, _config = provisioned
    detector = user("detector")
    now = time.time()

    def beat(service: str, instance: str) -> proto.Heartbeat:
        return proto.Heartbeat(
            service=service, instance=instance, host="h", pid=1, version="1", started_at=now, sent_at=now, state="ready"
        )

    def put(key: str, hb: proto.Heartbeat):
        async def go(nc):
            await nc.publish(f"$KV.{HEARTBEAT_BUCKET}.{key}", proto.encode(hb))

        return go

    results = {}
    for key, hb in (
        ("recorder.box", beat("recorder", "box")),
        ("detector.box", beat("recorder", "box")),
        ("detector.a", beat("detector", "b")),
        ("detector.box", beat("detector", "box")),
    ):
        results[f"{key}/{hb.service}.{hb.instance}"] = attempt(server.url, detector, passwords[detector], put(key, hb))
    assert "permissions violation for publish" in violations(results["recorder.box/recorder.box"])
    assert all(errors == [] for key, errors in results.items() if key.startswith("detector."))

    async def read(nc):
        return await read_heartbeats(nc)

    # detector.box was written twice: its last payload is an honest one
    assert [(h.service, h.instance) for h in admin(server.url, passwords, read)] == [("detector", "box")]


def test_markup_in_data_is_printed_as_text(nats_server, tmp_path, media, database):
    """A heartbeat's last_error of "oops [/bogus]" crashed `vigil status` (rich MarkupError), and
    "[link=...]" became a live hyperlink: every cell is plain text now."""
    config = write_config(
        tmp_path / "vigil.toml",
        media=media,
        state=tmp_path / "state",
        nats_url=nats_server.url,
        dsn=database,
        model="none",
        models_dir=None,
        health={"systemd": False},
    )
    assert cli(config, tmp_path, "provision").returncode == 0
    now = time.time()
    error = "oops [/bogus] [link=https://evil.example]click me[/link] [bold red]"
    hb = proto.Heartbeat(
        service="watcher",
        instance="box",
        host="h",
        pid=1,
        version="1",
        started_at=now,
        sent_at=now,
        state="ready",
        last_error=error,
        backend="[/]",
    )

    async def put(nc):
        await nc.publish(f"$KV.{HEARTBEAT_BUCKET}.watcher.box", proto.encode(hb))
        await nc.flush()

    asyncio.run(_plain(nats_server.url, put))
    out = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "VIGIL_CONFIG": "", "COLUMNS": "400", "TERM": "xterm-256color", "FORCE_COLOR": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "[/bogus]" in out.stdout and "[link=https://evil.example]click me[/link]" in out.stdout
    assert "\x1b]8;" not in out.stdout  # no hyperlink escape was emitted


async def _plain(url: str, action):
    nc = await nats.connect(url)
    try:
        return await action(nc)
    finally:
        await nc.close()


def test_retention_trusts_only_dead_letters_the_recorder_saw_from_their_own_stage(
    make_stack, media, database, nats_server
):
    """Retention took anything in the DLQ stream as "finished with" and deleted files nothing had
    recorded. Now the recorder writes dead_letters rows with the stage of the subject (which only that
    stage may publish to); retention deletes an unrecorded file only for a permanent detector letter."""
    from services.database import connect
    from services.retention.service import run_once
    from services.runtime.config import load_config
    from tests.integration.retention_support import DAY, put_file

    stack = make_stack(model="none", retention={"max_age_days": 1.0})
    stack.start("recorder")
    stack.wait_ready("recorder")
    old = time.time() - 10 * DAY
    for rel in (
        "front_door/evidence.jpg",
        "front_door/claimed.jpg",
        "front_door/bad.jpg",
        "front_door/crashed.jpg",
        "front_door/reused.jpg",
    ):
        put_file(media, rel, old)

    def letter(stage: str, path: str, transient: bool = False, size: int = 4096) -> proto.DeadLetter:
        up = proto.FileUploaded(
            file_id=path, camera="front_door", path=path, size=size, mtime=old, sha256="0" * 64, kind="image"
        )
        return proto.DeadLetter(
            stage=stage,
            reason="image could not be decoded",
            original_subject="vigil.uploads.front_door",
            original_payload=proto.encode(up).decode(),
            camera="front_door",
            path=path,
            transient=transient,
            failed_at=time.time(),
        )

    async def publish(nc):
        js = nc.jetstream()
        for subject, value in (
            ("vigil.dlq.aggregator.front_door", letter("detector", "front_door/evidence.jpg")),  # posing
            ("vigil.dlq.aggregator.front_door", letter("aggregator", "front_door/claimed.jpg")),
            ("vigil.dlq.detector.front_door", letter("detector", "front_door/bad.jpg")),
            ("vigil.dlq.detector.front_door", letter("detector", "front_door/crashed.jpg", transient=True)),
            # a letter about an earlier file at this path: the file there now is another, still pending
            ("vigil.dlq.detector.front_door", letter("detector", "front_door/reused.jpg", size=999)),
        ):
            await js.publish(subject, proto.encode(value), headers=proto.headers_for(value))

    asyncio.run(_plain(nats_server.url, publish))
    rows = wait_until(
        lambda: len(r := query(database, "SELECT stage, path FROM dead_letters ORDER BY dlq_seq")) == 4 and r,
        what="four letters recorded",
    )
    assert rows == [
        ("aggregator", "front_door/claimed.jpg"),
        ("detector", "front_door/bad.jpg"),
        ("detector", "front_door/crashed.jpg"),
        ("detector", "front_door/reused.jpg"),
    ]
    assert "dead letter refused" in stack.log("recorder")
    config = load_config(stack.config, environ={})
    with connect(config, "retention", autocommit=True) as conn:
        report = run_once(config, conn, time.time(), "cli", False)
    assert report.deleted_paths == ["front_door/bad.jpg"]
    assert all(
        (media / "front_door" / n).exists() for n in ("evidence.jpg", "claimed.jpg", "crashed.jpg", "reused.jpg")
    )


# ---- PostgreSQL: a role per service -----------------------------------------------------------------
def test_each_service_role_has_only_the_rights_its_work_needs(postgres, database):
    """One superuser for everything let code run in any service drop every table. Roles made by
    vigil-postgres at start: the recorder writes but never deletes, retention deletes and marks
    missing media but never writes rows, health only reads; none can change the schema."""
    import asyncio as aio

    import psycopg.errors
    import structlog

    from services.database import setup_roles
    from services.recorder.service import migrate

    async def schema():
        async with await psycopg.AsyncConnection.connect(database) as conn:
            await migrate(conn, structlog.get_logger())

    aio.run(schema())
    with psycopg.connect(database, autocommit=True) as conn:
        setup_roles(conn, {"recorder": "r-pw", "retention": "t-pw", "health": "h-pw"})
        setup_roles(conn, {"recorder": "r-pw", "retention": "t-pw", "health": "h-pw"})  # every start: idempotent

    def as_role(role: str, password: str, statement: str, *params) -> str:
        try:
            with psycopg.connect(database, user=role, password=password, autocommit=True) as conn:
                conn.execute(statement, params)
            return "ok"
        except psycopg.errors.InsufficientPrivilege:
            return "denied"

    insert = (
        "INSERT INTO alerts (alert_id, camera, kind, severity, message, created_at, state) VALUES (%s, 'c', 'k', 'info', 'm', now(),"
        " 'firing')"
    )
    checks = {
        ("vigil_recorder", "insert"): as_role("vigil_recorder", "r-pw", insert, "a1"),
        ("vigil_recorder", "upsert"): as_role(
            "vigil_recorder", "r-pw", insert + " ON CONFLICT (alert_id) DO UPDATE SET message = 'n'", "a1"
        ),
        ("vigil_recorder", "delete"): as_role("vigil_recorder", "r-pw", "DELETE FROM alerts"),
        ("vigil_recorder", "unkeep an event"): as_role(
            "vigil_recorder", "r-pw", "UPDATE events SET keep = false WHERE false"
        ),
        ("vigil_recorder", "rewrite a detection"): as_role(
            "vigil_recorder", "r-pw", "UPDATE detections SET path = 'x' WHERE false"
        ),
        ("vigil_retention", "select"): as_role("vigil_retention", "t-pw", "SELECT count(*) FROM detections"),
        ("vigil_retention", "mark missing"): as_role(
            "vigil_retention", "t-pw", "UPDATE detections SET missing_since = now() WHERE false"
        ),
        ("vigil_retention", "delete"): as_role("vigil_retention", "t-pw", "DELETE FROM alerts"),
        ("vigil_retention", "insert"): as_role("vigil_retention", "t-pw", insert, "a2"),
        ("vigil_retention", "rewrite a row"): as_role(
            "vigil_retention", "t-pw", "UPDATE detections SET path = 'x' WHERE false"
        ),
        ("vigil_health", "select"): as_role("vigil_health", "h-pw", "SELECT count(*) FROM events"),
        ("vigil_health", "update"): as_role("vigil_health", "h-pw", "UPDATE events SET keep = true WHERE false"),
        ("vigil_health", "delete"): as_role("vigil_health", "h-pw", "DELETE FROM events"),
    }

    async def every_recorder_write(revision: int) -> None:  # the recorder's own statements, a new revision included
        from services.recorder.service import write_detections, write_events

        now = time.time()
        ev = proto.EventClosed(
            event_id="e1",
            camera="c",
            started_at=now,
            ended_at=now,
            file_ids=["f1"],
            labels={},
            best_file_id="f1",
            close_reason="idle",
            revision=revision,
        )
        det = proto.Detections(
            file_id="f1", camera="c", path="c/a.jpg", captured_at=now, width=1, height=1, model="m", inference_ms=1.0
        )
        async with (
            await psycopg.AsyncConnection.connect(database, user="vigil_recorder", password="r-pw") as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            await write_events(cur, [ev])
            await write_detections(cur, [det])

    aio.run(every_recorder_write(1))
    aio.run(every_recorder_write(2))
    assert query(database, "SELECT revision FROM events WHERE event_id = 'e1'") == [(2,)]
    for role, pw in (("vigil_recorder", "r-pw"), ("vigil_retention", "t-pw"), ("vigil_health", "h-pw")):
        checks[(role, "drop a table")] = as_role(role, pw, "DROP TABLE detections")
        checks[(role, "create a table")] = as_role(role, pw, "CREATE TABLE evil (x int)")
    assert checks == {
        ("vigil_recorder", "insert"): "ok",
        ("vigil_recorder", "upsert"): "denied",
        ("vigil_recorder", "delete"): "denied",
        ("vigil_recorder", "unkeep an event"): "denied",
        ("vigil_recorder", "rewrite a detection"): "denied",
        ("vigil_retention", "select"): "ok",
        ("vigil_retention", "mark missing"): "ok",
        ("vigil_retention", "delete"): "ok",
        ("vigil_retention", "insert"): "denied",
        ("vigil_retention", "rewrite a row"): "denied",
        ("vigil_health", "select"): "ok",
        ("vigil_health", "update"): "denied",
        ("vigil_health", "delete"): "denied",
        **{
            (r, a): "denied"
            for r in ("vigil_recorder", "vigil_retention", "vigil_health")
            for a in ("drop a table", "create a table")
        },
    }


def test_every_login_can_publish_exactly_its_own_subjects(provisioned):
    """Forged messages from each service's credentials: a hand-written table of who may write where
    (not derived from services/runtime/nats_auth.py, so a grant widened there turns this red)."""
    import re

    from services.runtime.nats_auth import SERVICES

    server, _creds, passwords, _config = provisioned
    stages = ("watcher", "detector", "aggregator", "recorder")
    allowed = {
        # health: automatic retries of transient letters; web: a retry from the Dead letters page (the
        # same code as `vigil dlq retry`, which puts the letter back on its stage's input)
        "vigil.uploads.cam": {"watcher", "health", "web"},
        "vigil.detections.cam": {"detector", "health", "web"},
        "vigil.events.cam": {"aggregator", "health", "web"},
        "vigil.alerts.cam": {"aggregator", "health"},
        "vigil.alerts.system": {"aggregator", "health", "detector"},
        "vigil.gpu.host": {"gpu-stats", "health", "web"},
        "vigil.health.watcher": {"health"},
        "vigil.retention.report": {"retention"},
        "vigil.control.retention": {"watcher"},
        **{f"vigil.dlq.{s}.cam": {s} for s in stages},
        **{f"$KV.{HEARTBEAT_BUCKET}.{s}.box": {s} for s in SERVICES},
        **{f"$JS.API.STREAM.MSG.DELETE.{s}": set() for s in ("UPLOADS", "DETECTIONS", "EVENTS", "ALERTS", "GPU")},
        "$JS.API.STREAM.MSG.DELETE.DLQ": {"health", "web"},  # a retried letter leaves the DLQ
        "$JS.API.STREAM.DELETE.UPLOADS": set(),
        f"$JS.API.CONSUMER.CREATE.KV_{HEARTBEAT_BUCKET}": set(),
    }
    got: dict[str, set[str]] = {subject: set() for subject in allowed}
    for service in SERVICES:
        name = user(service)

        async def publish_all(nc):
            for subject in allowed:
                payload = b"{}" if not subject.startswith("$JS.API") else b'{"seq": 999999}'
                await nc.publish(subject, payload)

        errors = attempt(server.url, name, passwords[name], publish_all)
        # nats-py lower-cases the server's -ERR text
        refused = {m.group(1) for e in errors for m in [re.search(r'publish to "([^"]+)"', e, re.I)] if m}
        for subject in allowed:
            if subject.lower() not in refused:
                got[subject].add(service)
    assert got == allowed
