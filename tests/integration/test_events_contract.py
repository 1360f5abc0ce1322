"""The grouping contract against the real aggregator process (real nats-server, kill -9): whatever the
arrival order within the reorder bound and wherever the process dies, the latest revision of every
event on the EVENTS stream equals services.aggregator.grouping.reference_events, no detection is in two events, and
no event has two alerts on the ALERTS stream. (No recorder runs while the streams are read: EVENTS and
ALERTS are interest streams, and its acks would take the messages away.)"""

from __future__ import annotations

import asyncio
import random
import time

import nats

import proto
from proto import Box, Detections
from services.aggregator.grouping import Rules, order, reference_events
from tests.support import stream_messages, wait_until
from tests.unit.test_events import block_shuffle, lateness

PERSON = Box("person", 0.95, 0, 0, 10, 10)
CAT = Box("cat", 0.6, 0, 0, 10, 10)
RULES = Rules(idle=3.0, max_seconds=20.0, max_detections=6)


def make_detections(rng: random.Random, n: int, base: float) -> list[Detections]:
    out, t = [], {"front_door": base, "backyard": base}
    for i in range(n):
        cam = rng.choice(["front_door", "backyard"])
        t[cam] += rng.choice([0.0, 0.5, 1.0, 2.0, 2.5, 5.0])  # equal times, small steps, gaps over idle_seconds
        boxes = [PERSON] if rng.random() < 0.3 else [CAT] if rng.random() < 0.9 else []
        out.append(
            Detections(
                file_id=f"f{i:04}",
                camera=cam,
                path=f"{cam}/f{i:04}.jpg",
                captured_at=t[cam],
                width=64,
                height=48,
                model="test",
                inference_ms=1.0,
                boxes=boxes,
            )
        )
    return out


def publish(url: str, dets: list[Detections]) -> None:
    async def go():
        nc = await nats.connect(url)
        js = nc.jetstream()
        for d in dets:
            await js.publish(
                proto.subject("detections", d.camera), proto.encode(d), headers=proto.headers_for(d, f"det-{d.key}")
            )
        await nc.close()

    asyncio.run(go())


def latest_events(url: str) -> dict[str, proto.EventClosed]:
    latest: dict[str, proto.EventClosed] = {}
    for e in stream_messages(url, "EVENTS"):
        if e.event_id not in latest or e.revision > latest[e.event_id].revision:
            latest[e.event_id] = e
    return latest


def summary(events) -> dict:
    return {
        eid: (
            e.started_at,
            e.ended_at,
            frozenset(e.file_ids),
            e.close_reason,
            dict(sorted((k, (v.count, v.max_score)) for k, v in e.labels.items())),
        )
        for eid, e in events.items()
    }


def check_contract(url: str, dets: list[Detections]) -> None:
    want = summary(reference_events(dets, RULES))
    try:
        got = wait_until(
            lambda: (s := summary(latest_events(url))) == want and s, timeout=60, what="the contract's events on EVENTS"
        )
    except AssertionError:
        have = summary(latest_events(url))
        missing = {k: v for k, v in want.items() if have.get(k) != v}
        extra = {k: v for k, v in have.items() if want.get(k) != v}
        raise AssertionError(
            f"{len(have)} events, the contract has {len(want)}; differing: want {list(missing.items())[:3]}"
            f" have {list(extra.items())[:3]}"
        ) from None
    owners: dict[str, str] = {}
    for eid, (_, _, keys, _, _) in got.items():
        for k in keys:
            assert k not in owners, f"{k} in two events"
            owners[k] = eid
    alerts = [a.event_id for a in stream_messages(url, "ALERTS")]
    assert len(alerts) == len(set(alerts)), "an event alerted twice"
    assert set(alerts) == {eid for eid, e in reference_events(dets, RULES).items() if "person" in e.labels}


def config_for(make_stack, window: int):
    return make_stack(
        model="none",
        aggregator={
            "idle_seconds": RULES.idle,
            "max_seconds": RULES.max_seconds,
            "max_detections": RULES.max_detections,
            "reorder_window": window,
            "reorder_seconds": 30.0,
            "batch_size": 4,
        },
    )  # batches smaller than the disorder


def test_shuffled_backlog_gives_the_events_of_the_sorted_one(make_stack, nats_server):
    """316 detections shuffled within windows of 16 once gave 53 events instead of 35."""
    rng = random.Random(7)
    dets = make_detections(rng, 320, base=time.time() - 3600)
    arrivals = block_shuffle(sorted(dets, key=order), 16, rng)
    stack = config_for(make_stack, window=max(1, lateness(arrivals)))
    stack.start("aggregator")  # declares the streams, then stops: the backlog builds up while it is down
    stack.wait_ready("aggregator")
    assert stack.stop("aggregator") == 0
    publish(nats_server.url, arrivals)
    stack.start("aggregator")
    check_contract(nats_server.url, dets)


def test_kill_9_at_random_moments_changes_nothing(make_stack, nats_server):
    """The aggregator is SIGKILLed three times while it works through a shuffled backlog that keeps
    arriving; every restart reloads KV, re-sends its outbox, and the result is still the contract's."""
    rng = random.Random(11)
    dets = make_detections(rng, 600, base=time.time() - 7200)
    arrivals = block_shuffle(sorted(dets, key=order), 8, rng)
    stack = config_for(make_stack, window=max(1, lateness(arrivals)))
    chunks = [arrivals[i : i + 150] for i in range(0, len(arrivals), 150)]
    stack.start("aggregator")
    stack.wait_ready("aggregator")
    for chunk in chunks[:-1]:
        publish(nats_server.url, chunk)
        time.sleep(rng.uniform(0.05, 0.6))
        stack.kill("aggregator")
        stack.start("aggregator")
    publish(nats_server.url, chunks[-1])
    check_contract(nats_server.url, dets)


def test_a_stuck_camera_clock_gives_bounded_events(make_stack, nats_server):
    """Every file with the same mtime: the event used to grow past max_payload; now it is cut every
    max_detections detections, and each message stays small."""
    t = time.time() - 60
    dets = [
        Detections(
            file_id=f"s{i:04}",
            camera="front_door",
            path=f"front_door/s{i:04}.jpg",
            captured_at=t,
            width=64,
            height=48,
            model="test",
            inference_ms=1.0,
            boxes=[CAT],
        )
        for i in range(40)
    ]
    stack = config_for(make_stack, window=64)
    stack.start("aggregator")
    stack.wait_ready("aggregator")
    publish(nats_server.url, dets)
    check_contract(nats_server.url, dets)
    assert all(len(e.file_ids) <= RULES.max_detections for e in latest_events(nats_server.url).values())


def test_late_duplicate_and_late_new_detection_after_the_events_closed(make_stack, nats_server, database):
    """Beyond the bound: a detection re-published long after its event closed is recognised (no new
    event, no new revision); a new one inside a closed event's time joins it as revision 2."""
    base = time.time() - 600
    dets = [
        Detections(
            file_id=f"d{i}",
            camera="front_door",
            path=f"front_door/d{i}.jpg",
            captured_at=base + t,
            width=64,
            height=48,
            model="test",
            inference_ms=1.0,
            boxes=[PERSON],
        )
        for i, t in enumerate([0, 1, 2, 30, 31])
    ]
    stack = config_for(make_stack, window=4)
    stack.start("aggregator")
    stack.wait_ready("aggregator")
    publish(nats_server.url, dets)
    check_contract(nats_server.url, dets)
    first = wait_until(
        lambda: len(latest_events(nats_server.url)) == 2 and latest_events(nats_server.url), what="two events"
    )
    before = len(stream_messages(nats_server.url, "EVENTS"))

    async def republish():  # a fresh msg id: past JetStream's duplicate window, as after `vigil dlq retry`
        nc = await nats.connect(nats_server.url)
        d = dets[1]
        await nc.jetstream().publish(
            proto.subject("detections", d.camera), proto.encode(d), headers=proto.headers_for(d, "retry-1")
        )
        await nc.close()

    asyncio.run(republish())
    time.sleep(RULES.idle + 2)
    assert len(stream_messages(nats_server.url, "EVENTS")) == before
    late = Detections(
        file_id="late",
        camera="front_door",
        path="front_door/late.jpg",
        captured_at=base + 1.5,
        width=64,
        height=48,
        model="test",
        inference_ms=1.0,
        boxes=[PERSON],
    )
    publish(nats_server.url, [late])
    joined = wait_until(
        lambda: (e := latest_events(nats_server.url)) and any(v.revision == 2 for v in e.values()) and e,
        what="revision 2",
    )
    assert set(joined) == set(first)
    ev = next(v for v in joined.values() if v.revision == 2)
    assert set(ev.file_ids) == {"d0", "d1", "d2", "late"}
    alerts = [a.event_id for a in stream_messages(nats_server.url, "ALERTS")]
    assert sorted(alerts) == sorted(set(alerts)) and len(alerts) == 2  # the late person alerted nothing more
    from tests.support import query

    stack.start("recorder")  # only now: it would take the events off the (interest) stream this test reads
    wait_until(
        lambda: (
            query(database, "SELECT revision, detection_count FROM events WHERE event_id = %s", ev.event_id) == [(2, 4)]
        ),
        what="the recorder keeping revision 2",
    )
