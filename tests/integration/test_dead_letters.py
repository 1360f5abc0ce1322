"""Messages that use up their deliveries without any verdict (the process died on them, hung, timed
out) reach the dead-letter stream through the server's MAX_DELIVERIES advisory - even when the
service was down as it happened."""

from __future__ import annotations

import asyncio
import time

import nats
import nats.js.errors
import structlog
from nats.js.api import AckPolicy, ConsumerConfig

import proto
from services.runtime.provision import provision
from tests.support import stream_messages, wait_until


def exhaust_one_upload(url: str) -> int:
    """Provision, shorten the detector consumer's fuse (2 deliveries, 1 s ack wait), publish one upload,
    and let both deliveries expire unanswered, as a detector crashing on it would. Returns its sequence."""

    async def go() -> int:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await provision(js, structlog.get_logger())
        await js.delete_consumer("UPLOADS", "detector")
        await js.add_consumer(
            "UPLOADS",
            ConsumerConfig(
                durable_name="detector",
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=1.0,
                max_deliver=2,
                filter_subject="vigil.uploads.*",
            ),
        )
        up = proto.FileUploaded(
            file_id="poison-1",
            camera="front_door",
            path="front_door/poison.jpg",
            size=10,
            mtime=time.time(),
            sha256="0" * 64,
            kind="image",
        )
        ack = await js.publish(
            "vigil.uploads.front_door", proto.encode(up), headers=proto.headers_for(up, "upload-poison-1")
        )
        sub = await js.pull_subscribe_bind("detector", "UPLOADS")
        for _ in range(2):
            (msg,) = await sub.fetch(1, timeout=5)  # taken, never answered
            assert msg.metadata.sequence.stream == ack.seq
            await asyncio.sleep(1.3)
        for _ in range(50):  # the advisory is captured by the ADVISORIES stream
            if (await js.stream_info("ADVISORIES")).state.messages:
                break
            await asyncio.sleep(0.1)
        await nc.close()
        return ack.seq

    return asyncio.run(go())


def still_in_uploads(url: str, seq: int, stream: str = "UPLOADS") -> bool:
    async def go() -> bool:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().get_msg(stream, seq)
            return True
        except nats.js.errors.NotFoundError:
            return False
        finally:
            await nc.close()

    return asyncio.run(go())


def test_exhausted_message_is_dead_lettered_from_the_advisory_after_a_restart(make_stack, nats_server):
    seq = exhaust_one_upload(nats_server.url)
    assert still_in_uploads(nats_server.url, seq)  # the server keeps it: someone must move it
    # provision = false: a starting service would otherwise restore the consumer's normal max_deliver,
    # and the server would deliver the message again (a real config change does exactly that)
    stack = make_stack(model="none", env={"VIGIL_NATS__PROVISION": "false"})
    stack.start("detector")  # down while it happened; the advisory waited in the ADVISORIES stream
    stack.wait_ready("detector")
    (letter,) = wait_until(
        lambda: [m for m in stream_messages(nats_server.url, "DLQ") if isinstance(m, proto.DeadLetter)],
        what="the dead letter",
    )
    assert (letter.stage, letter.original_stream, letter.original_sequence) == ("detector", "UPLOADS", seq)
    assert letter.deliveries >= 2  # the server's count from the advisory (nats-server 2.10+ reports max_deliver + 1)
    assert letter.camera == "front_door" and letter.file_id == "poison-1" and "no error was recorded" in letter.reason
    assert proto.decode(letter.original_payload.encode()).path == "front_door/poison.jpg"
    wait_until(lambda: not still_in_uploads(nats_server.url, seq), what="the message removed from UPLOADS")
    assert "dead-lettered after max deliveries" in stack.log("detector")


def test_a_lagging_interest_consumer_never_stops_the_dead_letter(make_stack, nats_server):
    """The aggregator used up a detection's deliveries while the recorder (the other interest on
    DETECTIONS) was down. The dead letter is written at once; the message stays in DETECTIONS for the
    recorder, and is deleted once the recorder is past it. The advisory consumer never gives up (it
    used to after ~50 minutes of 30 s naks): the server holds it at max_deliver -1."""

    async def exhaust() -> int:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await provision(js, structlog.get_logger())
        await js.delete_consumer("DETECTIONS", "aggregator")
        await js.add_consumer(
            "DETECTIONS",
            ConsumerConfig(
                durable_name="aggregator",
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=1.0,
                max_deliver=2,
                filter_subject="vigil.detections.*",
            ),
        )
        det = proto.Detections(
            file_id="poison-2",
            camera="backyard",
            path="backyard/p.jpg",
            captured_at=time.time(),
            width=1,
            height=1,
            model="m",
            inference_ms=1.0,
        )
        ack = await js.publish(
            "vigil.detections.backyard", proto.encode(det), headers=proto.headers_for(det, "det-poison-2")
        )
        sub = await js.pull_subscribe_bind("aggregator", "DETECTIONS")
        for _ in range(2):
            await sub.fetch(1, timeout=5)
            await asyncio.sleep(1.3)
        info = await js.consumer_info("ADVISORIES", "exhausted-aggregator")
        assert info.config.max_deliver == -1
        await nc.close()
        return ack.seq

    seq = exhaust()
    seq = asyncio.run(seq)
    stack = make_stack(model="none", env={"VIGIL_NATS__PROVISION": "false"})
    stack.start("aggregator")  # the recorder is down: recorder-detections has not got past the message
    (letter,) = wait_until(
        lambda: [m for m in stream_messages(nats_server.url, "DLQ")], timeout=30, what="the dead letter, at once"
    )
    assert (letter.stage, letter.original_sequence, letter.path) == ("aggregator", seq, "backyard/p.jpg")

    def in_detections() -> bool:
        return still_in_uploads(nats_server.url, seq, "DETECTIONS")

    time.sleep(2)
    assert in_detections()  # still needed by the recorder
    stack.start("recorder")
    wait_until(lambda: not in_detections(), timeout=120, what="the message deleted once the recorder is past it")
    assert len(stream_messages(nats_server.url, "DLQ")) == 1  # written once, however often the advisory came back


def test_a_transient_dead_letter_is_retried_once_its_stage_is_healthy(make_stack, nats_server, media, database):
    """An upload whose deliveries a crashing detector used up is dead-lettered as transient; once a
    detector is healthy, health re-publishes it (Vigil-Retry: 1) and it is recorded; the letter goes."""
    from tests.support import drop, photo_bytes, query

    drop(media / "front_door" / "poison.jpg", photo_bytes("coffee", scale=0.25))
    seq = exhaust_one_upload(nats_server.url)
    stack = make_stack(
        model="none",
        env={"VIGIL_NATS__PROVISION": "false"},
        health={"dlq_retry_seconds": 1.0, "check_seconds": 0.5, "http_port": 0},
    )
    stack.start("detector", "recorder", "health")
    (letter,) = wait_until(lambda: stream_messages(nats_server.url, "DLQ"), what="the dead letter")
    assert letter.transient and letter.retries == 0 and letter.original_sequence == seq
    wait_until(
        lambda: query(database, "SELECT 1 FROM detections WHERE path = 'front_door/poison.jpg'"),
        timeout=60,
        what="the retried upload recorded",
    )
    wait_until(lambda: not stream_messages(nats_server.url, "DLQ"), what="the letter removed from the DLQ")
    assert "dead letter retried automatically" in stack.log("health")
