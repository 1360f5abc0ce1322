"""aggregator: Detections -> EventClosed (+ one fast-path Alert per event).

Grouping rules and the contract are in services/aggregator/grouping.py. This module does the I/O, in an order that
makes a crash at any point harmless:

1. Detections wait unacked in the reorder buffer until they may be grouped (a crash redelivers them).
2. A commit computes the touched cameras' new state on copies, with the event revisions and alerts to
   publish in the state's outbox, and writes that state to KV (`cam.<camera>`) first.
3. Then it publishes the outbox (Nats-Msg-Id `<event_id>-r<revision>` and the alert id, so a repeat
   dedupes), writes the events to the index bucket, clears the outbox in KV, and only then acks.
4. Memory takes the new state only after all of that worked. After any failure it is reloaded from KV
   before the next commit, and it is replaced only by a reload that succeeded.
A restart loads the state and re-publishes whatever an outbox still holds, so a crash between any two
steps gives the same events, the same revisions and at most one alert per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from typing import TypeVar

import msgspec
import nats.js.errors
from nats.aio.msg import Msg

from proto import Alert, Detections, LabelSummary, subject
from proto.topology import AGGREGATOR_STATE_BUCKET, EVENT_INDEX_BUCKET, consumer
from services.aggregator.grouping import (
    CameraState,
    EventState,
    Held,
    ReorderBuffer,
    Rules,
    add_to,
    dirty,
    group_in_order,
    late_window,
    new_event,
    place_late,
)
from services.runtime import jetstream
from services.runtime.config import Config
from services.runtime.service import Runtime

S = TypeVar("S", bound=msgspec.Struct)
STAGE = "aggregator"
STATE_PREFIX = "cam."
_state_codec = (msgspec.json.Encoder(), msgspec.json.Decoder(CameraState))
_event_decoder = msgspec.json.Decoder(EventState)
INDEX_CACHE = 10_000  # events kept in memory for late detections (the rest are read from the index bucket)
TICK = 0.25  # seconds between reorder/quiet checks


STATE_BUDGET = 256 * 1024  # bytes of a camera's state (with its outbox) after which a commit stops taking more


def state_bytes(state: CameraState, changed: dict[str, EventState]) -> int:
    """A generous estimate of the camera state's JSON size once `changed` is in its outbox."""
    events = list(changed.values()) + ([state.current] if state.current is not None else [])
    return sum(
        300 + 50 * len(ev.keys) + 60 * len(ev.labels) + 40 * len(ev.spots) + 60 * len(ev.best_boxes) for ev in events
    )


class _LegacyOpen(msgspec.Struct):
    event_id: str
    camera: str
    started_at: float
    last_at: float
    file_ids: list[str]
    labels: dict[str, LabelSummary]
    best_file_id: str
    best_score: float
    alerted: bool = False


class _Legacy(msgspec.Struct):
    open: _LegacyOpen | None = None


def from_legacy(value: bytes) -> CameraState | None:
    """The state the previous aggregator kept under the bare camera name (an open event and a ring of
    keys), as today's: its open event becomes the current one, so an upgrade loses no event."""
    try:
        old = msgspec.json.decode(value, type=_Legacy)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if old.open is None:
        return CameraState()
    o = old.open
    current = EventState(
        event_id=o.event_id,
        camera=o.camera,
        started_at=o.started_at,
        ended_at=o.last_at,
        keys=list(o.file_ids),
        labels=o.labels,
        best_file_id=o.best_file_id,
        best_score=o.best_score,
        alerted=o.alerted,
    )
    return CameraState(current=current, sealed_t=o.last_at, sealed_key="\uffff")  # everything up to last_at was grouped


def index_key(ev: EventState) -> str:
    return f"{ev.camera}.{int(ev.started_at // 3600)}.{ev.event_id}"


def deep_copy(value: S) -> S:
    """A copy sharing nothing with `value` (a commit changes copies; memory keeps the originals)."""
    return msgspec.json.decode(msgspec.json.encode(value), type=type(value))


class Aggregator:
    def __init__(self, rt: Runtime, config: Config, kv, index) -> None:
        cfg = config.aggregator
        self.rt, self.kv, self.index = rt, kv, index
        self.rules = Rules(cfg.idle_seconds, cfg.max_seconds, cfg.max_detections, cfg.alert_label, cfg.alert_score)
        cap = max(consumer("aggregator").max_ack_pending - 2 * cfg.batch_size, cfg.batch_size)
        self.buffer = ReorderBuffer(cfg.reorder_window, cfg.reorder_seconds, cap)
        self.cameras: dict[str, CameraState] = {}
        self.cache: OrderedDict[str, EventState] = OrderedDict()  # event_id -> latest known state
        self.last_change: dict[str, float] = {}  # camera -> monotonic time its current event last changed
        self.needs_reload = False
        self.max_seen_seq = 0  # highest DETECTIONS stream sequence handed to handle_batch
        self.lock = asyncio.Lock()  # batches and the tick both change the state
        self.in_commit: list[Held] = []  # released, not yet acked (kept alive by keepalive_loop)

    # ---- state ---------------------------------------------------------------------------------
    async def load_state(self) -> None:
        """Read every camera's state; replace memory only if the whole read worked."""
        loaded: dict[str, CameraState] = {}
        for key in await jetstream.kv_keys(self.rt.nc, AGGREGATOR_STATE_BUCKET):
            try:
                entry = await self.kv.get(key)
            except (nats.js.errors.KeyDeletedError, nats.js.errors.KeyNotFoundError):
                continue
            if not entry.value:
                continue
            if key.startswith(STATE_PREFIX):
                loaded[key.removeprefix(STATE_PREFIX)] = _state_codec[1].decode(entry.value)
            elif key not in loaded and (legacy := from_legacy(entry.value)) is not None:
                loaded[key] = legacy  # written by the previous aggregator (key = camera): its open event goes on
        self.cameras = loaded
        self.cache.clear()
        now = time.monotonic()
        self.last_change = {c: self.last_change.get(c, now) for c in loaded}
        self.rt.log.info(
            "state loaded", cameras=len(loaded), current_events=sum(1 for s in loaded.values() if s.current)
        )

    async def flush_outboxes(self) -> None:
        """After a restart: publish what a commit wrote but may not have published."""
        pending = {c: s for c, s in self.cameras.items() if s.outbox or s.outbox_alerts}
        if pending:
            self.rt.log.info("re-publishing outboxes of the previous run", cameras=len(pending))
            await self.publish_and_clear(pending)

    # ---- intake --------------------------------------------------------------------------------
    async def handle_batch(self, msgs: list[Msg]) -> None:
        now = time.monotonic()
        for msg in msgs:
            if msg.reply:
                self.max_seen_seq = max(self.max_seen_seq, msg.metadata.sequence.stream)
            det = jetstream.decode_as(msg, Detections)
            if isinstance(det, str):
                await self.rt.bus.dead_letter(STAGE, msg, det)
                continue
            if not det.boxes:  # nothing to group: the recorder keeps it, events never see it
                with contextlib.suppress(*jetstream.TRANSIENT):
                    await msg.ack()
                self.rt.count("grouped")
                continue
            self.buffer.add(det, msg, now)
        self.rt.counters["held"] = len(self.buffer)
        await self.step()

    def held_sequences(self) -> set[int]:
        """The DETECTIONS stream sequences this process holds unacked (a redelivery is the same one)."""
        # an acked (or naked, termed) copy is no longer the server's to count: counting it would hide one
        # that a killed predecessor still holds
        return {
            m.metadata.sequence.stream for held in self.buffer.all() for m in held.msgs if m.reply and not m.is_acked
        }

    async def caught_up(self) -> bool:
        """Nothing left upstream that could still bring an earlier detection: the detectors hold no
        upload (pending or unacked), everything the server delivered to us has reached the buffer, and
        every detection the server counts as unacked is one we hold (not one a killed predecessor held,
        waiting for its redelivery). The detector is asked first: an upload it acks after that point was
        published to DETECTIONS before the ack, so the second question sees it. Call it with the lock
        held: then nothing leaves the buffer meanwhile, and what arrives meanwhile is only ever counted
        against us (the server counted it too, or it came after)."""
        mine = len(self.held_sequences())
        try:
            det = consumer("detector")
            upstream = await self.rt.js.consumer_info(det.stream, det.durable)
            if upstream.num_pending or upstream.num_ack_pending:
                return False
            own = consumer("aggregator")
            info = await self.rt.js.consumer_info(own.stream, own.durable)
        except (*jetstream.TRANSIENT, nats.js.errors.NotFoundError):
            return False
        delivered = info.delivered.stream_seq if info.delivered else 0
        return not info.num_pending and self.max_seen_seq >= (delivered or 0) and (info.num_ack_pending or 0) <= mine

    async def tick_loop(self) -> None:
        self.rt.beat("tick")
        while not self.rt.stopping.is_set():
            # what is held before the question is asked: a detection that arrives while it is being
            # answered may have an earlier one still on its way, and must wait for the next tick
            async with self.lock:
                held_before = self.buffer.latest()
                caught_up = bool(held_before) and await self.caught_up()
            await self.step(caught_up_to=held_before if caught_up else None, quiet=True)
            self.rt.beat("tick")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), timeout=TICK)

    async def keepalive_loop(self) -> None:
        """in_progress() for every message held longer than a third of ack_wait, including those of a
        commit that is waiting out the server (no lock: a slow commit must not let them expire)."""
        ack_wait = consumer("aggregator").ack_wait
        self.rt.beat("keepalive")
        while not self.rt.stopping.is_set():
            now = time.monotonic()
            stale = self.buffer.stale(now, ack_wait / 3)
            for held in list(self.in_commit):
                if now - held.touched >= ack_wait / 3:
                    held.touched = now
                    stale.append(held)
            for held in stale:
                for m in held.msgs:
                    with contextlib.suppress(*jetstream.TRANSIENT):
                        await m.in_progress()
            self.rt.beat("keepalive")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), timeout=1.0)

    # ---- grouping ------------------------------------------------------------------------------
    async def step(self, caught_up_to: dict | None = None, quiet: bool = False) -> None:
        """Group what may be grouped now. `caught_up_to`: per camera, the latest detection held when the
        caught-up check began; those (and everything before them) may all go."""
        async with self.lock:
            if self.needs_reload:
                try:
                    await self.load_state()
                    await self.flush_outboxes()
                    self.needs_reload = False  # only now: an outbox not yet published must never be built upon
                except Exception as exc:  # noqa: BLE001 - any failure: keep the old memory, try again later
                    self.rt.log.warning("state reload failed, holding detections", error=repr(exc))
                    self.rt.keepalive()
                    return
            released = self.buffer.release(time.monotonic(), caught_up_to)
            self.in_commit = released
            if not released and not (quiet and self.quiet_cameras()):
                return
            try:
                await self.commit(released, quiet)
            except Exception as exc:  # noqa: BLE001 - sorted below: transient (retried) or a bug (dead-lettered)
                self.needs_reload = True
                if jetstream.is_transient(exc):
                    self.rt.log.warning("commit failed, will retry", held=len(released), error=repr(exc))
                    self.rt.note_error(f"commit failed: {exc!r}")
                    self.buffer.put_back(released)
                    return
                # no retry can fix it (it would be a bug: every state and message is bounded): do not
                # wedge the stage on it, dead-letter what this commit held
                self.rt.log.error("commit failed permanently, dead-lettering its detections", error=repr(exc))
                for held in released:
                    for m in held.msgs:
                        await self.rt.bus.dead_letter(
                            STAGE,
                            m,
                            f"could not be grouped: {exc!r}"[:500],
                            camera=held.det.camera,
                            file_id=held.det.file_id,
                        )
            finally:
                self.in_commit = []

    def quiet_cameras(self) -> list[str]:
        """Cameras whose current event changed, then nothing arrived for idle_seconds (monotonic)."""
        now = time.monotonic()
        return [
            c
            for c, s in self.cameras.items()
            if s.current is not None
            and dirty(s.current)
            and not self.buffer.holds(c)
            and now - self.last_change.get(c, now) >= self.rules.idle
        ]

    async def commit(self, released: list[Held], quiet: bool) -> None:
        wall = time.time()
        work: dict[str, CameraState] = {}
        changed: dict[str, dict[str, EventState]] = {}  # camera -> event_id -> event to publish
        keysets: dict[str, set[str]] = {}  # event_id -> its keys, for the duplicate check
        for i, held in enumerate(released):
            det = held.det
            state = work.get(det.camera)
            if state is None:
                state = work[det.camera] = deep_copy(self.cameras.get(det.camera) or CameraState())
            if state_bytes(state, changed.get(det.camera, {})) > STATE_BUDGET:
                # this commit's outbox is big enough (late detections revising large events): the rest
                # waits for the next commit, so no KV value or message nears NATS's 1 MiB max_payload
                self.buffer.put_back(released[i:])
                del released[i:]  # in place: the caller's list is what was committed
                break
            sealed = state.sealed()
            current_keys = None
            if state.current is not None:
                current_keys = keysets.get(state.current.event_id)
                if current_keys is None:
                    current_keys = keysets[state.current.event_id] = set(state.current.keys)
            if current_keys is not None and det.key in current_keys:
                self.rt.count("duplicates")  # the same file again with another time (touched, re-uploaded)
                alert = None
            elif sealed is None or (det.captured_at, det.key) > sealed:
                cut, alert = group_in_order(state, det, self.rules, wall)
                if cut is not None and dirty(cut):
                    changed.setdefault(det.camera, {})[cut.event_id] = cut
            else:
                alert = await self.late(state, det, changed.setdefault(det.camera, {}), wall)
            if alert is not None:
                state.outbox_alerts.append(alert)
            if state.current is not None:
                keysets.setdefault(state.current.event_id, set(state.current.keys)).add(det.key)
            self.last_change[det.camera] = time.monotonic()
        if quiet:
            for camera in self.quiet_cameras():
                if camera not in work:
                    work[camera] = deep_copy(self.cameras[camera])
                state = work[camera]
                if state.current is not None and dirty(state.current):
                    changed.setdefault(camera, {})[state.current.event_id] = state.current
        for camera, events in changed.items():
            for ev in events.values():
                ev.published = ev.revision  # in the outbox, written before it is published
                work[camera].outbox.append(ev)
        if not work:
            return
        # 1. the intent, durable first
        await self.put_states(work)
        # 2-3. publish, index, clear the outbox
        await self.publish_and_clear(work)
        for events in changed.values():
            for ev in events.values():
                self.remember(ev)
        # 4. only now is a detection's grouping durable: ack
        acks = [m.ack() for held in released for m in held.msgs]
        await asyncio.gather(*acks, return_exceptions=True)  # a lost ack is a redelivery, recognised as a duplicate
        self.cameras.update(work)
        self.rt.count("grouped", len(released))
        self.rt.counters["held"] = len(self.buffer)

    async def late(
        self, state: CameraState, det: Detections, changed: dict[str, EventState], wall: float
    ) -> Alert | None:
        """A detection earlier than the camera's grouping point (services/aggregator/grouping.py: place_late)."""
        candidates = await self.candidates(state, det, changed)
        where, ev = place_late(det, candidates, self.rules)
        if where == "duplicate":
            self.rt.count("duplicates")
            return None
        self.rt.count("late")
        # beyond the reorder bound (re-published, retried from the DLQ, or a detector that kept crashing
        # on it): it joins the right files, but an event it would have started keeps its published id
        sealed = state.sealed()
        self.rt.log.info(
            "late detection",
            camera=det.camera,
            file_id=det.file_id,
            placed=where,
            event_id=ev.event_id if ev is not None else None,
            behind_seconds=round(sealed[0] - det.captured_at, 3) if sealed else None,
        )
        if ev is None:
            ev = new_event(det)
        is_current = state.current is not None and state.current.event_id == ev.event_id
        if not is_current:  # an event already cut: change a copy (memory holds until the commit worked), publish it now
            ev = changed.get(ev.event_id) or deep_copy(ev)
            changed[ev.event_id] = ev
        alert = add_to(ev, det, self.rules, wall)
        return alert

    async def candidates(self, state: CameraState, det: Detections, changed: dict[str, EventState]) -> list[EventState]:
        lo, hi = late_window(det.captured_at, self.rules)
        found: dict[str, EventState] = {}
        for hour in range(int(lo // 3600), int(hi // 3600) + 1):
            for ev in await self.read_index(f"{det.camera}.{hour}.*"):
                cached = self.cache.get(ev.event_id)
                if cached is not None and cached.revision > ev.revision:
                    ev = cached
                if ev.event_id not in found or ev.revision > found[ev.event_id].revision:
                    found[ev.event_id] = ev
        found.update(changed)  # this commit's versions are the newest
        if state.current is not None:
            found[state.current.event_id] = state.current
        return [ev for ev in found.values() if lo <= ev.started_at <= hi]

    async def read_index(self, pattern: str) -> list[EventState]:
        """The index entries under one camera and hour (jetstream.kv_keys: listing keys creates no consumer)."""
        out = []
        for key in await jetstream.kv_keys(self.rt.nc, EVENT_INDEX_BUCKET, pattern):
            try:
                entry = await self.index.get(key)
            except (nats.js.errors.KeyDeletedError, nats.js.errors.KeyNotFoundError):
                continue  # expired or deleted since it was listed
            if entry.value:
                out.append(_event_decoder.decode(entry.value))
        return out

    def remember(self, ev: EventState) -> None:
        self.cache[ev.event_id] = ev
        self.cache.move_to_end(ev.event_id)
        while len(self.cache) > INDEX_CACHE:
            self.cache.popitem(last=False)

    async def put_states(self, states: dict[str, CameraState]) -> None:
        timeout = self.rt.config.nats.publish_timeout
        await asyncio.wait_for(
            asyncio.gather(*(self.kv.put(STATE_PREFIX + c, _state_codec[0].encode(s)) for c, s in states.items())),
            timeout,
        )

    async def publish_and_clear(self, states: dict[str, CameraState]) -> None:
        events = [e for s in states.values() for e in s.outbox]
        alerts = [a for s in states.values() for a in s.outbox_alerts]
        if not events and not alerts:
            return
        await self.rt.bus.publish_many(
            [(subject("alerts", a.camera), a, a.alert_id) for a in alerts]
            + [(subject("events", e.camera), e.message(), f"{e.event_id}-r{e.revision}") for e in events],
        )
        timeout = self.rt.config.nats.publish_timeout
        await asyncio.wait_for(
            asyncio.gather(*(self.index.put(index_key(e), msgspec.json.encode(e)) for e in events)), timeout
        )
        for s in states.values():
            s.outbox, s.outbox_alerts = [], []
        await self.put_states(states)
        self.rt.count("events", len(events))
        self.rt.count("alerts", len(alerts))


async def wait_for_redeliveries(rt: Runtime) -> int:
    """After an unclean stop, let the detections the last run held come back before anything is grouped.

    They are redelivered once their ack_wait expires; grouping newer detections first would make
    them late (they would still land in the right event, but the reorder guarantee would be spent).
    Returns the highest stream sequence the server had delivered: everything up to it was either acked
    by the last run or is counted unacked (which caught_up checks), so this run need not see it again.
    """
    spec = consumer("aggregator")
    info = await rt.js.consumer_info(spec.stream, spec.durable)
    delivered = info.delivered.stream_seq if info.delivered else 0
    if info.num_ack_pending:
        rt.log.info(
            "waiting for unacked detections of the previous run", unacked=info.num_ack_pending, seconds=spec.ack_wait
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(rt.stopping.wait(), timeout=spec.ack_wait + 1.0)
    return delivered or 0


async def run(config: Config) -> None:
    async with Runtime.start("aggregator", config) as rt:
        aggregator = Aggregator(
            rt, config, await rt.js.key_value(AGGREGATOR_STATE_BUCKET), await rt.js.key_value(EVENT_INDEX_BUCKET)
        )
        await rt.bus.retry("load state", aggregator.load_state)
        await rt.bus.retry("re-publish outboxes", aggregator.flush_outboxes)
        aggregator.max_seen_seq = await wait_for_redeliveries(rt)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                rt.bus.consume("aggregator", aggregator.handle_batch, config.aggregator.batch_size, 1.0, stage=STAGE)
            )
            tg.create_task(aggregator.tick_loop())
            tg.create_task(aggregator.keepalive_loop())
            tg.create_task(rt.bus.exhausted_loop("aggregator", STAGE))
