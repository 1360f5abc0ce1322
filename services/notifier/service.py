"""notifier: analyses and health alerts -> notify rules -> Notification (stream NOTIFY) -> the targets.

Two halves, so that a slow or dead target never holds a decision back:

- Deciding (consumers `notifier` on ANALYSIS, `notifier-alerts` on ALERTS): each analysis (every
  revision) and each health alert is matched against the rules (services/notifier/rules.py). A rule
  that fires queues one Notification per target, id `<rule>:<event or alert id>:<target>` (NOTIFY
  dedupes it for a day), then writes `fired.<rule>.<source>` to the bucket vigil_notifier (so a later
  revision, even weeks later, never fires it again) with its cooldown, and only then acks. A crash in
  between repeats the same ids, which the stream drops.
- Delivering (consumer `notifier-deliver` on NOTIFY, a work queue): send with Apprise, retrying with
  backoff (stamina) while keeping the message ours; after the target accepted, `delivered.<id>` goes to
  the bucket and then the ack, so a redelivery after a crash does not send again. After its attempts the
  notification is dead-lettered with the rule, the target (its masked name) and the target's error.

One notifier runs per system: cooldowns are read and written by one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
import time
from pathlib import Path

import msgspec
import nats.js.errors
import stamina
from nats.aio.msg import Msg

from proto import SNAPSHOTS_DIR, Alert, EventAnalyzed, Notification, subject
from proto.messages import valid_camera
from proto.topology import NOTIFIER_BUCKET
from services.notifier import rules, targets
from services.runtime import jetstream
from services.runtime.config import Config, NotifyRule
from services.runtime.service import Runtime

STAGE = "notifier"


class Firing(msgspec.Struct, kw_only=True):
    """Value of fired.<rule>.<source> and last.<rule>."""

    rule: str
    source_id: str
    camera: str
    event_time: float
    fired_at: float
    targets: int
    title: str = ""


class Delivery(msgspec.Struct, kw_only=True):
    """Value of delivered.<id> and failed.<id> (`vigil notify test` waits for one of them)."""

    notification_id: str
    target: str
    at: float
    error: str | None = None


def fired_key(rule: str, source_id: str) -> str:
    return f"fired.{rule}.{rules.key_hash(source_id)}"


def cooldown_key(rule: str, dedupe: str) -> str:
    return f"cooldown.{rule}.{rules.key_hash(dedupe)}"


def last_key(rule: str) -> str:
    return f"last.{rule}"


def delivered_key(notification_id: str) -> str:
    return f"delivered.{rules.key_hash(notification_id)}"


def failed_key(notification_id: str) -> str:
    return f"failed.{rules.key_hash(notification_id)}"


async def kv_get(kv, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    return entry.value or None


class SendFailed(Exception):
    pass


class Notifier:
    def __init__(self, rt: Runtime, config: Config, kv, found: dict[tuple[str, int], targets.Target]) -> None:
        self.rt, self.config, self.kv, self.targets = rt, config, kv, found
        self.cfg = config.notify
        self.snapshots = Path(config.state_dir) / SNAPSHOTS_DIR

    def attachment(self, n: Notification) -> str | None:
        """The event's snapshot as a file path, when it names one that is there (a plain file, reached
        without a symlink: the name comes off the bus). Gone (retention, a quota): sent without it."""
        if not n.snapshot or "/" in n.snapshot or n.snapshot.startswith("."):
            return None
        path = self.snapshots / n.snapshot
        try:
            st = path.lstat()
        except OSError:
            return None
        return str(path) if stat.S_ISREG(st.st_mode) else None

    # ---- deciding ------------------------------------------------------------------------------
    def notifications(self, rule: NotifyRule, f: rules.Facts) -> list[Notification]:
        link = f"{self.cfg.web_url.rstrip('/')}/events/{f.event_id}" if self.cfg.web_url and f.event_id else None
        now = time.time()
        return [
            Notification(
                notification_id=f"{rule.name}:{f.source_id}:{i}",
                rule=rule.name,
                target=i,
                target_name=self.targets[(rule.name, i)].name,
                camera=f.camera,
                source_id=f.source_id,
                title=f.title,
                body=f.body,
                severity=rule.severity,
                risk_level=f.level,
                event_time=f.event_time,
                link=link,
                created_at=now,
                snapshot=f.snapshot,
            )
            for i in range(len(rule.urls))
        ]

    async def decide(self, f: rules.Facts) -> None:
        cam = self.config.analyzer.cameras.get(f.camera)
        tz = cam.timezone if cam and cam.timezone else self.config.analyzer.timezone  # the camera's clock
        for rule in self.cfg.rules:
            why = rules.mismatch(rule, f, tz)
            if why is not None:
                if why in ("schedule", "quiet_hours"):  # matched otherwise: worth a line in the journal
                    self.rt.count(f"suppressed_{why}")
                    self.rt.log.info("not notified", rule=rule.name, source=f.source_id, reason=why)
                continue
            if await kv_get(self.kv, fired_key(rule.name, f.source_id)) is not None:
                self.rt.count("already_notified")  # an earlier revision of this event fired the rule
                continue
            dedupe = rules.dedupe_key(rule, f)
            if rule.cooldown_seconds > 0:
                last = await kv_get(self.kv, cooldown_key(rule.name, dedupe))
                if last is not None and abs(f.event_time - float(last)) < rule.cooldown_seconds:
                    self.rt.count("suppressed_cooldown")
                    self.rt.log.info("not notified", rule=rule.name, source=f.source_id, reason="cooldown", key=dedupe)
                    continue
            notes = self.notifications(rule, f)
            await self.rt.bus.publish_many([(subject("notify", f.camera), n, n.notification_id) for n in notes])
            firing = Firing(
                rule=rule.name,
                source_id=f.source_id,
                camera=f.camera,
                event_time=f.event_time,
                fired_at=time.time(),
                targets=len(notes),
                title=f.title,
            )
            value = msgspec.json.encode(firing)
            await self.rt.bus.retry(
                "notifier bookkeeping", lambda v=value, r=rule, d=dedupe: self._remember(r, f, d, v)
            )
            self.rt.count("fired")
            self.rt.log.info("rule fired", rule=rule.name, source=f.source_id, camera=f.camera, targets=len(notes))

    async def _remember(self, rule: NotifyRule, f: rules.Facts, dedupe: str, value: bytes) -> None:
        await self.kv.put(fired_key(rule.name, f.source_id), value)
        if rule.cooldown_seconds > 0:
            await self.kv.put(cooldown_key(rule.name, dedupe), repr(f.event_time).encode())
        await self.kv.put(last_key(rule.name), value)

    async def decided(self, msg: Msg, facts) -> bool:
        """decide(facts()); False when `msg` cannot be decided on and was dead-lettered instead (a time no
        calendar holds, a text a notification may not carry): one bad message must not stop the others.
        Errors of the bus itself go up, to be retried."""
        try:
            await self.decide(facts())
            return True
        except Exception as exc:  # whatever breaks on this message must not crash-loop the stage
            if isinstance(exc, jetstream.TRANSIENT) and jetstream.is_transient(exc):
                raise
            await self.rt.bus.dead_letter(STAGE, msg, f"cannot decide: {type(exc).__name__}: {exc}"[:500])
            return False

    async def handle_analyses(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            a = jetstream.decode_as(msg, EventAnalyzed)
            if isinstance(a, str):
                await self.rt.bus.dead_letter(STAGE, msg, a)
                continue
            if await self.decided(msg, lambda a=a: rules.of_analysis(a)):
                await msg.ack()
                self.rt.count("analyses")

    async def handle_alerts(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            alert = jetstream.decode_as(msg, Alert)
            if isinstance(alert, str):
                await self.rt.bus.dead_letter(STAGE, msg, alert)
                continue
            if rules.is_system_alert(alert):
                if not await self.decided(msg, lambda alert=alert: rules.of_alert(alert)):
                    continue
                self.rt.count("system_alerts")
            await msg.ack()

    # ---- delivering ----------------------------------------------------------------------------
    async def handle_deliveries(self, msgs: list[Msg]) -> None:
        """Each notification on its own: one that fails (the bus away) is naked alone, never the batch,
        so the others' sends are not repeated."""
        outcomes = await asyncio.gather(*(self.deliver(m) for m in msgs), return_exceptions=True)
        for msg, outcome in zip(msgs, outcomes, strict=True):
            if not isinstance(outcome, BaseException) or msg.is_acked:
                continue
            if not isinstance(outcome, Exception):
                raise outcome  # cancelled: stopping
            if jetstream.is_transient(outcome):
                await self.rt.bus.give_up_or_retry(STAGE, "notifier-deliver", [msg], outcome)
            else:
                await self.rt.bus.dead_letter(STAGE, msg, f"delivery failed: {type(outcome).__name__}: {outcome}"[:500])

    async def deliver(self, msg: Msg) -> None:
        n = jetstream.decode_as(msg, Notification)
        if isinstance(n, str):
            await self.rt.bus.dead_letter(STAGE, msg, n)
            return
        camera = n.camera if valid_camera(n.camera) else None
        target = self.targets.get((n.rule, n.target))
        if target is None:
            await self.rt.bus.dead_letter(
                STAGE, msg, f"rule {n.rule!r} has no target {n.target} (the config changed since it fired)", camera
            )
            return
        done = await self.rt.bus.retry(
            "notifier bookkeeping", lambda: kv_get(self.kv, delivered_key(n.notification_id))
        )
        if done is not None:
            self.rt.count("already_delivered")  # sent before a crash took the ack with it
            await msg.ack()
            return
        error = ""
        try:
            # ack_wait is 10 s. A try that timed out may still have reached the target (Apprise gives up
            # waiting, its worker may finish): retrying it favours "delivered twice" over "never".
            async with jetstream.held([msg], every=3.0, alive=self.rt.keepalive):
                async for attempt in stamina.retry_context(
                    on=SendFailed,
                    attempts=self.cfg.attempts,
                    wait_initial=self.cfg.retry_initial_seconds,
                    wait_max=self.cfg.retry_max_seconds,
                    timeout=None,
                ):
                    with attempt:
                        error = await target.send(n, self.cfg.timeout_seconds, self.attachment(n)) or ""
                        if error:
                            self.rt.count("send_failures")
                            self.rt.log.warning(
                                "target refused, retrying",
                                notification=n.notification_id,
                                target=target.name,
                                error=error,
                            )
                            raise SendFailed(error)
        except SendFailed:
            pass
        if not error:
            record = Delivery(notification_id=n.notification_id, target=target.name, at=time.time())
            await self.rt.bus.retry(
                "notifier bookkeeping",
                lambda: self.kv.put(delivered_key(n.notification_id), msgspec.json.encode(record)),
            )
            await msg.ack()
            self.rt.count("delivered")
            self.rt.log.info("delivered", notification=n.notification_id, target=target.name, test=n.test)
            return
        reason = f"rule {n.rule}, target {target.name}: not accepted after {self.cfg.attempts} attempts: {error}"
        self.rt.note_error(reason)
        record = Delivery(notification_id=n.notification_id, target=target.name, at=time.time(), error=error)
        with contextlib.suppress(*jetstream.TRANSIENT):
            await self.kv.put(failed_key(n.notification_id), msgspec.json.encode(record))
        # transient: a target that is down now may accept later (health retries the letter once we are healthy)
        await self.rt.bus.dead_letter(STAGE, msg, reason[:500], camera, transient=True)
        self.rt.count("undeliverable")


async def run(config: Config) -> None:
    found = targets.resolve(config)  # a missing secret or a bad URL stops us here, before READY
    async with Runtime.start(STAGE, config) as rt:
        kv = await rt.js.key_value(NOTIFIER_BUCKET)
        n = Notifier(rt, config, kv, found)
        rt.status_extra = f"{len(config.notify.rules)} rules, {len(found)} targets"
        async with asyncio.TaskGroup() as tg:
            tg.create_task(rt.bus.consume("notifier", n.handle_analyses, 64, 1.0, stage=STAGE))
            tg.create_task(rt.bus.consume("notifier-alerts", n.handle_alerts, 64, 1.0, stage=STAGE))
            tg.create_task(rt.bus.consume("notifier-deliver", n.handle_deliveries, 16, 1.0, stage=STAGE))
            for durable in ("notifier", "notifier-alerts", "notifier-deliver"):
                tg.create_task(rt.bus.exhausted_loop(durable, STAGE))
