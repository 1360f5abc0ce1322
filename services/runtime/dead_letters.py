"""Dead letters: a message that can never be processed goes to the DLQ stream with its reason (and is
termed); one that used up its deliveries is copied there by exhausted_loop; a transient failure is
naked for a later retry until its last delivery (give_up_or_retry)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg

import proto
from proto.messages import MAX_DEAD_LETTER_PAYLOAD, RETRY_HEADER, DeadLetter, printable
from proto.topology import (
    consumer,
    dlq_subject,
)
from services.runtime.jetstream import TRANSIENT, stored_messages

if TYPE_CHECKING:
    from services.runtime.service import Runtime


def make_letter(
    stage: str,
    reason: str,
    subject: str,
    data: bytes,
    headers: dict | None,
    stream: str | None,
    sequence: int | None,
    deliveries: int,
    camera: str | None,
    file_id: str | None,
    transient: bool = False,
) -> DeadLetter:
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
        original_headers={
            printable(str(k))[:200]: printable(str(v)[:1000]) for k, v in list((headers or {}).items())[:32]
        },
        original_size=len(data),
        original_stream=stream,
        original_sequence=sequence,
        deliveries=deliveries,
        camera=printable(camera[:200]) if camera else None,
        file_id=printable(file_id[:200]) if file_id else None,
        failed_at=time.time(),
    )


def dlq_msg_id(stream: str, sequence: int, consumer: str) -> str:
    # One id per (stream, sequence, consumer): a message is recorded once, whichever path gets there first.
    return f"dlq-{stream}-{sequence}-{consumer}"


def last_delivery(msg: Msg, durable: str) -> bool:
    """True when this is the consumer's final attempt: a failure now must dead-letter, not nak."""
    spec = consumer(durable)
    return bool(msg.reply) and msg.metadata.num_delivered >= spec.max_deliver


async def stored_letters(js, start: int = 0) -> AsyncIterator[tuple[int, str, DeadLetter | str]]:
    """(sequence, subject, the letter or why it is not one) for every message the DLQ holds from `start`
    on: one bad message (any stage can write one) must not hide the others (`vigil dlq`, `vigil trace`,
    health's automatic retries all read them this way)."""
    async for seq, raw in stored_messages(js, "DLQ", start=start):
        try:
            value = proto.decode(raw.data, raw.headers)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            yield seq, raw.subject, f"undecodable dead letter: {exc}"
            continue
        yield seq, raw.subject, value if isinstance(value, DeadLetter) else f"not a dead letter: {type(value).__name__}"


class DeadLetters:
    """Bus methods: dead letters and the nak-or-give-up of a failed batch (mixed into Bus)."""

    rt: Runtime
    failures: dict[tuple[str, int], str]

    if TYPE_CHECKING:

        async def publish(self, subject: str, msg: proto.Message, msg_id: str | None) -> None: ...

    async def dead_letter(
        self,
        stage: str,
        msg: Msg,
        reason: str,
        camera: str | None = None,
        file_id: str | None = None,
        transient: bool = False,
    ) -> None:
        """Record why `msg` cannot be processed in the DLQ stream, then term() it so it is never redelivered.
        `transient`: the cause may pass (the letter is retried automatically); default: bad content."""
        meta = msg.metadata if msg.reply else None
        letter = make_letter(
            stage,
            reason,
            msg.subject,
            msg.data,
            msg.headers,
            meta.stream if meta else None,
            meta.sequence.stream if meta else None,
            meta.num_delivered if meta else 1,
            camera,
            file_id,
            transient,
        )
        msg_id = dlq_msg_id(meta.stream, meta.sequence.stream, meta.consumer) if meta else None
        await self.publish(dlq_subject(stage, camera), letter, msg_id=msg_id)
        await msg.term()
        self.rt.count("dead_lettered")
        self.rt.log.warning(
            "dead-lettered", stage=stage, reason=reason[:300], camera=camera, file_id=file_id, subject=msg.subject
        )

    def remember_failure(self, msg: Msg, error: str) -> None:
        """The latest error per (stream, sequence), so a message that later runs out of deliveries is
        dead-lettered with it (bounded: the oldest entries are forgotten first)."""
        if msg.reply:
            meta = msg.metadata
            self.failures[(meta.stream, meta.sequence.stream)] = error[:500]
            while len(self.failures) > 10_000:
                self.failures.pop(next(iter(self.failures)))

    async def give_up_or_retry(
        self, stage: str, durable: str, msgs: list[Msg], error: BaseException, delay: float = 5.0
    ) -> None:
        """A batch failed for a reason that may pass: nak it for a later retry, dead-lettering the messages
        that have used up their deliveries, so nothing vanishes silently at max_deliver."""
        for msg in msgs:
            if msg.is_acked:  # already acked, naked or termed
                continue
            try:
                if last_delivery(msg, durable):
                    await self.dead_letter(
                        stage,
                        msg,
                        f"gave up after {msg.metadata.num_delivered} deliveries: {error!r}"[:500],
                        transient=True,
                    )
                else:
                    self.remember_failure(msg, repr(error))
                    await msg.nak(delay=delay)
            except TRANSIENT as exc:  # the server is away: the message comes back after ack_wait anyway
                self.rt.log.warning("could not nak", error=repr(exc))
