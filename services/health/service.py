"""health: watches the whole system and says so, on the bus and over HTTP.

Every `health.check_seconds` it takes a snapshot (services/health/checks.py: heartbeats, systemd unit
states, consumer backlogs, dead letters, disks, GPUs), publishes a HealthChanged on
vigil.health.<service> whenever a verdict changes, and raises an Alert on vigil.alerts.<camera|system>
when a condition has held long enough - once when it fires, once more (state "resolved") when it clears:

    service_down           an instance down or stale for health.down_alert_seconds
    backlog_growing        a stage's backlog (pending + ack pending) has only grown for health.backlog_alert_seconds
    disk_low               free space on a watched filesystem below health.disk_low_percent
    detector_cpu_fallback  a detector instance running on the CPU because its GPU failed
    camera_silent          no upload from a camera for its expected interval (health.camera_silent_seconds / .cameras)
    camera_clock           a camera's latest upload is dated far in the future or before any retention age
    camera_unreadable      the watcher finds files in a camera's folder that vigil may not read (an FTP
                           server's umask 077, a chmod): the file, its owner and mode are in the message

Alerts also go to health.webhook_url (JSON POST, retried with backoff) when one is set. HTTP endpoints
(127.0.0.1:9470 by default) are in services/health/web.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque

import msgspec

import proto
from proto import Alert, HealthChanged, subject
from proto.topology import HEALTH_BUCKET, HEALTH_OBSERVES
from services import database
from services.health.checks import ServiceStatus, Snapshot, snapshot
from services.health.web import HealthState, start_http
from services.runtime import jetstream
from services.runtime.config import Config
from services.runtime.dlq_retry import RetryBook
from services.runtime.service import Runtime

CONDITIONS_KEY = "conditions"  # in KV vigil_health: Conditions.dump()

# An instance whose heartbeat expired stays "down" this long, then is forgotten (its alert resolves):
# long enough for anyone to notice, short enough that a decommissioned detector does not alert forever.
FORGET_GONE_SECONDS = 3600.0


class _Saved(msgspec.Struct):
    since: dict[str, float] = {}
    fired: dict[str, Alert] = {}


class Conditions:
    """Alert bookkeeping: a condition fires once after holding `hold` seconds and resolves once when
    it is no longer observed. Alert ids are deterministic (Nats-Msg-Id), so a restart cannot double-post
    within the duplicate window."""

    def __init__(self) -> None:
        self.since: dict[str, float] = {}
        self.fired: dict[str, Alert] = {}

    def dump(self) -> bytes:
        """What must survive a restart of health: conditions held, and the alerts that fired for them
        (so the "resolved" is still sent, and a held condition does not fire a second time)."""
        return msgspec.json.encode(_Saved(since=self.since, fired=self.fired))

    def load(self, data: bytes) -> None:
        saved = msgspec.json.decode(data, type=_Saved)
        self.since, self.fired = dict(saved.since), dict(saved.fired)

    def update(self, observed: dict[str, tuple[str, str, str, str, float]], now: float) -> list[Alert]:
        """`observed`: key -> (kind, camera, severity, message, hold seconds). Returns alerts to publish."""
        out = []
        for key, (kind, camera, severity, message, hold) in observed.items():
            since = self.since.setdefault(key, now)
            if key not in self.fired and now - since >= hold:
                alert = Alert(
                    alert_id=f"health-{key}-{int(since)}",
                    camera=camera,
                    kind=kind,
                    severity=severity,
                    message=message,
                    created_at=now,
                )
                self.fired[key] = alert
                out.append(alert)
        for key in [k for k in self.since if k not in observed]:
            del self.since[key]
            fired = self.fired.pop(key, None)
            if fired is not None:
                out.append(
                    msgspec.structs.replace(
                        fired,
                        alert_id=fired.alert_id + "-resolved",
                        state="resolved",
                        severity="info",
                        message=f"resolved: {fired.message}",
                        created_at=now,
                    )
                )
        return out


class BacklogTrend:
    """Per stage: is the backlog growing for `window` seconds - larger now than `window` ago, and never
    back down to that level in between? A stage that keeps up dips to its baseline; a stuck or
    overwhelmed one does not."""

    def __init__(self) -> None:
        self.samples: dict[str, deque[tuple[float, int]]] = {}

    def add(self, stage: str, now: float, backlog: int, window: float) -> bool:
        samples = self.samples.setdefault(stage, deque())
        samples.append((now, backlog))
        while len(samples) >= 2 and samples[1][0] <= now - window:
            samples.popleft()  # keep exactly one sample at least `window` old: the baseline
        start, base = samples[0]
        if now - start < window:
            return False
        return backlog > base and all(b > base for _, b in list(samples)[1:])


# A disk alert clears only this many points above its threshold, so free space hovering at the line
# does not fire and resolve at every check.
DISK_HYSTERESIS_PCT = 2.0
# Leader elections take a few seconds: only a stream leaderless for longer than this alerts.
NO_LEADER_HOLD_SECONDS = 15.0


def service_down_key(s: ServiceStatus, active: frozenset[str]) -> str:
    """One outage, one alert: an instance that goes stale and then expires from the heartbeat bucket
    turns from `aggregator.box` into `aggregator.*` (no instance at all), or back after health restarts
    and finds the stale entry again. While one of those two keys is firing, the other is the same outage."""
    key = f"service_down:{s.key}"
    if key in active:
        return key
    if s.instance is None:
        same = [k for k in active if k.startswith(f"service_down:{s.service}.")]
        return same[0] if len(same) == 1 else key
    anyone = f"service_down:{s.service}.*"
    return anyone if anyone in active else key


def observe(
    snap: Snapshot,
    state: HealthState,
    config: Config,
    trend: BacklogTrend,
    now: float,
    active: frozenset[str] = frozenset(),
) -> dict[str, tuple[str, str, str, str, float]]:
    """Which alert conditions hold in this snapshot (`active`: the ones held at the previous check)."""
    h = config.health
    out: dict[str, tuple[str, str, str, str, float]] = {}
    for s in snap.services:
        if s.verdict in ("down", "stale"):
            out[service_down_key(s, active)] = (
                "service_down",
                "system",
                "critical",
                f"{s.key} is {s.verdict}: {s.reason}",
                h.down_alert_seconds,
            )
        if s.service == "detector" and s.verdict == "degraded" and "cpu fallback" in (s.backend or ""):
            out[f"detector_cpu_fallback:{s.key}"] = (
                "detector_cpu_fallback",
                "system",
                "warning",
                f"{s.key}: {s.backend}",
                0.0,
            )
        if s.service == "watcher" and s.verdict not in ("down", "stale"):
            for camera, detail in s.unreadable.items():  # held while the watcher still cannot read them
                out[f"camera_unreadable:{camera}"] = ("camera_unreadable", camera, "warning", detail, 0.0)
    for st in snap.stages:
        if trend.add(st.consumer, now, st.backlog, h.backlog_alert_seconds) and st.backlog >= h.backlog_min:
            out[f"backlog_growing:{st.consumer}"] = (
                "backlog_growing",
                "system",
                "warning",
                f"stage {st.consumer}: backlog {st.backlog} and growing for {h.backlog_alert_seconds:.0f}s"
                f" (oldest unacked {st.oldest_unacked_s:.0f}s)",
                0.0,
            )
    for st in snap.streams:  # NATS cluster: a stream without a leader stops; a lagging replica is one failure from that
        if st.replicas and st.leader is None:
            out[f"stream_no_leader:{st.name}"] = (
                "stream_no_leader",
                "system",
                "critical",
                f"stream {st.name} has no leader",
                NO_LEADER_HOLD_SECONDS,
            )
        if st.lagging:
            out[f"replica_lagging:{st.name}"] = (
                "replica_lagging",
                "system",
                "warning",
                f"stream {st.name}: replicas {', '.join(st.lagging)} offline or behind leader {st.leader}",
                h.down_alert_seconds,
            )
    for d in snap.disks:
        key = f"disk_low:{d.path}"
        if d.free_pct < h.disk_low_percent + (DISK_HYSTERESIS_PCT if key in active else 0.0):
            out[key] = (
                "disk_low",
                "system",
                "critical",
                f"{d.path}: {d.free_pct:.1f}% free ({d.free_bytes // 2**20} MiB), below {h.disk_low_percent}%",
                0.0,
            )
    for camera, last in state.cameras.items():
        limit = h.cameras.get(camera, h.camera_silent_seconds)
        if limit > 0 and now - last > limit:
            out[f"camera_silent:{camera}"] = (
                "camera_silent",
                camera,
                "warning",
                f"camera {camera}: nothing uploaded for {now - last:.0f}s",
                0.0,
            )
    for camera, mtime in state.clock_suspect.items():  # holds while the camera's latest upload has a wrong clock
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mtime)) if mtime else "?"
        out[f"camera_clock:{camera}"] = (
            "camera_clock",
            camera,
            "warning",
            f"camera {camera}: clock not plausible (file dated {when} UTC); arrival times are used",
            0.0,
        )
    return out


def camera_folders(media_root: str, prefix: str = "") -> list[str]:
    """The camera ids of the media root's folders, as the watcher takes them (prefix + folder name,
    when that is a valid id), never following symlinks. Blocking: call in a thread (the root may be a network mount)."""
    from services.watcher.files import camera_id

    with contextlib.suppress(OSError), os.scandir(media_root) as it:
        ids = (camera_id(e.name, prefix) for e in it if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
        return [c for c in ids if c is not None]  # other folders are refused by the watcher, visibly
    return []


def seed_from_database(config: Config) -> tuple[dict[str, float], list[dict]]:
    """Last upload per camera and the latest events, from PostgreSQL (blocking; None-safe: health runs
    without a database, it just starts with nothing remembered)."""

    with database.connect(config, "health", timeout=3) as conn:
        cams = conn.execute(
            "SELECT camera, extract(epoch from max(captured_at)) FROM detections GROUP BY camera"
        ).fetchall()
        events = conn.execute(
            "SELECT event_id, camera, extract(epoch from started_at), extract(epoch from ended_at), labels"
            " FROM events ORDER BY started_at DESC LIMIT 20"
        ).fetchall()
    return (
        {c: float(t) for c, t in cams if t is not None},
        [
            {
                "event_id": e[0],
                "camera": e[1],
                "started_at": float(e[2]),
                "ended_at": float(e[3]),
                "labels": sorted(e[4] or {}),
            }
            for e in reversed(events)
        ],
    )


async def run(config: Config) -> None:
    h = config.health
    state = HealthState(config)
    try:
        seen, events = await asyncio.to_thread(seed_from_database, config)
        state.cameras.update(seen)
        state.events.extend(events)
    except Exception as exc:  # noqa: BLE001 - no database (yet) is fine: camera clocks start now
        state.seed_error = repr(exc)
    runner = await start_http(state, h.http_host, h.http_port) if h.http_port else None
    try:
        async with Runtime.start("health", config) as rt:
            if state.seed_error:
                rt.log.info("no database history: camera silence counted from now", error=state.seed_error)
            if runner:
                rt.log.info("http listening", url=f"http://{h.http_host}:{h.http_port}/")
            await subscribe(rt, state)
            webhook_queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=1000)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(check_loop(rt, config, state, webhook_queue))
                if h.webhook_url:
                    tg.create_task(webhook_loop(rt, config, webhook_queue))
    finally:
        if runner is not None:
            await runner.cleanup()


async def subscribe(rt: Runtime, state: HealthState) -> None:
    """Plain (non-durable) subscriptions: health only observes, it must never hold messages back."""

    async def on_message(msg) -> None:
        try:
            value = proto.decode(msg.data, msg.headers)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            return
        state.observe(value)

    for subj in HEALTH_OBSERVES:
        await rt.nc.subscribe(subj, cb=on_message, pending_msgs_limit=65536)


RETRY_SCAN_SECONDS = 30.0  # how often the DLQ is looked at for letters due an automatic retry (at most 10 checks)


def healthy_services(snap: Snapshot) -> set[str]:
    """Services with at least one healthy instance and none down or stale: their letters may go back."""
    by_service: dict[str, list[str]] = {}
    for s in snap.services:
        by_service.setdefault(s.service, []).append(s.verdict)
    return {name for name, v in by_service.items() if "healthy" in v and not {"down", "stale"} & set(v)}


async def check_loop(rt: Runtime, config: Config, state: HealthState, webhook_queue: asyncio.Queue) -> None:
    conditions, trend = Conditions(), BacklogTrend()
    kv = await rt.js.key_value(HEALTH_BUCKET)
    with contextlib.suppress(*jetstream.TRANSIENT, msgspec.DecodeError, msgspec.ValidationError):
        entry = await kv.get(CONDITIONS_KEY)
        if entry.value:
            conditions.load(entry.value)
            rt.log.info("alert state restored", held=len(conditions.since), firing=len(conditions.fired))
    saved = conditions.dump()
    gone: dict[str, float] = {}
    verdicts: dict[str, str] = {}
    book = RetryBook(config.health.dlq_retry_seconds, config.health.dlq_retry_max)
    next_retry_scan = 0.0
    while not rt.stopping.is_set():
        now = time.time()
        for camera in await asyncio.to_thread(camera_folders, config.media_root, config.watcher.camera_prefix):
            state.cameras.setdefault(camera, state.started_at)
        try:
            snap = await asyncio.wait_for(
                snapshot(rt.nc, config, now, gone), timeout=max(10.0, config.health.check_seconds)
            )
        except (TimeoutError, *jetstream.TRANSIENT) as exc:
            rt.note_error(f"snapshot failed: {exc!r}")
            rt.log.warning("snapshot failed", error=repr(exc))
        else:
            for s in snap.services:  # remember instances, so one whose heartbeat expires stays visible as down
                if s.instance is not None and s.state is not None:
                    gone[s.key] = now
            live = {s.key for s in snap.services if s.state is not None}
            for key in [k for k, t in gone.items() if k not in live and now - t > FORGET_GONE_SECONDS]:
                del gone[key]
            changes = []
            for s in snap.services:
                if verdicts.get(s.key) != s.verdict:
                    changes.append(
                        HealthChanged(
                            service=s.service,
                            instance=s.instance,
                            previous=verdicts.get(s.key),
                            verdict=s.verdict,
                            reason=s.reason,
                            changed_at=now,
                        )
                    )
                    verdicts[s.key] = s.verdict
            for key in [k for k in verdicts if k not in {s.key for s in snap.services}]:
                del verdicts[key]  # forgotten instance
            alerts = conditions.update(observe(snap, state, config, trend, now, frozenset(conditions.since)), now)
            for c in changes:
                rt.log.info(
                    "verdict",
                    service=c.service,
                    instance=c.instance,
                    previous=c.previous,
                    verdict=c.verdict,
                    reason=c.reason,
                )
            for a in alerts:
                rt.log.warning("alert", kind=a.kind, state=a.state, camera=a.camera, message=a.message)
            await rt.bus.publish_many(
                [
                    (subject("health", c.service), c, f"health-{c.service}-{c.instance}-{c.verdict}-{int(now * 1000)}")
                    for c in changes
                ]
                + [(subject("alerts", a.camera), a, a.alert_id) for a in alerts],
            )
            dumped = conditions.dump()
            if dumped != saved:  # put after the alerts are durable in ALERTS
                with contextlib.suppress(*jetstream.TRANSIENT):
                    await kv.put(CONDITIONS_KEY, dumped)
                    saved = dumped
            rt.count("verdict_changes", len(changes))
            rt.count("alerts", len(alerts))
            for a in alerts:
                with contextlib.suppress(asyncio.QueueFull):  # a dead webhook must not grow memory without bound
                    webhook_queue.put_nowait(a)
            state.update(snap, conditions.fired)
            rt.status_extra = state.summary()
            if config.health.dlq_retry_seconds > 0 and time.monotonic() >= next_retry_scan:
                next_retry_scan = time.monotonic() + min(RETRY_SCAN_SECONDS, 10 * config.health.check_seconds)
                try:
                    await book.scan(rt.js)
                    retried = await book.retry_due(rt.js, now, healthy_services(snap), rt.log)
                    rt.count("dead_letters_retried", retried)
                except jetstream.TRANSIENT as exc:
                    rt.log.warning("automatic dead-letter retry failed; trying again later", error=repr(exc))
        rt.beat("check")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(rt.stopping.wait(), timeout=config.health.check_seconds)


async def webhook_loop(rt: Runtime, config: Config, queue: asyncio.Queue) -> None:
    """POST each alert as JSON; retried with exponential backoff (stamina), then logged and dropped -
    the alert itself is already durable in the ALERTS stream and PostgreSQL."""
    import aiohttp
    import stamina

    h = config.health
    rt.beat("webhook")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=h.webhook_timeout)) as session:
        while not rt.stopping.is_set():
            try:
                alert = await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                rt.beat("webhook")
                continue
            body = msgspec.json.encode(alert)
            try:
                async for attempt in stamina.retry_context(
                    on=(aiohttp.ClientError, asyncio.TimeoutError),
                    attempts=h.webhook_attempts,
                    wait_initial=0.5,
                    wait_max=30.0,
                ):
                    with attempt:
                        rt.keepalive()
                        async with session.post(
                            h.webhook_url, data=body, headers={"Content-Type": "application/json"}
                        ) as resp:
                            resp.raise_for_status()
                rt.count("webhooks_sent")
            except (TimeoutError, aiohttp.ClientError) as exc:
                rt.count("webhooks_failed")
                rt.note_error(f"webhook failed for {alert.alert_id}: {exc!r}")
                rt.log.error("webhook failed", alert=alert.alert_id, error=repr(exc))
            rt.beat("webhook")
