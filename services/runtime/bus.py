"""NATS JetStream plumbing shared by every service: connect, provision, publish, consume, dead-letter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import stamina
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

import proto
from proto.messages import DeadLetter
from proto.topology import AGGREGATOR_STATE_BUCKET, CONSUMERS, STREAMS, ConsumerSpec, StreamSpec, dlq_subject

if TYPE_CHECKING:
    from services.runtime.service import Runtime

T = TypeVar("T")

# Errors worth retrying: the server is away, slow, or refusing for now (e.g. a full stream).
TRANSIENT = (nats.errors.Error, asyncio.TimeoutError, OSError)


async def connect(rt: "Runtime") -> nats.NATS | None:
    """Connect with endless reconnects; keep retrying the first connect until it works or we stop."""
    cfg = rt.config.nats
    log = rt.log

    async def disconnected() -> None:
        log.warning("nats disconnected")

    async def reconnected() -> None:
        log.info("nats reconnected", server=str(nc.connected_url.netloc) if nc.connected_url else None)

    async def error(exc: Exception) -> None:
        log.warning("nats error", error=repr(exc))

    attempt = 0
    while not rt.stopping.is_set():
        try:
            nc = await nats.connect(
                servers=cfg.servers,
                name=f"vigil-{rt.service}",
                connect_timeout=cfg.connect_timeout,
                reconnect_time_wait=cfg.reconnect_wait,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            )
            return nc
        except TRANSIENT as exc:
            attempt += 1
            log.warning("nats not reachable yet, retrying", servers=cfg.servers, attempt=attempt, error=repr(exc))
            try:
                await asyncio.wait_for(rt.stopping.wait(), timeout=min(0.5 * 2**attempt, 5.0))
            except asyncio.TimeoutError:
                pass
    return None


def stream_config(spec: StreamSpec) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy(spec.retention),
        max_age=spec.max_age,
        max_bytes=spec.max_bytes,
        max_msg_size=spec.max_msg_size,
        duplicate_window=spec.duplicate_window,
        discard=DiscardPolicy(spec.discard),
        storage=StorageType.FILE,
        num_replicas=1,
    )


def consumer_config(spec: ConsumerSpec) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=spec.durable,
        description=spec.description,
        filter_subject=spec.filter_subject,
        ack_wait=spec.ack_wait,
        max_deliver=spec.max_deliver,
        max_ack_pending=spec.max_ack_pending,
        backoff=list(spec.backoff) or None,
    )


async def provision(js: JetStreamContext, log) -> None:
    """Create or update every declared stream, consumer and KV bucket. Safe to run concurrently."""
    for spec in STREAMS:
        config = stream_config(spec)
        try:
            await js.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(config)
                log.info("stream created", stream=spec.name)
                continue
            except nats.js.errors.BadRequestError:
                pass  # another service created it a moment ago: fall through to update
        await js.update_stream(config)
    for cspec in CONSUMERS:
        # CONSUMER.CREATE without an action is create-or-update on nats-server >= 2.10.
        await js.add_consumer(cspec.stream, consumer_config(cspec))
    try:
        await js.key_value(AGGREGATOR_STATE_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        try:
            await js.create_key_value(bucket=AGGREGATOR_STATE_BUCKET, description="Open events per camera (aggregator crash safety)", history=1)
        except nats.js.errors.BadRequestError:
            pass  # created concurrently


async def publish(rt: "Runtime", subject: str, msg: proto.Message, msg_id: str | None) -> None:
    """Publish and wait for the PubAck, retrying transient failures with capped backoff.

    Never gives up on its own: a full stream or an absent server is waited out. The drain bound
    of the runtime is what ends a retry loop at shutdown.
    """
    data = proto.encode(msg)
    headers = proto.headers_for(msg, msg_id)
    await retry(rt, f"publish {subject}", lambda: rt.js.publish(subject, data, headers=headers))


async def publish_many(rt: "Runtime", items: list[tuple[str, proto.Message, str | None]]) -> None:
    """Publish a batch pipelined (all in flight, then every PubAck awaited) for throughput.

    If anything fails or times out, the whole batch is re-published one at a time with retries;
    each message's Nats-Msg-Id makes the repeats harmless.
    """
    if not items:
        return
    try:
        futures = [
            await rt.js.publish_async(subj, proto.encode(msg), headers=proto.headers_for(msg, msg_id))
            for subj, msg, msg_id in items
        ]
        await asyncio.wait_for(asyncio.gather(*futures), timeout=rt.config.nats.publish_timeout)
        return
    except TRANSIENT as exc:
        rt.log.warning("batch publish failed, retrying one by one", messages=len(items), error=repr(exc))
    for subj, msg, msg_id in items:
        await publish(rt, subj, msg, msg_id)


async def retry(rt: "Runtime", what: str, call: Callable[[], Awaitable[T]]) -> T:
    """Await `call()` until it succeeds, backing off on transient NATS/network errors."""
    async for attempt in stamina.retry_context(on=TRANSIENT, attempts=None, timeout=None, wait_initial=0.1, wait_max=5.0):
        with attempt:
            if attempt.num > 1:
                rt.log.warning("retrying", what=what, attempt=attempt.num)
                rt.keepalive()  # waiting out the server is not a hang
            return await call()
    raise AssertionError("unreachable")


async def dead_letter(rt: "Runtime", stage: str, msg: Msg, reason: str, camera: str | None = None, file_id: str | None = None) -> None:
    """Record why `msg` cannot be processed in the DLQ stream, then term() it so it is never redelivered."""
    deliveries = msg.metadata.num_delivered if msg.reply else 1
    letter = DeadLetter(
        stage=stage,
        reason=reason,
        original_subject=msg.subject,
        original_payload=msg.data.decode("utf-8", "replace"),
        original_headers={k: str(v) for k, v in (msg.headers or {}).items()},
        deliveries=deliveries,
        camera=camera,
        file_id=file_id,
        failed_at=time.time(),
    )
    seq = msg.metadata.sequence.stream if msg.reply else 0
    await publish(rt, dlq_subject(stage, camera), letter, msg_id=f"dlq-{stage}-{seq}-{file_id or ''}")
    await msg.term()
    rt.count("dead_lettered")
    rt.log.warning("dead-lettered", stage=stage, reason=reason, camera=camera, file_id=file_id, subject=msg.subject)


def decode_or_none(msg: Msg, expected: type) -> msgspec.Struct | None:
    try:
        value = proto.decode(msg.data, msg.headers)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return None
    return value if isinstance(value, expected) else None


async def consume(
    rt: "Runtime",
    durable: str,
    handle_batch: Callable[[list[Msg]], Awaitable[None]],
    batch: int,
    timeout: float = 1.0,
) -> None:
    """Fetch batches from a durable pull consumer until stop is requested.

    `handle_batch` owns every message it gets: ack after the result is durable, nak(delay) on a
    transient failure, term() + dead letter on bad data. An empty fetch is the idle case, not an error.
    A broken subscription (server restart, nats.py #504) is recreated.
    """
    spec = next(c for c in CONSUMERS if c.durable == durable)
    sub = None
    while not rt.stopping.is_set():
        try:
            if sub is None:
                sub = await rt.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
            msgs = await sub.fetch(batch, timeout=timeout)
        except nats.errors.TimeoutError:
            rt.beat(durable)
            continue
        except TRANSIENT as exc:
            rt.log.warning("fetch failed, resubscribing", consumer=durable, error=repr(exc))
            rt.beat(durable)
            sub = await _drop(sub)
            await asyncio.sleep(1.0)
            continue
        rt.in_flight[durable] = len(msgs)
        await handle_batch(msgs)
        rt.in_flight[durable] = 0
        rt.beat(durable)
    await _drop(sub)


async def _drop(sub) -> None:
    if sub is not None:
        try:
            await sub.unsubscribe()
        except TRANSIENT:
            pass
    return None
