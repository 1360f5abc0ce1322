"""aggregator: Detections -> EventClosed (+ Alert on the fast path).

Crash safety: per batch, closed events and alerts are published (PubAck awaited), then the state of
every touched camera is written to a JetStream KV bucket, and only then are the detections acked.
After a `kill -9` the state is reloaded, redelivered detections are recognised by file id, and a
re-published event carries the same deterministic id as `Nats-Msg-Id`, so it lands exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import nats.js.errors
from nats.aio.msg import Msg

from proto import Detections, subject
from proto.topology import AGGREGATOR_STATE_BUCKET, consumer
from services.events import CameraState, EventGrouper
from services.runtime import bus
from services.runtime.config import Config
from services.runtime.service import Runtime

STAGE = "aggregator"
_state_decoder = msgspec.json.Decoder(CameraState)


class Aggregator:
    def __init__(self, rt: Runtime, config: Config, kv) -> None:
        cfg = config.aggregator
        self.rt = rt
        self.kv = kv
        self.grouper = EventGrouper(cfg.idle_seconds, cfg.max_seconds, cfg.alert_label, cfg.alert_score)
        self.lock = asyncio.Lock()  # the batch handler and the idle timer both change the grouper

    async def load_state(self) -> None:
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return
        for key in keys:
            entry = await self.kv.get(key)
            if entry.value:
                self.grouper.cameras[key] = _state_decoder.decode(entry.value)
        self.rt.log.info("state loaded", cameras=len(self.grouper.cameras), open_events=sum(1 for s in self.grouper.cameras.values() if s.open))

    async def emit(self, closed, alerts, cameras: set[str]) -> None:
        """Publish results and persist the touched cameras' state, in that order."""
        await bus.publish_many(
            self.rt,
            [(subject("events", e.camera), e, e.event_id) for e in closed]
            + [(subject("alerts", a.camera), a, a.alert_id) for a in alerts],
        )
        for camera in cameras:
            value = msgspec.json.encode(self.grouper.cameras[camera])
            await bus.retry(self.rt, f"kv put {camera}", lambda: self.kv.put(camera, value))
        self.rt.count("events", len(closed))
        self.rt.count("alerts", len(alerts))

    async def handle_batch(self, msgs: list[Msg]) -> None:
        async with self.lock:
            try:
                await self._group(msgs)
            except bus.TRANSIENT:
                # Memory may now be ahead of KV: go back to the durable state, then let the batch retry.
                self.grouper.cameras.clear()
                await self.load_state()
                raise

    async def _group(self, msgs: list[Msg]) -> None:
        closed, alerts, cameras, good = [], [], set(), []
        now = time.time()
        for msg in msgs:
            det = bus.decode_or_none(msg, Detections)
            if det is None:
                await bus.dead_letter(self.rt, STAGE, msg, "payload is not a valid Detections")
                continue
            c, a = self.grouper.add(det, now)
            closed += c
            alerts += a
            if det.boxes:
                cameras.add(det.camera)
            good.append(msg)
        await self.emit(closed, alerts, cameras)
        # A lost ack is a harmless redelivery (recognised by its key), never a reason to crash.
        await asyncio.gather(*(m.ack() for m in good), return_exceptions=True)
        self.rt.count("grouped", len(good))

    async def idle_loop(self) -> None:
        self.rt.beat("idle-timer")
        while not self.rt.stopping.is_set():
            async with self.lock:
                closed = self.grouper.due(time.time())
                if closed:
                    await self.emit(closed, [], {e.camera for e in closed})  # retries until durable
            self.rt.beat("idle-timer")
            try:
                await asyncio.wait_for(self.rt.stopping.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass


async def wait_for_redeliveries(rt: Runtime) -> None:
    """After an unclean stop, let the detections the last run held come back before anything newer.

    They are redelivered once their ack_wait expires; consuming newer detections first would group
    them out of order (and the idle timer would close restored events before they return).
    """
    spec = consumer("aggregator")
    info = await rt.js.consumer_info(spec.stream, spec.durable)
    if info.num_ack_pending:
        rt.log.info("waiting for unacked detections of the previous run", unacked=info.num_ack_pending, seconds=spec.ack_wait)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(rt.stopping.wait(), timeout=spec.ack_wait + 1.0)


async def run(config: Config) -> None:
    async with Runtime.start("aggregator", config) as rt:
        aggregator = Aggregator(rt, config, await rt.js.key_value(AGGREGATOR_STATE_BUCKET))
        await aggregator.load_state()
        await wait_for_redeliveries(rt)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(bus.consume(rt, "aggregator", aggregator.handle_batch, config.aggregator.batch_size, 1.0, stage=STAGE))
            tg.create_task(aggregator.idle_loop())
            tg.create_task(bus.exhausted_loop(rt, "aggregator", STAGE))

