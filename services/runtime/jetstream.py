"""NATS and JetStream helpers that keep no state: which errors are worth a retry, connecting (with
endless reconnects), decoding a message as an expected type, listing KV keys and reading stored
messages without creating consumers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

import proto
from services.runtime.config import ConfigError, credential

if TYPE_CHECKING:
    from services.runtime.service import Runtime

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
    from services.runtime import nats_auth

    if cfg.per_service_users:
        user = nats_auth.user(service)
        password = credential(nats_auth.credential_name(service))
        if not password:
            raise ConfigError(
                f"config error: nats.per_service_users is on but credential {nats_auth.credential_name(service)} is missing"
            )
        return {"user": user, "password": password, "inbox_prefix": nats_auth.inbox_prefix(user)}
    password = credential(cfg.password_credential)
    return {"user": cfg.user or "vigil", "password": password} if password else {}


async def connect(rt: Runtime) -> nats.NATS | None:
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rt.stopping.wait(), timeout=min(0.5 * 2**attempt, 5.0))
    return None


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
    return (
        value
        if isinstance(value, expected)
        else f"payload is not a valid {expected.__name__}: a {type(value).__name__}"
    )


async def keep_alive(msgs: list[Msg], every: float, alive: Callable[[], None] | None = None) -> None:
    """in_progress() every `every` seconds (less than the consumer's ack_wait) until cancelled: the
    messages stay this process's while slow work on them (a model, a notification target) goes on.
    `alive` (the runtime's keepalive) tells the watchdog the same: that wait is work, not a hang; the
    work itself is bounded by its own timeouts and attempts."""
    loop = asyncio.get_running_loop()
    due = loop.time() + every
    while True:
        await asyncio.sleep(min(every, 1.0))  # the watchdog's window may be shorter than ack_wait
        if alive is not None:
            alive()
        if loop.time() >= due:
            due = loop.time() + every
            with contextlib.suppress(*TRANSIENT):
                await asyncio.gather(*(m.in_progress() for m in msgs))


@contextlib.asynccontextmanager
async def held(msgs: list[Msg], every: float, alive: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """`async with held(msgs, ...)`: keep_alive for as long as the block runs."""
    task = asyncio.ensure_future(keep_alive(msgs, every, alive))
    try:
        yield
    finally:
        task.cancel()
