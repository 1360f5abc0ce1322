"""The one fetch loop of every stage (consume): batches from a durable pull consumer, handed to the
stage, with the broken-subscription, vanished-consumer and failed-batch cases handled here."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from proto.messages import valid_camera
from proto.topology import EXHAUSTED_PREFIX, ConsumerSpec, consumer, dlq_subject
from services.runtime.dead_letters import DeadLetters, dlq_msg_id, make_letter
from services.runtime.jetstream import TRANSIENT, is_transient
from services.runtime.provision import provision

if TYPE_CHECKING:
    pass


class Batches(DeadLetters):
    """Bus methods: the fetch loop every stage uses, and the max-deliveries advisories (the Bus's base)."""

    in_flight: dict[str, int]

    async def consume(
        self,
        durable: str,
        handle_batch: Callable[[list[Msg]], Awaitable[None]],
        batch: int,
        timeout: float = 1.0,
        stage: str | None = None,
        batch_wait: float = 0.0,
    ) -> None:
        """Fetch batches from a durable pull consumer until stop is requested (every stage's one fetch loop).

        `batch_wait` > 0: a batch short of `batch` gets one follow-up pull of at least 50 ms for what
        arrives meanwhile (a shorter pull that expires just as a message arrives orphans that message until
        ack_wait: nats.py #933/#986).

        `handle_batch` owns every message it gets: ack after the result is durable, nak(delay) on a
        transient failure, term() + dead letter on bad data. An empty fetch is the idle case, not an error.
        A broken subscription (server restart, nats.py #504) is recreated; a consumer that vanished
        (deleted by hand, store reset) is provisioned again. A batch whose handler raises a transient
        error is nak'ed for a later retry instead of taking the service down.
        """
        spec = consumer(durable)
        sub = None
        idle = 0
        self.rt.beat(durable)  # registered from the start: a hang in the very first batch must stop the watchdog
        while not self.rt.stopping.is_set():
            try:
                if sub is None:
                    sub = await self.rt.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
                msgs = await sub.fetch(batch, timeout=timeout)
                if batch_wait > 0 and 0 < len(msgs) < batch:
                    with contextlib.suppress(*TRANSIENT):  # timeout or a blip: keep what we already hold
                        msgs += await sub.fetch(batch - len(msgs), timeout=max(batch_wait, 0.05))
            except nats.errors.TimeoutError:
                self.rt.beat(durable)
                idle += 1
                if idle % 30 == 0:
                    sub = await self._check_consumer(spec, sub)
                continue
            except TRANSIENT as exc:
                self.rt.log.warning("fetch failed, resubscribing", consumer=durable, error=repr(exc))
                self.rt.beat(durable)
                await _drop(sub)
                sub = None
                await asyncio.sleep(1.0)
                continue
            if not msgs:  # nats-py returns [] on a status reply (408/409, or 404 when the consumer is gone)
                idle += 1
                self.rt.count("empty_fetches")
                if idle % 30 == 0:  # a consumer_info request per empty fetch would load the server under bursts
                    sub = await self._check_consumer(spec, sub)
                continue
            idle = 0
            self.in_flight[durable] = len(msgs)
            try:
                await handle_batch(msgs)
            except TRANSIENT as exc:
                self.rt.note_error(f"{durable}: batch failed: {exc!r}")
                if is_transient(exc):
                    self.rt.log.error("batch failed, will retry", consumer=durable, messages=len(msgs), error=repr(exc))
                    await self.give_up_or_retry(stage or durable, durable, msgs, exc)
                else:  # e.g. MaxPayloadError: the same batch would fail the same way at every delivery
                    self.rt.log.error(
                        "batch failed permanently, dead-lettering it",
                        consumer=durable,
                        messages=len(msgs),
                        error=repr(exc),
                    )
                    for msg in msgs:
                        if not msg.is_acked:  # not yet acked, naked or termed
                            with contextlib.suppress(*TRANSIENT):
                                await self.dead_letter(stage or durable, msg, f"permanent error: {exc!r}"[:500])
            self.in_flight[durable] = 0
            self.rt.beat(durable)
        await _drop(sub)

    async def _check_consumer(self, spec: ConsumerSpec, sub):
        """Re-provision if our durable consumer no longer exists on the server."""
        try:
            await self.rt.js.consumer_info(spec.stream, spec.durable)
            return sub
        except nats.js.errors.NotFoundError:
            if not self.rt.config.nats.provision:  # a least-privilege user may not declare it: wait for the admin
                self.rt.log.error(
                    "consumer missing on the server: run `vigil provision` as the NATS admin", consumer=spec.durable
                )
                await _drop(sub)
                return None
            self.rt.log.error("consumer missing on the server: provisioning again", consumer=spec.durable)
            await provision(self.rt.js, self.rt.log, self.rt.config.nats.replicas)
            await _drop(sub)
            return None
        except TRANSIENT:
            return sub

    async def exhausted_loop(self, durable: str, stage: str) -> None:
        """Dead-letter the messages that used up `durable`'s max_deliver without an ack, nak or term -
        the process crashed on them, hung, or kept timing out - from the server's MAX_DELIVERIES
        advisories, kept in the ADVISORIES stream so none is missed while this service was down. The
        message is copied to the DLQ, then acked on this consumer alone: the server removes it once every
        other consumer of the stream has acked it too (no stage may delete another's work)."""
        spec = consumer(durable)

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
                await self._move_exhausted(spec, stage, seq, deliveries, write_letter=attempt <= 2)
                await m.ack()

        await self.consume(f"{EXHAUSTED_PREFIX}{durable}", handle, batch=16, timeout=5.0, stage=stage)

    async def _move_exhausted(
        self, spec: ConsumerSpec, stage: str, seq: int, deliveries: int, write_letter: bool = True
    ) -> None:
        """Copy one exhausted message to the DLQ, then ack it on `spec`'s consumer. The ack subject is the
        one the message was delivered with, minus what the server does not need for a late ack (consumer
        sequence, time, pending: tests/integration/test_dead_letters.py holds the server to it); it needs
        only the ack permission the consumer has anyway, where STREAM.MSG.DELETE let one stage delete a
        message another had not seen yet."""
        if write_letter and not await self._write_exhausted_letter(spec, stage, seq, deliveries):
            return  # gone from the stream: nothing to ack either
        await self.rt.nc.request(f"$JS.ACK.{spec.stream}.{spec.durable}.{deliveries}.{seq}.0.0.0", b"+ACK", timeout=5.0)

    async def _write_exhausted_letter(self, spec: ConsumerSpec, stage: str, seq: int, deliveries: int) -> bool:
        """The dead letter of one exhausted message; False when the message is no longer in its stream."""
        try:
            raw = await self.rt.js.get_msg(spec.stream, seq)
        except nats.js.errors.NotFoundError:
            # acked after all, or removed by the server before we got here (max_age, or servers that drop
            # max-delivered messages themselves): say so, since no dead letter will exist for it
            self.rt.count("exhausted_gone")
            self.rt.log.warning(
                "exhausted message no longer in its stream: no dead letter",
                stream=spec.stream,
                sequence=seq,
                stage=stage,
            )
            return False
        error = self.failures.pop((spec.stream, seq), None)
        reason = f"gave up after {deliveries} deliveries: " + (
            error or "no error was recorded (the process crashed, hung or timed out on it)"
        )
        subject = raw.subject or ""
        camera = subject.rsplit(".", 1)[-1]
        try:
            payload = json.loads(raw.data or b"null")
            file_id = payload.get("file_id") if isinstance(payload, dict) else None
        except (ValueError, TypeError):
            file_id = None
        # deliveries used up without a verdict (crash, hang, timeout) or by transient errors: worth a retry
        letter = make_letter(
            stage,
            reason,
            subject,
            raw.data or b"",
            raw.headers,
            spec.stream,
            seq,
            deliveries,
            camera if valid_camera(camera) else None,
            file_id if isinstance(file_id, str) else None,
            transient=True,
        )
        await self.publish(dlq_subject(stage, letter.camera), letter, msg_id=dlq_msg_id(spec.stream, seq, spec.durable))
        self.rt.count("dead_lettered")
        self.rt.log.warning(
            "dead-lettered after max deliveries", stage=stage, stream=spec.stream, sequence=seq, reason=reason[:300]
        )
        return True


async def _drop(sub) -> None:
    """Unsubscribe (a broken subscription may not answer: ignored); the caller then holds no subscription."""
    if sub is not None:
        with contextlib.suppress(*TRANSIENT):
            await sub.unsubscribe()
