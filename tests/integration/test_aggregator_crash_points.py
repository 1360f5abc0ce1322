"""The aggregator's commit protocol, crashed in-process at every I/O step (real nats-server).

One run without a crash counts the I/O operations (KV puts, index reads and writes, publishes, acks).
Then, for crash points drawn by hypothesis, the process "dies" right before or right after that
operation: its memory is dropped, what it held comes back (nak: what ack_wait would do, sooner), and
a fresh Aggregator loads KV and goes on. The latest revision of every event on EVENTS must equal the
contract, no detection may be in two events, and no event may alert twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time

import nats
import pytest
import structlog
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import proto
from proto.topology import AGGREGATOR_STATE_BUCKET, EVENT_INDEX_BUCKET, consumer
from services.aggregator.grouping import Rules, order, reference_events
from services.aggregator.service import Aggregator
from services.runtime import jetstream, provision
from services.runtime.config import load_config
from services.runtime.service import Runtime
from tests.integration.test_events_contract import make_detections, summary
from tests.unit.test_events import block_shuffle, lateness

RULES = Rules(idle=3.0, max_seconds=20.0, max_detections=6)
# Crash points tried per property (each a real aggregator run against nats-server, ~2.5 s): `just test`
# tries 8 (and 6 timeout pairs, plus the pinned examples), `just test-crash-points` as many as asked.
EXAMPLES = int(os.environ.get("VIGIL_CRASH_EXAMPLES", "8"))


class Crash(BaseException):
    """Not an Exception: nothing in the service may catch it, as nothing catches a SIGKILL."""


class Counter:
    def __init__(self, crash_at: int | None, after: bool) -> None:
        self.n = 0
        self.crash_at, self.after = crash_at, after

    async def around(self, call):
        self.n += 1
        hit = self.n == self.crash_at
        if hit and not self.after:
            raise Crash
        result = await call()
        if hit:
            raise Crash
        return result


class KV:
    """A real KeyValue, every put and get counted as a crash point."""

    def __init__(self, kv, counter: Counter) -> None:
        self._kv, self._c = kv, counter

    async def put(self, key, value):
        return await self._c.around(lambda: self._kv.put(key, value))

    async def get(self, *a, **kw):
        return await self._c.around(lambda: self._kv.get(*a, **kw))

    def __getattr__(self, name):
        return getattr(self._kv, name)


class JS:
    """The real JetStream context; publish_async counted as a crash point."""

    def __init__(self, js, counter: Counter) -> None:
        self._js, self._c = js, counter

    async def publish_async(self, *a, **kw):
        return await self._c.around(lambda: self._js.publish_async(*a, **kw))

    def __getattr__(self, name):
        return getattr(self._js, name)


async def fresh_streams(js, detections) -> None:
    """Fresh streams and buckets (a purge would keep the duplicate windows, which would swallow a run),
    then `detections` published in that order."""
    for stream in ("DETECTIONS", "EVENTS", "ALERTS", f"KV_{AGGREGATOR_STATE_BUCKET}", f"KV_{EVENT_INDEX_BUCKET}"):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)
    await provision.provision(js, structlog.get_logger())
    for d in detections:
        await js.publish(
            proto.subject("detections", d.camera), proto.encode(d), headers=proto.headers_for(d, f"det-{d.key}")
        )


async def scenario(url: str, config, arrivals, crash_at: int | None, after: bool) -> tuple[int, dict, list, int]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await fresh_streams(js, arrivals)
    spec = consumer("aggregator")
    counter = Counter(crash_at, after)
    sub = await js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    crashes = 0
    deadline = time.monotonic() + 60
    agg = None
    given: list = []  # every message handed to the aggregator
    while time.monotonic() < deadline:
        try:
            if agg is None:
                rt = Runtime("aggregator", config, structlog.get_logger())
                rt.nc, rt.js = nc, JS(js, counter)
                agg = Aggregator(
                    rt,
                    config,
                    KV(await js.key_value(AGGREGATOR_STATE_BUCKET), counter),
                    KV(await js.key_value(EVENT_INDEX_BUCKET), counter),
                )
                await agg.load_state()
                await agg.flush_outboxes()
            try:
                fetched = await sub.fetch(3, timeout=0.3)
            except (TimeoutError, nats.errors.TimeoutError):
                fetched = []
            for m in fetched:  # acks are crash points too
                m.ack = (lambda orig: lambda: counter.around(orig))(m.ack)
            given += fetched
            if fetched:
                await agg.handle_batch(fetched)
            else:
                info = await js.consumer_info(spec.stream, spec.durable)
                done = not info.num_pending and not info.num_ack_pending and not len(agg.buffer)
                if done and not any(
                    s.current and s.current.revision > s.current.published for s in agg.cameras.values()
                ):
                    break
                if done:  # the quiet timer's turn (idle_seconds of silence, without the wait)
                    agg.last_change = {c: -1e9 for c in agg.cameras}
                await agg.step(caught_up_to=agg.buffer.latest() if not info.num_pending else None, quiet=done)
        except Crash:
            crashes += 1
            # the process is gone: everything it held unacked comes back (at once, instead of after ack_wait)
            for m in given:
                if not m.is_acked:
                    with contextlib.suppress(Exception):
                        await type(m).nak(m)
            given = []
            agg = None
    else:
        raise AssertionError("the aggregator did not finish")
    latest: dict = {}
    alerts = []
    for name, into in (("EVENTS", None), ("ALERTS", alerts)):
        async for _, raw in jetstream.stored_messages(js, name):
            value = proto.decode(raw.data, raw.headers)
            if into is not None:
                into.append(value.event_id)
            elif value.event_id not in latest or value.revision > latest[value.event_id].revision:
                latest[value.event_id] = value
    await nc.close()
    return counter.n, latest, alerts, crashes


def assert_one_event_per_detection(latest: dict) -> None:
    owners: dict = {}
    for e in latest.values():
        for k in e.file_ids:
            assert k not in owners, f"{k} in {owners[k]} and {e.event_id}"
            owners[k] = e.event_id


@pytest.fixture
def setup(tmp_path, nats_server):
    rng = random.Random(5)
    dets = make_detections(rng, 60, base=time.time() - 3600)
    arrivals = block_shuffle(sorted(dets, key=order), 6, rng)
    (tmp_path / "c.toml").write_text(
        f'[nats]\nservers = ["{nats_server.url}"]\n[aggregator]\nidle_seconds = {RULES.idle}\nmax_seconds = {RULES.max_seconds}\n'
        f"max_detections = {RULES.max_detections}\nreorder_window = {max(1, lateness(arrivals))}\nbatch_size = 3\n"
    )
    config = load_config(tmp_path / "c.toml", environ={})
    ops, latest, _alerts, _ = asyncio.run(scenario(nats_server.url, config, arrivals, None, False))
    want = summary(reference_events(dets, RULES))
    assert summary(latest) == want  # the run without a crash
    return nats_server.url, config, dets, arrivals, ops, want


def test_a_crash_before_or_after_any_io_step_changes_nothing(setup):
    url, config, dets, arrivals, ops, want = setup
    expected_alerts = {eid for eid, e in reference_events(dets, RULES).items() if "person" in e.labels}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(point=st.integers(1, ops), after=st.booleans())
    def check(point, after):
        _, latest, alerts, crashes = asyncio.run(scenario(url, config, arrivals, point, after))
        assert crashes <= 1  # a point past this run's last operation (runs differ by batching) is no crash
        assert summary(latest) == want
        assert_one_event_per_detection(latest)
        assert len(alerts) == len(set(alerts)) and set(alerts) == expected_alerts

    check()


class FlakyKV(KV):
    """KV that times out on chosen puts, and then on the reads of the reload that follows."""

    def __init__(self, kv, counter: Counter, fail_puts: set[int], fail_reads: int, shared: list | None = None) -> None:
        super().__init__(kv, counter)
        self.shared = shared if shared is not None else [0]  # puts counted across the state and index buckets
        self.fail_puts, self.fail_reads = fail_puts, fail_reads
        self.failed_reloads = 0

    @property
    def puts(self) -> int:
        return self.shared[0]

    async def put(self, key, value):
        self.shared[0] += 1
        if self.shared[0] in self.fail_puts:
            raise TimeoutError
        return await self._kv.put(key, value)

    async def get(self, *a, **kw):
        # the state bucket is read only by a reload (keys come from jetstream.kv_keys): a failed read is a failed reload
        if self.fail_reads and self.puts >= min(self.fail_puts) and self.failed_reloads < self.fail_reads:
            self.failed_reloads += 1
            raise TimeoutError
        return await self._kv.get(*a, **kw)


def test_a_failed_reload_never_wipes_the_state(setup, monkeypatch):
    """A commit times out, then the reload after it fails twice: memory is kept (not cleared), nothing
    empty is written to KV, and once KV answers the result is still the contract's."""
    url, config, _dets, arrivals, _ops, want = setup
    made: list[FlakyKV] = []
    real_init = Aggregator.__init__

    def init(self, rt, config, kv, index):
        if isinstance(kv, KV) and not made:
            kv = FlakyKV(kv._kv, kv._c, fail_puts={5, 6}, fail_reads=2)
            made.append(kv)
        real_init(self, rt, config, kv, index)

    monkeypatch.setattr(Aggregator, "__init__", init)
    _, latest, alerts, crashes = asyncio.run(scenario(url, config, arrivals, None, False))
    assert made and made[0].failed_reloads == 2 and crashes == 0
    assert summary(latest) == want
    assert len(alerts) == len(set(alerts))


def test_timeouts_at_any_put_including_the_reload_flush(setup, monkeypatch):
    """Two KV puts time out (the second often the one that re-sends the outbox after a reload): the
    outbox must be published before anything is built on the reloaded state (review finding)."""
    url, config, _dets, arrivals, _ops, want = setup
    real_init = Aggregator.__init__

    @settings(
        max_examples=max(4, EXAMPLES * 3 // 4), deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(first=st.integers(2, 60), gap=st.integers(1, 3))
    @example(first=50, gap=1)  # found by hand: with the flag cleared before the flush these gave wrong events
    @example(first=59, gap=2)
    def check(first, gap):
        made: list[FlakyKV] = []

        def init(self, rt, config, kv, index):
            if isinstance(kv, KV) and not made:
                shared = [0]
                kv = FlakyKV(kv._kv, kv._c, fail_puts={first, first + gap}, fail_reads=0, shared=shared)
                index = FlakyKV(index._kv, index._c, fail_puts={first, first + gap}, fail_reads=0, shared=shared)
                made.append(kv)
            real_init(self, rt, config, kv, index)

        monkeypatch.setattr(Aggregator, "__init__", init)
        _, latest, alerts, _ = asyncio.run(scenario(url, config, arrivals, None, False))
        assert summary(latest) == want
        assert_one_event_per_detection(latest)
        assert len(alerts) == len(set(alerts))

    check()


def test_a_detection_a_killed_predecessor_holds_keeps_the_stage_from_catching_up(tmp_path, nats_server):
    """Chaos finding: an aggregator killed while holding the first detection of an event leaves it
    unacked on the server until ack_wait; a successor that sees only later detections, with the detectors
    idle and nothing pending, must not call itself caught up (it would group the later one first and the
    event would get the wrong id). Only once the held one is back does everything go."""
    (tmp_path / "c.toml").write_text(f'[nats]\nservers = ["{nats_server.url}"]\n[aggregator]\nidle_seconds = 3.0\n')
    config = load_config(tmp_path / "c.toml", environ={})
    rules = Rules(3.0, config.aggregator.max_seconds, config.aggregator.max_detections)
    base = time.time() - 600
    first, later = (
        proto.Detections(
            file_id=f"f{i}",
            camera="front_door",
            path=f"front_door/f{i}.jpg",
            captured_at=base + i,
            width=64,
            height=48,
            model="test",
            inference_ms=1.0,
            boxes=[proto.Box("cat", 0.8, 0, 0, 10, 10)],
        )
        for i in (0, 1)
    )

    async def go():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await fresh_streams(js, [first, later])
        spec = consumer("aggregator")
        predecessor = await js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        (held,) = await predecessor.fetch(1, timeout=2.0)  # the killed process had this one
        rt = Runtime("aggregator", config, structlog.get_logger())
        rt.nc, rt.js = nc, js
        agg = Aggregator(
            rt, config, await js.key_value(AGGREGATOR_STATE_BUCKET), await js.key_value(EVENT_INDEX_BUCKET)
        )
        sub = await js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        await agg.handle_batch(await sub.fetch(1, timeout=2.0))
        assert len(agg.buffer) == 1
        async with agg.lock:
            assert not await agg.caught_up()
        await held.nak()  # its ack_wait ran out: redelivered, now to the successor
        await agg.handle_batch(await sub.fetch(1, timeout=2.0))
        async with agg.lock:
            latest = agg.buffer.latest()
            assert await agg.caught_up()
        await agg.step(caught_up_to=latest)
        agg.last_change = {c: -1e9 for c in agg.cameras}
        await agg.step(quiet=True)
        events = {}
        async for _, raw in jetstream.stored_messages(js, "EVENTS"):
            e = proto.decode(raw.data, raw.headers)
            events[e.event_id] = e
        await nc.close()
        return events

    events = asyncio.run(go())
    assert summary(events) == summary(reference_events([first, later], rules))
