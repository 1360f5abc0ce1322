"""The rule-based analyzer: table-driven (labels, zones, night across midnight and a DST change, dwell,
count, confidence), and determinism over random events (hypothesis)."""

from __future__ import annotations

import datetime as dt
import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import EventClosed, LabelSummary, Spot
from proto.messages import risk_level
from services.analyzer import rules
from services.runtime.config import AnalyzerConfig, load_config

BERLIN = "Europe/Berlin"


def at(iso: str) -> float:
    """An instant written in UTC: "2026-06-01T12:00"."""
    return dt.datetime.fromisoformat(iso).replace(tzinfo=dt.UTC).timestamp()


def event(labels: dict[str, tuple[int, float]], start: float, duration: float = 0.0, spots=(), camera="front_door"):
    return EventClosed(
        event_id="ev-1",
        camera=camera,
        started_at=start,
        ended_at=start + duration,
        file_ids=["f1"],
        labels={k: LabelSummary(count=c, max_score=s) for k, (c, s) in labels.items()},
        best_file_id="f1",
        close_reason="idle",
        spots=[Spot(*s) for s in spots],
    )


PORCH = [[0, 400], [640, 400], [640, 720], [0, 720]]


def cfg(**over) -> AnalyzerConfig:
    base = {
        "timezone": BERLIN,
        "cameras": {"front_door": {"zones": [{"name": "porch", "points": 30, "labels": ["person"], "polygon": PORCH}]}},
    }
    return msgspec.convert({**base, **over}, AnalyzerConfig)


def factors(j: rules.Judgement) -> dict[str, int]:
    return {f.name: f.points for f in j.factors}


NOON = at("2026-06-01T10:00")  # 12:00 in Berlin (CEST)
MIDNIGHT_ISH = at("2026-06-01T21:30")  # 23:30 in Berlin


@pytest.mark.parametrize(
    ("labels", "start", "duration", "spots", "expect_factors", "expect_score", "expect_level"),
    [
        # a cat at noon: its 5 points, +6 for a 0.8 score
        ({"cat": (1, 0.8)}, NOON, 0, [], {"label cat": 5, "confidence": 6}, 11, "low"),
        # person >> car >> cat: each label counts once, the top (person) gets count/confidence
        (
            {"person": (1, 0.9), "car": (1, 0.7), "cat": (1, 0.9)},
            NOON,
            0,
            [],
            {"label person": 40, "label car": 15, "label cat": 5, "confidence": 8},
            68,
            "high",
        ),
        # a person at noon, not in the porch (feet above the zone)
        (
            {"person": (1, 0.9)},
            NOON,
            0,
            [("person", 320, 300, 0.9)],
            {"label person": 40, "confidence": 8},
            48,
            "medium",
        ),
        # the same person with their feet in the porch
        (
            {"person": (1, 0.9)},
            NOON,
            0,
            [("person", 320, 500, 0.9)],
            {"label person": 40, "confidence": 8, "zone porch": 30},
            78,
            "high",
        ),
        # a cat in the porch: the zone is for people only
        ({"cat": (1, 0.8)}, NOON, 0, [("cat", 320, 500, 0.8)], {"label cat": 5, "confidence": 6}, 11, "low"),
        # a person in the porch at 23:30: x1.5 -> critical
        (
            {"person": (1, 0.9)},
            MIDNIGHT_ISH,
            0,
            [("person", 320, 500, 0.9)],
            {"label person": 40, "confidence": 8, "zone porch": 30, "night": 39},
            100,
            "critical",
        ),
        # dwell: 30 s of a 60 s full share -> 8 of 15; count: 4 detections -> 3 x 3 = 9
        (
            {"person": (4, 0.5)},
            NOON,
            30,
            [],
            {"label person": 40, "count": 9, "dwell": 8},
            57,
            "medium",
        ),
        # count is capped (12), dwell too (15)
        ({"person": (40, 0.5)}, NOON, 600, [], {"label person": 40, "count": 12, "dwell": 15}, 67, "high"),
        # a weak detection loses points
        ({"person": (1, 0.3)}, NOON, 0, [], {"label person": 40, "confidence": -4}, 36, "medium"),
        # an unknown label: other_label_points, no night bonus on nothing
        ({"cup": (1, 0.5)}, MIDNIGHT_ISH, 0, [], {"label cup": 2, "night": 1}, 3, "low"),
        ({}, MIDNIGHT_ISH, 0, [], {}, 0, "low"),
    ],
)
def test_rules_table(labels, start, duration, spots, expect_factors, expect_score, expect_level):
    j = rules.judge(event(labels, start, duration, spots), rules.camera_rules(cfg(), "front_door"))
    assert factors(j) == expect_factors
    assert (j.score, j.level) == (expect_score, expect_level)
    assert j.level == risk_level(j.score)


@pytest.mark.parametrize(
    ("iso_utc", "tz", "night"),
    [
        ("2026-06-01T19:59", BERLIN, False),  # 21:59 CEST
        ("2026-06-01T20:00", BERLIN, True),  # 22:00 CEST: the range starts
        ("2026-06-01T22:30", BERLIN, True),  # 00:30, across midnight
        ("2026-06-02T03:59", BERLIN, True),  # 05:59
        ("2026-06-02T04:00", BERLIN, False),  # 06:00: the range has ended
        # the spring DST change (29 March 2026, 02:00 CET -> 03:00 CEST): 04:30 UTC is 06:30 on the
        # wall clock, day, though it would still be 05:30 (night) at the winter offset
        ("2026-03-29T04:30", BERLIN, False),
        ("2026-03-28T04:30", BERLIN, True),  # the day before, 05:30 CET: night
        # the same instant on another camera's clock
        ("2026-06-01T22:30", "America/New_York", False),  # 18:30 EDT
    ],
)
def test_night_is_on_the_cameras_clock(iso_utc, tz, night):
    config = cfg(cameras={"front_door": {"timezone": tz}})
    j = rules.judge(event({"person": (1, 0.9)}, at(iso_utc)), rules.camera_rules(config, "front_door"))
    assert j.night is night
    assert ("night" in factors(j)) is night


def test_per_camera_points_and_night_override_the_defaults():
    config = cfg(cameras={"garden": {"label_points": {"cat": 0, "person": 50}, "night": "20:00-08:00"}})
    j = rules.judge(
        event({"cat": (3, 0.9), "person": (1, 0.5)}, at("2026-06-01T19:00"), camera="garden"),
        rules.camera_rules(config, "garden"),
    )
    assert factors(j) == {"label person": 50, "night": 25}  # 21:00 Berlin: within 20:00-08:00; no cat points
    assert j.summary == "Person and cat on garden at 21:00 (night): high risk (75)"


def test_summary_is_one_sentence_for_a_phone():
    j = rules.judge(
        event({"person": (2, 0.9)}, MIDNIGHT_ISH, 12, [("person", 10, 500, 0.9)]),
        rules.camera_rules(cfg(), "front_door"),
    )
    assert j.summary == "Person in porch on front_door at 23:30 (night) for 12 s: critical risk (100)"


@pytest.mark.parametrize(
    ("point", "inside"),
    [((5, 5), True), ((15, 5), False), ((5, 15), False), ((9.9, 1), True), ((-1, 5), False), ((4, 6), True)],
)
def test_point_in_polygon(point, inside):
    square = [(0, 0), (10, 0), (10, 10), (0, 10)]
    assert rules.inside(*point, square) is inside
    assert rules.inside(*point, list(reversed(square))) is inside  # either winding


def test_a_concave_zone():
    ell = [(0, 0), (10, 0), (10, 2), (2, 2), (2, 10), (0, 10)]  # an L
    assert rules.inside(1, 9, ell) and rules.inside(9, 1, ell) and not rules.inside(5, 5, ell)


label_names = st.sampled_from(["person", "car", "cat", "dog", "cup", "bird"])
events = st.builds(
    lambda labels, start, dur, spots: (labels, start, dur, spots),
    st.dictionaries(label_names, st.tuples(st.integers(1, 50), st.floats(0, 1)), max_size=5),
    st.floats(at("2025-01-01T00:00"), at("2028-01-01T00:00")),
    st.floats(0, 300),
    st.lists(st.tuples(label_names, st.integers(-100, 1500), st.integers(-100, 900), st.floats(0, 1)), max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(events, st.randoms())
def test_same_input_same_output_whatever_the_order_of_its_labels(ev, rnd: random.Random):
    """The judgement depends on the event's content only: labels in another order (a dict built in
    another arrival order), a fresh decode, a second run: the same score, factors and sentence."""
    labels, start, dur, spots = ev
    spots = sorted(spots, key=lambda s: (-s[3], s[0], s[1], s[2]))  # as the aggregator emits them: best first
    a = event(labels, start, dur, spots)
    shuffled = list(labels.items())
    rnd.shuffle(shuffled)
    b = msgspec.json.decode(msgspec.json.encode(event(dict(shuffled), start, dur, spots)), type=EventClosed)
    cr = rules.camera_rules(cfg(), "front_door")
    ja, jb = rules.judge(a, cr), rules.judge(b, cr)
    assert ja == jb == rules.judge(a, cr)
    assert 0 <= ja.score <= 100 and ja.level == risk_level(ja.score)


def test_zone_and_time_zone_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[analyzer.cameras.front_door]\nzones = [{name = "porch", polygon = [[0, 0], [1, 1]]}]\n')
    with pytest.raises(Exception, match=r"analyzer.cameras\[...\].zones\[0\].polygon"):
        load_config(bad, environ={})
    bad.write_text('[analyzer]\nnight = "22:00-25:00"\n')
    with pytest.raises(Exception, match=r"analyzer.night"):
        load_config(bad, environ={})
    bad.write_text('[analyzer.cameras.x]\ntimezone = "Mars/Olympus"\n')
    with pytest.raises(Exception, match=r"unknown time zone 'Mars/Olympus'.*analyzer.cameras"):
        load_config(bad, environ={})
