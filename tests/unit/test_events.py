"""Event grouping, pure logic: the contract (reference_events), the reorder buffer and the incremental
grouper, held against each other with hypothesis over random detections and arrival orders."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proto import Box, Detections
from services.aggregator.grouping import (
    CameraState,
    EventState,
    ReorderBuffer,
    Rules,
    add_to,
    dirty,
    group_in_order,
    new_event,
    order,
    place_late,
    reference_events,
)

PERSON = Box("person", 0.95, 0, 0, 10, 10)
CAT = Box("cat", 0.6, 0, 0, 10, 10)
RULES = Rules(idle=30, max_seconds=90, max_detections=5)


def det(fid, t, camera="cam", boxes=(PERSON,)):
    return Detections(
        file_id=fid,
        camera=camera,
        path=f"{camera}/{fid}.jpg",
        captured_at=t,
        width=100,
        height=100,
        model="m",
        inference_ms=1.0,
        boxes=list(boxes),
    )


class Simulation:
    """The aggregator's grouping without its I/O: buffer -> in order or late -> events (latest revision)."""

    def __init__(self, rules: Rules, window: int) -> None:
        self.rules = rules
        self.buffer = ReorderBuffer(window=window, hold_seconds=1e9, cap=10**9)
        self.states: dict[str, CameraState] = {}
        self.events: dict[str, EventState] = {}  # every event ever published or current
        self.alerts: list = []

    def _group(self, d: Detections) -> None:
        state = self.states.setdefault(d.camera, CameraState())
        sealed = state.sealed()
        if sealed is None or (d.captured_at, d.key) > sealed:
            _, alert = group_in_order(state, d, self.rules, 0.0)
            self.events[state.current.event_id] = state.current
        else:
            lo = d.captured_at - self.rules.max_seconds - self.rules.idle
            hi = d.captured_at + self.rules.idle
            cands = [e for e in self.events.values() if e.camera == d.camera and lo <= e.started_at <= hi]
            where, ev = place_late(d, cands, self.rules)
            if where == "duplicate":
                return
            ev = ev or new_event(d)
            alert = add_to(ev, d, self.rules, 0.0)
            self.events[ev.event_id] = ev
        if alert is not None:
            self.alerts.append(alert)

    def feed(self, arrivals: list[Detections]) -> None:
        for i, d in enumerate(arrivals):
            if d.boxes:
                self.buffer.add(d, i, 0.0)
            for held in self.buffer.release(0.0):
                self._group(held.det)
        for held in self.buffer.release(0.0, self.buffer.latest()):
            self._group(held.det)
        for e in self.events.values():  # what a commit does once its PubAcks came
            e.published = e.revision

    def final(self) -> dict[str, tuple]:
        return {eid: summary(e.started_at, e.ended_at, e.keys, e.close_reason) for eid, e in self.events.items()}


def summary(start, end, keys, reason):
    return (start, end, frozenset(keys), reason)


def reference(dets, rules=RULES):
    return {
        eid: summary(e.started_at, e.ended_at, e.file_ids, e.close_reason)
        for eid, e in reference_events(dets, rules).items()
    }


def block_shuffle(items: list, k: int, rng: random.Random) -> list:
    """Shuffled within windows of k consecutive messages (what the black-box review did with k = 16)."""
    out = []
    for i in range(0, len(items), k):
        block = items[i : i + k]
        rng.shuffle(block)
        out += block
    return out


def lateness(arrivals: list[Detections]) -> int:
    """The reorder window this arrival order needs: per camera, the most detections captured later
    than one that arrived before it."""
    worst = 0
    for camera in {d.camera for d in arrivals}:
        seen: list[tuple[float, str]] = []
        for d in (d for d in arrivals if d.camera == camera and d.boxes):
            worst = max(worst, sum(1 for o in seen if o > order(d)))
            seen.append(order(d))
    return worst


detections = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 2000), st.booleans()),
    min_size=1,
    max_size=120,
).map(
    lambda rows: [
        det(f"f{i}", float(t), camera=cam, boxes=(PERSON,) if person else (CAT,))
        for i, (cam, t, person) in enumerate(rows)
    ]
)


# ---- the contract itself ------------------------------------------------------------------------
def test_idle_gap_max_window_and_max_detections_cut():
    ev = reference([det("a", 0), det("b", 10), det("c", 25), det("d", 60)])
    assert sorted((s, e, r) for s, e, _, r in ev.values()) == [(0, 25, "idle"), (60, 60, "idle")]
    ev = reference([det(str(i), i * 20) for i in range(7)])  # 0..120 s, never idle
    assert sorted((s, e, r) for s, e, _, r in ev.values()) == [(0, 80, "max_window"), (100, 120, "idle")]
    ev = reference([det(str(i), 1000.0) for i in range(12)])  # a stuck clock: one time for every file
    assert sorted((len(k), r) for _, _, k, r in ev.values()) == [
        (2, "idle"),
        (5, "max_detections"),
        (5, "max_detections"),
    ]


def test_max_seconds_is_a_true_bound_whatever_the_order():
    """An older detection arriving last used to pull started_at back past max_seconds."""
    dets = [det(str(i), 100 + i * 10) for i in range(9)] + [det("old", 95)]
    sim = Simulation(RULES, window=16)
    sim.feed(list(reversed(dets)))
    assert all(e.ended_at - e.started_at <= RULES.max_seconds for e in sim.events.values())
    assert sim.final() == reference(dets)


def test_boxless_detections_make_no_event():
    assert reference([det("a", 0, boxes=())]) == {}


# ---- properties ----------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(dets=detections, k=st.integers(1, 32), seed=st.integers(0, 2**32 - 1))
def test_disorder_within_the_bound_never_changes_an_event(dets, k, seed):
    """Any arrival order within the reorder window gives exactly the contract's events (a window one
    smaller than the order needs fails this test: checked by hand)."""
    arrivals = block_shuffle(sorted(dets, key=order), k, random.Random(seed))
    sim = Simulation(RULES, window=max(1, lateness(arrivals)))
    sim.feed(arrivals)
    assert sim.final() == reference(dets)


@settings(max_examples=300, deadline=None)
@given(dets=detections, seed=st.integers(0, 2**32 - 1), window=st.integers(1, 8), dup=st.integers(0, 20))
def test_any_order_and_redeliveries_keep_every_detection_in_exactly_one_event(dets, seed, window, dup):
    """Beyond the bound (any order, with redeliveries): nothing lost, nothing in two events, events
    within their bounds, at most one alert per event."""
    rng = random.Random(seed)
    arrivals = dets + [rng.choice(dets) for _ in range(dup)]
    rng.shuffle(arrivals)
    sim = Simulation(RULES, window=window)
    sim.feed(arrivals)
    owner: dict[str, str] = {}
    for e in sim.events.values():
        assert len(e.keys) <= RULES.max_detections
        assert e.ended_at - e.started_at <= RULES.max_seconds
        for key in e.keys:
            assert key not in owner, f"{key} in {owner.get(key)} and {e.event_id}"
            owner[key] = e.event_id
    assert set(owner) == {d.key for d in dets}
    alerted = [a.event_id for a in sim.alerts]
    assert len(alerted) == len(set(alerted))


def test_a_duplicate_days_later_is_recognised_and_a_new_late_detection_joins_its_event():
    sim = Simulation(RULES, window=1)
    sim.feed([det("a", 0), det("b", 10), det("c", 500), det("d", 600)])
    before = {e.event_id: (list(e.keys), e.revision) for e in sim.events.values()}
    sim.feed([det("a", 0)])  # re-published days later: already in an event
    assert {e.event_id: (list(e.keys), e.revision) for e in sim.events.values()} == before
    sim.feed([det("late", 5)])  # new, inside the first event's time: joins it with a higher revision
    first = next(e for e in sim.events.values() if "a" in e.keys)
    assert first.keys == ["a", "b", "late"] and first.revision > before[first.event_id][1]
    assert len(sim.events) == 3


def test_alert_once_per_event_even_when_revised():
    sim = Simulation(RULES, window=1)
    sim.feed([det("a", 0, boxes=[Box("person", 0.5, 0, 0, 1, 1)]), det("b", 1), det("c", 2), det("d", 100)])
    assert [a.file_id for a in sim.alerts] == ["b", "d"]
    sim.feed([det("e", 3)])  # a late person in the first event: its revision goes out, no second alert
    assert [a.file_id for a in sim.alerts] == ["b", "d"]


def test_labels_and_best_frame():
    (ev,) = reference_events([det("a", 0, boxes=[PERSON, CAT]), det("b", 1, boxes=[CAT])], RULES).values()
    assert ev.labels["cat"].count == 2 and ev.labels["person"].max_score == 0.95 and ev.best_file_id == "a"


# ---- the reorder buffer ----------------------------------------------------------------------------
def test_buffer_releases_by_time_count_and_pressure_in_capture_order():
    buf = ReorderBuffer(window=3, hold_seconds=10, cap=5)
    for i, t in enumerate([5, 3, 4]):
        buf.add(det(f"x{i}", t), None, now=0.0)
    assert buf.release(now=1.0) == []  # within window and hold time
    buf.add(det("x3", 1), None, now=2.0)
    assert [h.det.captured_at for h in buf.release(now=2.0)] == [1]  # the window overflowed: the earliest goes
    # held 10 s: the first arrival (t=5) and everything captured before it go, in order
    assert [h.det.captured_at for h in buf.release(now=10.0)] == [3, 4, 5]
    for i in range(6):
        buf.add(det(f"y{i}", 100 + i, camera=f"c{i % 3}"), None, now=11.0)
    assert len(buf.release(now=11.0)) == 1 and len(buf) == 5  # never more than cap held


def test_buffer_keeps_a_redelivery_with_the_first_copy():
    buf = ReorderBuffer(window=10, hold_seconds=10, cap=100)
    assert buf.add(det("a", 1), "m1", 0.0) and not buf.add(det("a", 1), "m2", 0.0)
    (held,) = buf.release(0.0, buf.latest())
    assert held.msgs == ["m1", "m2"] and len(buf) == 0


def test_revisions_coalesce_until_published():
    state = CameraState()
    group_in_order(state, det("a", 0), RULES, 0.0)
    group_in_order(state, det("b", 1), RULES, 0.0)
    ev = state.current
    assert ev.revision == 1 and dirty(ev)
    ev.published = ev.revision
    group_in_order(state, det("c", 2), RULES, 0.0)
    assert ev.revision == 2 and dirty(ev)


def test_the_state_budget_overestimates_the_real_size():
    """services/aggregator/service.py stops a commit once a camera's state would pass STATE_BUDGET; the estimate
    must never be below the real JSON size, or a value could still reach max_payload."""
    import msgspec

    from services.aggregator.service import STATE_BUDGET, state_bytes

    def full_event(n: int, tag: str) -> EventState:
        ev = new_event(det(f"{tag}{0:040x}:120", 1.0))
        for i in range(n):
            add_to(
                ev,
                det(f"{tag}{i:040x}:120", 1.0 + i, boxes=[PERSON, CAT, Box("car", 0.5, 0, 0, 1, 1)]),
                RULES._replace(max_detections=n),
                0.0,
            )
        return ev

    state = CameraState(current=full_event(4000, "a"))
    changed = {e.event_id: e for e in (full_event(4000, "b"), state.current)}
    state.outbox = list(changed.values())
    assert len(msgspec.json.encode(state)) <= state_bytes(state, changed)
    # the most one commit can hold: the budget, plus one more full event, plus the current one again
    assert STATE_BUDGET + 2 * state_bytes(CameraState(current=full_event(4000, "c")), {}) < 1024 * 1024


def test_the_previous_aggregators_open_event_survives_an_upgrade():
    import msgspec

    from services.aggregator.service import from_legacy

    old = {
        "open": {
            "event_id": "ev-1",
            "camera": "cam",
            "started_at": 10.0,
            "last_at": 20.0,
            "last_arrival": 5.0,
            "file_ids": ["a", "b"],
            "labels": {"person": {"count": 2, "max_score": 0.95}},
            "best_file_id": "a",
            "best_score": 0.95,
            "alerted": True,
        },
        "last_closed_ids": ["x"] * 2000,
    }
    state = from_legacy(msgspec.json.encode(old))
    assert state.current.event_id == "ev-1" and state.current.keys == ["a", "b"] and state.current.alerted
    assert dirty(state.current)  # never published: it goes out when cut or quiet
    _, alert = group_in_order(state, det("c", 25), RULES, 0.0)  # goes on in the same event, no second alert
    assert state.current.event_id == "ev-1" and alert is None
    assert from_legacy(b"garbage") is None


def test_a_detector_killed_twice_hands_its_uploads_back_inside_the_reorder_bound():
    """An upload held by a detector that is killed comes back after backoff[0], and after backoff[1]
    more if its next holder is killed too (the chaos run does that): both must fit in the default
    reorder_seconds, with room for the inference, or the event it starts gets the wrong id."""
    from proto.topology import consumer
    from services.runtime.config import AggregatorConfig

    spec = consumer("detector")
    assert spec.ack_wait == spec.backoff[0]  # the server uses backoff[0]; say what it does
    assert spec.backoff[0] + spec.backoff[1] + 5.0 <= AggregatorConfig().reorder_seconds
