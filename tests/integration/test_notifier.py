"""The notifier as a real process on a real nats-server, delivering to real servers on loopback: an SMTP
server (aiosmtpd) and an HTTP server taking Apprise's JSON webhook. Each scenario has its own camera
and rule, so they cannot fire each other's: email and webhook content, cooldown, quiet hours, an
overnight schedule, a target that fails twice, one that always fails (dead letter with the reason, no
secret), a revision of a notified event, health alerts through camera "system", `vigil notify test`
and `list`, and a notifier killed mid-delivery."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import itertools
import json
import os
import subprocess
import sys

import nats
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller

import proto
from proto import Alert, AnalyzerInfo, EventAnalyzed
from proto.messages import risk_level
from proto.topology import HEARTBEAT_BUCKET
from services.cli.stack import free_port
from services.runtime.jetstream import stored_messages
from tests.support import REPO, LoopbackHTTP, photo_bytes, wait_until_async

SECRET = "hunter2-very-secret"


def utc(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).replace(tzinfo=dt.UTC).timestamp()


def analysis(
    camera: str, n: int, start: float, score: int = 90, revision: int = 1, labels=("person",), snapshot=None
) -> EventAnalyzed:
    return EventAnalyzed(
        event_id=f"ev-{camera}-{n}",
        revision=revision,
        camera=camera,
        risk_score=score,
        risk_level=risk_level(score),
        summary=f"Person on {camera} (event {n}, revision {revision})",
        analyzer=AnalyzerInfo(name="rules", version="rules-1"),
        analyzed_at=start + 10,
        started_at=start,
        ended_at=start + 5,
        labels=list(labels),
        snapshot=snapshot,
    )


async def publish(js, msg) -> None:
    if isinstance(msg, EventAnalyzed):
        subj, msg_id = proto.subject("analysis", msg.camera), f"{msg.event_id}-r{msg.revision}"
    else:
        subj, msg_id = proto.subject("alerts", msg.camera), msg.alert_id
    await js.publish(subj, proto.encode(msg), headers=proto.headers_for(msg, msg_id))


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


async def settled(js) -> bool:
    """Every decision made and every notification delivered or dead-lettered: nothing pending anywhere."""
    for stream, durable in (("ANALYSIS", "notifier"), ("ALERTS", "notifier-alerts"), ("NOTIFY", "notifier-deliver")):
        info = await js.consumer_info(stream, durable)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def counter(js, name: str) -> int:
    kv = await js.key_value(HEARTBEAT_BUCKET)
    keys = [k for k in await kv.keys() if k.startswith("notifier.")]
    return proto.decode((await kv.get(keys[0])).value).counters.get(name, 0) if keys else 0


@pytest.mark.timeout(240)
async def test_rules_and_durable_delivery(make_stack, nats_server, tmp_path):
    calls: dict[str, int] = {}

    async def handler(request, n):
        path = request.path
        calls[path] = calls.get(path, 0) + 1
        if path == "/flaky" and calls[path] <= 2:
            return web.Response(status=500, text="try later")
        if path == "/down":
            return web.Response(
                status=503, text=f"down for maintenance (you sent {request.headers.get('Authorization', '')})"
            )
        if path == "/stall" and calls[path] == 1:
            await asyncio.sleep(6)  # the notifier is killed meanwhile
        return web.Response(status=200, text="ok")

    hook = LoopbackHTTP(handler)
    box = Mailbox()
    smtp_port = free_port()
    smtp = Controller(box, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "notify_hook").write_text(SECRET)
    (creds / "notify_hook").chmod(0o600)
    j = f"json://127.0.0.1:{hook.port}"
    rule = lambda name, urls, **kw: {"name": name, "urls": urls, "cameras": [name], **kw}  # noqa: E731
    notify = {
        "web_url": "http://vigil.lan:8090",
        "attempts": 3,
        "retry_initial_seconds": 0.2,
        "retry_max_seconds": 0.5,
        "timeout_seconds": 10.0,
        "rules": [
            rule(
                "mail",
                [f"mailto://127.0.0.1:{smtp_port}?from=vigil@example.com&to=owner@example.com", f"{j}/mail"],
                min_level="high",
            ),
            rule("cool", [f"{j}/cool"], cooldown_seconds=300.0),
            rule("quiet", [f"{j}/quiet"], quiet_hours=["11:00-13:00"], timezone="UTC"),
            rule("night", [f"{j}/night"], schedule={"times": ["22:00-06:00"]}, timezone="UTC"),
            rule("flaky", [f"{j}/flaky"]),
            rule("down", [f"json://vigil:{{secret:hook}}@127.0.0.1:{hook.port}/down"]),
            rule("rev", [f"{j}/rev"]),
            rule("stall", [f"{j}/stall"]),
            {"name": "sys", "urls": [f"{j}/sys"], "cameras": ["system"], "labels": ["disk_low"]},
        ],
    }
    stack = make_stack(notify=notify, analyzer={"timezone": "UTC"}, env={"CREDENTIALS_DIRECTORY": str(creds)})
    stack.start("notifier")
    stack.wait_ready("notifier")
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        poison = analysis("mail", 99, 1e300)  # a time no calendar holds: dead-lettered, never a crash loop
        await publish(js, poison)
        day = utc("2026-06-03T00:00")
        # the event's snapshot, as the analyzer leaves it: attached to the email
        snap_name = "mail." + "ab" * 16 + "-r1.jpg"
        (tmp_path / "state" / "snapshots").mkdir(parents=True)
        (tmp_path / "state" / "snapshots" / snap_name).write_bytes(photo_bytes("astronaut", scale=0.2))
        await publish(js, analysis("mail", 1, day + 3600, score=90, snapshot=snap_name))
        await publish(js, analysis("mail", 2, day + 7200, score=40))  # medium: below min_level high
        for i in range(3):  # three events a minute apart: one message
            await publish(js, analysis("cool", i, day + 3600 + 60 * i))
        await publish(js, analysis("cool", 3, day + 3600 + 1000))  # past the cooldown: a second one
        await publish(js, analysis("quiet", 1, day + 12 * 3600))  # 12:00, within quiet hours
        await publish(js, analysis("quiet", 2, day + 14 * 3600))
        for n, hhmm in enumerate(("23:30", "01:00", "12:00")):
            h, m = map(int, hhmm.split(":"))
            await publish(js, analysis("night", n, day + h * 3600 + m * 60))
        await publish(js, analysis("flaky", 1, day))
        await publish(js, analysis("down", 1, day))
        await publish(js, analysis("rev", 1, day + 100, revision=1))
        await publish(js, analysis("rev", 1, day + 100, revision=2))  # a late detection joined it
        await publish(
            js,
            Alert(
                alert_id="disk_low-1", camera="system", kind="disk_low", message="media disk 4% free", created_at=day
            ),
        )
        await publish(
            js,
            Alert(
                alert_id="ev-x-person", camera="front_door", kind="person", message="p", created_at=day, event_id="ev-x"
            ),
        )
        await wait_until_async(lambda: settled(js), "every decision and delivery settled")

        bodies = lambda path: [json.loads(b) for p, _, b in hook.requests if p == path]  # noqa: E731
        # email and webhook: title, body (the summary) and the link to the event
        assert len(box.messages) == 1
        mail = box.messages[0]
        assert mail["Subject"] == "Critical risk on mail" and mail["To"] == "owner@example.com"
        text = (
            next(p for p in mail.walk() if p.get_content_type().startswith("text/")).get_payload(decode=True).decode()
        )
        assert "Person on mail (event 1, revision 1)" in text and "http://vigil.lan:8090/events/ev-mail-1" in text
        [attached] = [p for p in mail.walk() if p.get_filename() == snap_name]
        assert attached.get_payload(decode=True) == photo_bytes("astronaut", scale=0.2)
        [hooked] = bodies("/mail")
        assert hooked["title"] == "Critical risk on mail" and hooked["type"] == "warning"
        assert hooked["message"] == "Person on mail (event 1, revision 1)\nhttp://vigil.lan:8090/events/ev-mail-1"
        # cooldown: events 0-2 give one message, event 3 (past 300 s) another
        assert sorted(b["message"].split("\n")[0] for b in bodies("/cool")) == [
            "Person on cool (event 0, revision 1)",
            "Person on cool (event 3, revision 1)",
        ]
        assert [b["message"].split("\n")[0] for b in bodies("/quiet")] == ["Person on quiet (event 2, revision 1)"]
        assert sorted(b["message"].split("\n")[0] for b in bodies("/night")) == [
            "Person on night (event 0, revision 1)",
            "Person on night (event 1, revision 1)",
        ]
        # failed twice, then accepted: sent three times, delivered once, not dead-lettered
        assert calls["/flaky"] == 3 and len(bodies("/flaky")) == 3
        # a revision of a notified event: no second notification
        assert [b["message"].split("\n")[0] for b in bodies("/rev")] == ["Person on rev (event 1, revision 1)"]
        # ...recognised by the notifier's own record (fired.<rule>.<event>), which outlasts the stream's
        # one-day dedupe window: a revision weeks later is caught the same way
        await wait_until_async(
            lambda: counter(js, "already_notified"), "the notifier's heartbeat to count it", timeout=20
        )
        assert await counter(js, "already_notified") == 1
        # health's alert through camera system; the aggregator's fast-path alert is not a second path
        [sys_alert] = bodies("/sys")
        assert sys_alert["title"] == "vigil: disk low" and sys_alert["message"] == "media disk 4% free"
        # always refused: its attempts, then a dead letter naming the rule and the target, never the secret
        assert calls["/down"] == 3
        letters = [
            m for m in [proto.decode(raw.data) async for _, raw in stored_messages(js, "DLQ")] if m.stage == "notifier"
        ]
        assert len(letters) == 2, letters
        assert letters[0].reason.startswith("cannot decide: "), letters[0].reason
        letter = letters[1]
        assert (
            letter.reason.startswith("rule down, target json://vigil:****@127.0.0.1")
            and "not accepted after 3 attempts" in letter.reason
        )
        assert "503" in letter.reason or "down" in letter.reason, letter.reason
        assert letter.transient and letter.camera == "down"
        basic = base64.b64encode(f"vigil:{SECRET}".encode()).decode()  # the target echoes its Authorization header
        for text in (proto.encode(letter).decode(), stack.log("notifier")):
            assert SECRET not in text and basic not in text

        # the CLI: a test notification through the running notifier, and the rules with their last firing
        env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)}
        out = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "notify", "test", "sys", "--config", str(stack.config)],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout == f"json://127.0.0.1:{hook.port}/sys: delivered\n"
        assert bodies("/sys")[-1]["title"] == "vigil test: rule sys"
        listed = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "notify", "list", "--json", "--config", str(stack.config)],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
        )  # fmt: skip
        rules_listed = {r["rule"]: r for r in json.loads(listed.stdout)}
        assert rules_listed["cool"]["last_fired"]["source_id"] == "ev-cool-3"
        assert rules_listed["quiet"]["last_fired"]["source_id"] == "ev-quiet-2"
        assert rules_listed["stall"]["last_fired"] is None

        # killed mid-delivery: the target never answered the first send; after a restart it gets it once
        await publish(js, analysis("stall", 1, day))
        await wait_until_async(lambda: asyncio.sleep(0, calls.get("/stall")), "the first send to reach the target")
        stack.kill("notifier")
        stack.start("notifier")
        stack.wait_ready("notifier")
        await wait_until_async(
            lambda: asyncio.sleep(0, calls.get("/stall", 0) >= 2), "the redelivery after the restart", timeout=60
        )
        await wait_until_async(lambda: settled(js), "settled after the restart")
        stall_accepted = [b for b in hook.accepted if b"stall" in b]
        assert calls["/stall"] == 2 and len(stall_accepted) == 1, (calls, stall_accepted)
    finally:
        await nc.close()
        stack.stop_all()
        hook.close()
        smtp.stop()


class WatchdogPings:
    """The notify socket of a supervisor: the times WATCHDOG=1 arrived."""

    def __init__(self, path) -> None:
        import socket
        import threading
        import time

        self.times: list[float] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()

        def read():
            while not self._stop.is_set():
                try:
                    data = self.sock.recv(4096).decode()
                except OSError:
                    continue
                if "WATCHDOG=1" in data.split("\n"):
                    self.times.append(time.monotonic())

        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.mark.timeout(120)
async def test_a_slow_target_is_work_not_a_hang(make_stack, nats_server, tmp_path):
    """A target that takes 20 s to answer, under a 12 s systemd watchdog: the pings go on through the
    delivery (the wait is bounded by the send timeout), so systemd does not kill the notifier mid-send."""
    import time

    async def handler(request, n):
        await asyncio.sleep(20)
        return web.Response(text="ok")

    hook = LoopbackHTTP(handler)
    os.environ.pop("WATCHDOG_PID", None)
    pings = WatchdogPings(tmp_path / "notify.sock")
    notify = {
        "attempts": 1,
        "timeout_seconds": 30.0,
        "rules": [{"name": "slow", "urls": [f"json://127.0.0.1:{hook.port}/slow"]}],
    }
    stack = make_stack(notify=notify, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "12000000"})
    stack.start("notifier")
    stack.wait_ready("notifier")
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await publish(js, analysis("front_door", 1, utc("2026-06-03T12:00")))
        await wait_until_async(lambda: asyncio.sleep(0, hook.requests), "the send to reach the target")
        sent = time.monotonic()
        await wait_until_async(lambda: asyncio.sleep(0, hook.accepted), "the target to accept", timeout=40)
        done = time.monotonic()
        # every moment from the send to the target's answer lies within 12 s of a ping
        marks = [sent - 6, *(t for t in pings.times if sent - 6 <= t <= done), done]
        gaps = [b - a for a, b in itertools.pairwise(marks)]
        assert max(gaps) < 12.0, (gaps, done - sent)  # systemd kills at a 12 s gap
        assert stack.procs["notifier"].poll() is None
    finally:
        await nc.close()
        stack.stop_all()
        hook.close()
        pings.close()
