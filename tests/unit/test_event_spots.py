"""Where an event's boxes stood (`EventClosed.spots`, what the analyzer's zones are tested on) is a
function of the event's detections alone: any arrival order, folded one by one (the reference) or added
to the live event (the aggregator), deduplicated per (label, x, y) at its best score, the best
MAX_SPOTS kept."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proto import Box, Detections
from proto.messages import MAX_SPOTS
from services.aggregator.grouping import Rules, add_to, merge_spots, new_event, reference_events

RULES = Rules(idle=1e9, max_seconds=1e9, max_detections=4000)  # one event, whatever the times

coords = st.integers(0, 6).map(lambda v: v * 10.0)  # a coarse grid: the same spot comes up again and again
boxes = st.builds(
    lambda label, score, x, y: Box(label, score, x, y - 20, x + 20, y),
    st.sampled_from(["person", "car", "cat"]),
    st.floats(0.05, 1.0),
    coords,
    coords,
)
detections = st.lists(st.lists(boxes, min_size=1, max_size=12), min_size=1, max_size=40).map(
    lambda per_file: [
        Detections(file_id=f"f{i:03}", camera="cam", path=f"cam/f{i:03}.jpg", captured_at=float(i), width=100, height=100, model="m", inference_ms=0.0, boxes=b)
        for i, b in enumerate(per_file)
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(detections, st.randoms())
def test_spots_do_not_depend_on_the_order_the_detections_came_in(dets, rnd: random.Random):
    (ref,) = reference_events(dets, RULES).values()
    shuffled = list(dets)
    rnd.shuffle(shuffled)
    folded: list = []
    for d in shuffled:
        folded = merge_spots(folded, d)
    ev = new_event(shuffled[0])
    for d in shuffled:
        add_to(ev, d, RULES, now=0.0)
    assert folded == ref.spots == ev.message().spots
    assert len(ref.spots) <= MAX_SPOTS
    # best first, one per place, each at the best score any box had there
    assert [s.score for s in ref.spots] == sorted((s.score for s in ref.spots), reverse=True)
    best: dict = {}
    for d in dets:
        for b in d.boxes:
            k = (b.label, round((b.x1 + b.x2) / 2), round(b.y2))
            best[k] = max(best.get(k, 0.0), b.score)
    assert {(s.label, s.x, s.y): s.score for s in ref.spots}.items() <= best.items()
    if len(best) <= MAX_SPOTS:
        assert len(ref.spots) == len(best)


def test_more_places_than_the_cap_keep_the_best():
    many = [
        Detections(file_id=f"f{i}", camera="cam", path="p", captured_at=float(i), width=1, height=1, model="m", inference_ms=0.0,
                   boxes=[Box("person", (i + 1) / 1000, i, 0, i, 5)])
        for i in range(MAX_SPOTS + 50)
    ]  # fmt: skip
    (ev,) = reference_events(many, RULES).values()
    assert len(ev.spots) == MAX_SPOTS and ev.spots[-1].score == (50 + 1) / 1000
