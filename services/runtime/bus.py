"""NATS JetStream plumbing shared by every service: connect, provision, publish, consume, dead-letter."""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from services.runtime.config import credential
from proto.messages import MAX_DEAD_LETTER_PAYLOAD, RETRY_HEADER, DeadLetter, printable, valid_camera
from proto.topology import AGGREGATOR_STATE_BUCKET, CONSUMERS, EVENT_INDEX_BUCKET, EVENT_INDEX_TTL, EXHAUSTED_PREFIX, GPU_BUCKET, HEALTH_BUCKET, GPU_TTL, HEARTBEAT_BUCKET, HEARTBEAT_TTL, STREAMS, ConsumerSpec, StreamSpec, dlq_subject

if TYPE_CHECKING:
    from services.runtime.service import Runtime

T = TypeVar("T")

# Errors worth retrying: the server is away, slow, or refusing for now (e.g. a full stream).
TRANSIENT = (nats.errors.Error, asyncio.TimeoutError, OSError)
# ...except these, which no retry can fix: retrying them would wedge a stage on one message.
PERMANENT = (nats.errors.MaxPayloadError, nats.errors.BadSubjectError, nats.errors.InvalidCallbackTypeError)
JS_MESSAGE_TOO_LARGE = 10054  # JetStream: "message size exceeds maximum allowed"


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, PERMANENT):
        return False
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code == JS_MESSAGE_TOO_LARGE:
        return False
    return isinstance(exc, TRANSIENT)


def connect_auth(cfg, service: str) -> dict:
    """nats.connect() arguments for who this process is: its own least-privilege user (and reply inbox
    prefix) with nats.per_service_users, else the shared user; nothing when no password was given."""
    from services import nats_auth

    if cfg.per_service_users:
        user = nats_auth.user(service)
        password = credential(nats_auth.credential_name(service))
        if not password:
            from services.runtime.config import ConfigError

            raise ConfigError(f"config error: nats.per_service_users is on but credential {nats_auth.credential_name(service)} is missing")
        return {"user": user, "password": password, "inbox_prefix": nats_auth.inbox_prefix(user)}
    password = credential(cfg.password_credential)
    return {"user": cfg.user or "vigil", "password": password} if password else {}


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

    auth = connect_auth(cfg, rt.service)
    attempt = 0
    while not rt.stopping.is_set():
        try:
            nc = await nats.connect(
                **auth,
                servers=cfg.servers,
                name=f"vigil-{rt.service}",
                connect_timeout=cfg.connect_timeout,
                reconnect_time_wait=cfg.reconnect_wait,
                ping_interval=cfg.ping_interval,
                max_outstanding_pings=cfg.max_outstanding_pings,
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


def stream_config(spec: StreamSpec, replicas: int = 1) -> StreamConfig:
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
        num_replicas=replicas,
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


async def provision(js: JetStreamContext, log, replicas: int = 1) -> None:
    """Create or update every declared stream, consumer and KV bucket, with `replicas` copies each
    (consumers follow their stream). Safe to run concurrently."""
    for spec in STREAMS:
        config = stream_config(spec, replicas)
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
    for bucket, description, ttl in (
        (AGGREGATOR_STATE_BUCKET, "Current event, grouping point and outbox per camera (aggregator crash safety)", None),
        (EVENT_INDEX_BUCKET, "Published events by camera and start hour (late detections find their event)", EVENT_INDEX_TTL),
        (HEARTBEAT_BUCKET, "Latest heartbeat of every vigil service instance", HEARTBEAT_TTL),
        (GPU_BUCKET, "Latest GPU sample per GPU (gpu-stats)", GPU_TTL),
        (HEALTH_BUCKET, "health's alert bookkeeping: conditions held and alerts fired", None),
    ):
        try:
            await js.key_value(bucket)
            info = await js.stream_info(f"KV_{bucket}")
            if info.config.num_replicas != replicas:  # scale an existing bucket like the streams
                info.config.num_replicas = replicas
                await js.update_stream(info.config)
        except nats.js.errors.BucketNotFoundError:
            try:
                await js.create_key_value(bucket=bucket, description=description, history=1, ttl=ttl, replicas=replicas)
            except nats.js.errors.BadRequestError:
                pass  # created concurrently


async def wait_provisioned(rt: "Runtime") -> None:
    """With nats.provision = false (per-service users may not create streams), wait until an
    administrator (`vigil provision`, run by the installer) has declared everything this build needs."""
    while True:
        missing = []
        for spec in STREAMS:
            try:
                await rt.js.stream_info(spec.name)
            except nats.js.errors.NotFoundError:
                missing.append(spec.name)
        for cspec in CONSUMERS if not missing else ():
            try:
                await rt.js.consumer_info(cspec.stream, cspec.durable)
            except nats.js.errors.NotFoundError:
                missing.append(f"{cspec.stream}/{cspec.durable}")
        if not missing:
            return
        rt.log.error("streams or consumers missing: run `vigil provision` as the NATS admin", missing=missing)
        rt.notifier.status(f"waiting for {', '.join(missing[:5])} (vigil provision)")
        await asyncio.sleep(5.0)


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
    futures: list[asyncio.Future] = []

    async def send_all() -> None:
        for subj, msg, msg_id in items:
            futures.append(await rt.js.publish_async(subj, proto.encode(msg), headers=proto.headers_for(msg, msg_id)))
        await asyncio.gather(*futures)

    if rt.nc.is_connected:  # while disconnected, go straight to the patient path below
        try:
            # One bound for the whole batch, including nats-py's in-flight semaphore: a slot leaked by a
            # failed publish can only slow us down to the path below, never hang us. (Its own
            # per-message `wait_stall` costs half the pipeline's throughput: measured 1,514 vs 2,897 files/s.)
            await asyncio.wait_for(send_all(), timeout=rt.config.nats.publish_timeout)
            return
        except TRANSIENT as exc:
            rt.log.warning("batch publish failed, retrying one by one", messages=len(items), error=repr(exc))
        finally:
            for future in futures:  # release nats-py's in-flight slots of anything left pending
                future.cancel()
    for subj, msg, msg_id in items:
        await publish(rt, subj, msg, msg_id)


async def retry(rt: "Runtime", what: str, call: Callable[[], Awaitable[T]]) -> T:
    """Await `call()` until it succeeds, backing off on transient NATS/network errors."""
    async for attempt in stamina.retry_context(on=is_transient, attempts=None, timeout=None, wait_initial=0.1, wait_max=5.0):
        with attempt:
            if attempt.num > 1:
                rt.log.warning("retrying", what=what, attempt=attempt.num)
                rt.keepalive()  # waiting out the server is not a hang
            return await call()
    raise AssertionError("unreachable")


def _letter(stage: str, reason: str, subject: str, data: bytes, headers: dict | None, stream: str | None, sequence: int | None,
            deliveries: int, camera: str | None, file_id: str | None, transient: bool = False) -> DeadLetter:
    payload = data[:MAX_DEAD_LETTER_PAYLOAD].decode("utf-8", "replace")
    try:  # the media file it was about, so `vigil dlq list` and `vigil trace PATH` can name it
        parsed = json.loads(data)
        path = parsed.get("path") if isinstance(parsed, dict) and isinstance(parsed.get("path"), str) else None
    except (ValueError, TypeError):
        path = None
    try:
        retries = int((headers or {}).get(RETRY_HEADER, 0))
    except (TypeError, ValueError):
        retries = 0
    # Everything but the payload copy is text someone else chose (a forged path, a header, an error
    # quoting either): escaped, so the letter itself always travels and displays safely.
    return DeadLetter(
        path=printable(path[:4096]) if path else None,
        transient=transient,
        retries=max(0, min(retries, 1000)),
        stage=stage,
        reason=printable(reason[:2000]),
        original_subject=printable(subject),
        original_payload=payload[:MAX_DEAD_LETTER_PAYLOAD],
        original_headers={printable(str(k))[:200]: printable(str(v)[:1000]) for k, v in list((headers or {}).items())[:32]},
        original_size=len(data),
        original_stream=stream,
        original_sequence=sequence,
        deliveries=deliveries,
        camera=printable(camera[:200]) if camera else None,
        file_id=printable(file_id[:200]) if file_id else None,
        failed_at=time.time(),
    )


def _dlq_id(stream: str, sequence: int, consumer: str) -> str:
    # One id per (stream, sequence, consumer): a message is recorded once, whichever path gets there first.
    return f"dlq-{stream}-{sequence}-{consumer}"


async def dead_letter(rt: "Runtime", stage: str, msg: Msg, reason: str, camera: str | None = None, file_id: str | None = None,
                      transient: bool = False) -> None:
    """Record why `msg` cannot be processed in the DLQ stream, then term() it so it is never redelivered.
    `transient`: the cause may pass (the letter is retried automatically); default: bad content."""
    meta = msg.metadata if msg.reply else None
    letter = _letter(stage, reason, msg.subject, msg.data, msg.headers, meta.stream if meta else None,
                     meta.sequence.stream if meta else None, meta.num_delivered if meta else 1, camera, file_id, transient)
    msg_id = _dlq_id(meta.stream, meta.sequence.stream, meta.consumer) if meta else None
    await publish(rt, dlq_subject(stage, camera), letter, msg_id=msg_id)
    await msg.term()
    rt.count("dead_lettered")
    rt.log.warning("dead-lettered", stage=stage, reason=reason[:300], camera=camera, file_id=file_id, subject=msg.subject)


def remember_failure(rt: "Runtime", msg: Msg, error: str) -> None:
    """The latest error per (stream, sequence), so a message that later runs out of deliveries is
    dead-lettered with it (bounded: the oldest entries are forgotten first)."""
    if msg.reply:
        meta = msg.metadata
        rt.failures[(meta.stream, meta.sequence.stream)] = error[:500]
        while len(rt.failures) > 10_000:
            rt.failures.pop(next(iter(rt.failures)))


async def exhausted_loop(rt: "Runtime", durable: str, stage: str) -> None:
    """Dead-letter the messages that used up `durable`'s max_deliver without an ack, nak or term -
    the process crashed on them, hung, or kept timing out - from the server's MAX_DELIVERIES
    advisories, kept in the ADVISORIES stream so none is missed while this service was down. The
    message is copied to the DLQ, then acked on this consumer alone: the server removes it once every
    other consumer of the stream has acked it too (no stage may delete another's work)."""
    spec = next(c for c in CONSUMERS if c.durable == durable)

    async def handle(msgs: list[Msg]) -> None:
        for m in msgs:
            try:
                advisory = json.loads(m.data)
                seq, deliveries = int(advisory["stream_seq"]), int(advisory.get("deliveries") or spec.max_deliver)
            except (ValueError, KeyError, TypeError):
                await m.term()
                continue
            # the letter is written at the first two deliveries of the advisory (the second covers a crash
            # in between; both lie within the DLQ's duplicate window, so it is recorded once)
            attempt = m.metadata.num_delivered if m.reply else 1
            await _move_exhausted(rt, spec, stage, seq, deliveries, write_letter=attempt <= 2)
            await m.ack()

    await consume(rt, f"{EXHAUSTED_PREFIX}{durable}", handle, batch=16, timeout=5.0, stage=stage)


async def _move_exhausted(rt: "Runtime", spec: ConsumerSpec, stage: str, seq: int, deliveries: int, write_letter: bool = True) -> None:
    """Copy one exhausted message to the DLQ, then ack it on `spec`'s consumer. The ack subject is the
    one the message was delivered with, minus what the server does not need for a late ack (consumer
    sequence, time, pending: tests/integration/test_dead_letters.py holds the server to it); it needs
    only the ack permission the consumer has anyway, where STREAM.MSG.DELETE let one stage delete a
    message another had not seen yet."""
    if write_letter and not await _write_exhausted_letter(rt, spec, stage, seq, deliveries):
        return  # gone from the stream: nothing to ack either
    await rt.nc.request(f"$JS.ACK.{spec.stream}.{spec.durable}.{deliveries}.{seq}.0.0.0", b"+ACK", timeout=5.0)


async def _write_exhausted_letter(rt: "Runtime", spec: ConsumerSpec, stage: str, seq: int, deliveries: int) -> bool:
    """The dead letter of one exhausted message; False when the message is no longer in its stream."""
    try:
        raw = await rt.js.get_msg(spec.stream, seq)
    except nats.js.errors.NotFoundError:
        # acked after all, or removed by the server before we got here (max_age, or servers that drop
        # max-delivered messages themselves): say so, since no dead letter will exist for it
        rt.count("exhausted_gone")
        rt.log.warning("exhausted message no longer in its stream: no dead letter", stream=spec.stream, sequence=seq, stage=stage)
        return False
    error = rt.failures.pop((spec.stream, seq), None)
    reason = f"gave up after {deliveries} deliveries: " + (error or "no error was recorded (the process crashed, hung or timed out on it)")
    camera = raw.subject.rsplit(".", 1)[-1]
    try:
        payload = json.loads(raw.data or b"null")
        file_id = payload.get("file_id") if isinstance(payload, dict) else None
    except (ValueError, TypeError):
        file_id = None
    # deliveries used up without a verdict (crash, hang, timeout) or by transient errors: worth a retry
    letter = _letter(stage, reason, raw.subject, raw.data or b"", raw.headers, spec.stream, seq, deliveries,
                     camera if valid_camera(camera) else None, file_id if isinstance(file_id, str) else None, transient=True)
    await publish(rt, dlq_subject(stage, letter.camera), letter, msg_id=_dlq_id(spec.stream, seq, spec.durable))
    rt.count("dead_lettered")
    rt.log.warning("dead-lettered after max deliveries", stage=stage, stream=spec.stream, sequence=seq, reason=reason[:300])
    return True


def last_delivery(msg: Msg, durable: str) -> bool:
    """True when this is the consumer's final attempt: a failure now must dead-letter, not nak."""
    spec = next(c for c in CONSUMERS if c.durable == durable)
    return bool(msg.reply) and msg.metadata.num_delivered >= spec.max_deliver


async def give_up_or_retry(rt: "Runtime", stage: str, durable: str, msgs: list[Msg], error: BaseException, delay: float = 5.0) -> None:
    """A batch failed for a reason that may pass: nak it for a later retry, dead-lettering the messages
    that have used up their deliveries, so nothing vanishes silently at max_deliver."""
    for msg in msgs:
        if msg._ackd:  # nats-py's private flag: already acked, naked or termed
            continue
        try:
            if last_delivery(msg, durable):
                await dead_letter(rt, stage, msg, f"gave up after {msg.metadata.num_delivered} deliveries: {error!r}"[:500], transient=True)
            else:
                remember_failure(rt, msg, repr(error))
                await msg.nak(delay=delay)
        except TRANSIENT as exc:  # the server is away: the message comes back after ack_wait anyway
            rt.log.warning("could not nak", error=repr(exc))


async def kv_keys(nc, bucket: str, pattern: str = ">") -> list[str]:
    """The keys of a KV bucket matching `pattern` (NATS wildcards), from the stream's per-subject
    counts (STREAM.INFO with subjects_filter, page by page). nats-py's keys() and watch() create a
    consumer, and a user allowed CONSUMER.CREATE on a bucket could aim a push consumer's deliver
    subject at vigil.uploads.* and write into the pipeline without publish rights. Deleted keys stay
    listed until compacted: their get() raises KeyDeletedError."""
    prefix, keys, offset = f"$KV.{bucket}.", [], 0
    while True:
        req = json.dumps({"subjects_filter": prefix + pattern, "offset": offset}).encode()
        resp = json.loads((await nc.request(f"$JS.API.STREAM.INFO.KV_{bucket}", req, timeout=5.0)).data)
        if "error" in resp:
            if resp["error"].get("err_code") == 10059:  # stream not found: an empty bucket is no error
                return []
            raise nats.js.errors.APIError.from_error(resp["error"])
        page = list((resp.get("state") or {}).get("subjects") or {})
        keys += [s.removeprefix(prefix) for s in page]
        offset += len(page)
        if not page or offset >= int(resp.get("total") or 0):
            return keys


async def stored_messages(js: JetStreamContext, stream: str, start: int = 0):
    """Every message a (small, limits) stream holds now from sequence `start` on, as (sequence, raw
    message); gaps skipped. Raises NotFoundError when the stream does not exist."""
    info = await js.stream_info(stream)
    if not info.state.messages:
        return
    for seq in range(max(start, info.state.first_seq), info.state.last_seq + 1):
        try:
            yield seq, await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue


def decode_as(msg: Msg, expected: type) -> msgspec.Struct | str:
    """The message as `expected`, or why it is not one (undecodable, a bad camera id, a control
    character in a text field, another type): the reason its dead letter gives."""
    try:
        value = proto.decode(msg.data, msg.headers)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        return f"payload is not a valid {expected.__name__}: {exc}"
    return value if isinstance(value, expected) else f"payload is not a valid {expected.__name__}: a {type(value).__name__}"


async def consume(
    rt: "Runtime",
    durable: str,
    handle_batch: Callable[[list[Msg]], Awaitable[None]],
    batch: int,
    timeout: float = 1.0,
    stage: str | None = None,
) -> None:
    """Fetch batches from a durable pull consumer until stop is requested.

    `handle_batch` owns every message it gets: ack after the result is durable, nak(delay) on a
    transient failure, term() + dead letter on bad data. An empty fetch is the idle case, not an error.
    A broken subscription (server restart, nats.py #504) is recreated; a consumer that vanished
    (deleted by hand, store reset) is provisioned again. A batch whose handler raises a transient
    error is nak'ed for a later retry instead of taking the service down.
    """
    spec = next(c for c in CONSUMERS if c.durable == durable)
    sub = None
    idle = 0
    rt.beat(durable)  # registered from the start: a hang in the very first batch must stop the watchdog
    while not rt.stopping.is_set():
        try:
            if sub is None:
                sub = await rt.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
            msgs = await sub.fetch(batch, timeout=timeout)
        except nats.errors.TimeoutError:
            rt.beat(durable)
            idle += 1
            if idle % 30 == 0:
                sub = await _check_consumer(rt, spec, sub)
            continue
        except TRANSIENT as exc:
            rt.log.warning("fetch failed, resubscribing", consumer=durable, error=repr(exc))
            rt.beat(durable)
            sub = await _drop(sub)
            await asyncio.sleep(1.0)
            continue
        if not msgs:  # nats-py returns [] on a status reply (408/409, or 404 when the consumer is gone)
            idle += 1
            rt.count("empty_fetches")
            if idle % 30 == 0:  # a consumer_info request per empty fetch would load the server under bursts
                sub = await _check_consumer(rt, spec, sub)
            continue
        idle = 0
        rt.in_flight[durable] = len(msgs)
        try:
            await handle_batch(msgs)
        except TRANSIENT as exc:
            rt.note_error(f"{durable}: batch failed: {exc!r}")
            if is_transient(exc):
                rt.log.error("batch failed, will retry", consumer=durable, messages=len(msgs), error=repr(exc))
                await give_up_or_retry(rt, stage or durable, durable, msgs, exc)
            else:  # e.g. MaxPayloadError: the same batch would fail the same way at every delivery
                rt.log.error("batch failed permanently, dead-lettering it", consumer=durable, messages=len(msgs), error=repr(exc))
                for msg in msgs:
                    if not msg._ackd:  # nats-py's private flag: already acked, naked or termed
                        with contextlib.suppress(*TRANSIENT):
                            await dead_letter(rt, stage or durable, msg, f"permanent error: {exc!r}"[:500])
        rt.in_flight[durable] = 0
        rt.beat(durable)
    await _drop(sub)


async def _check_consumer(rt: "Runtime", spec: ConsumerSpec, sub):
    """Re-provision if our durable consumer no longer exists on the server."""
    try:
        await rt.js.consumer_info(spec.stream, spec.durable)
        return sub
    except nats.js.errors.NotFoundError:
        if not rt.config.nats.provision:  # a least-privilege user may not declare it: wait for the admin
            rt.log.error("consumer missing on the server: run `vigil provision` as the NATS admin", consumer=spec.durable)
            return await _drop(sub)
        rt.log.error("consumer missing on the server: provisioning again", consumer=spec.durable)
        await provision(rt.js, rt.log, rt.config.nats.replicas)
        return await _drop(sub)
    except TRANSIENT:
        return sub


async def _drop(sub) -> None:
    if sub is not None:
        try:
            await sub.unsubscribe()
        except TRANSIENT:
            pass
    return None
