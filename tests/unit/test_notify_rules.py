"""Notify rules, pure logic: schedules (overnight, days), quiet hours, levels, cameras, dedupe keys;
and the config's refusals (a secret in clear, duplicate names, min_risk with min_level)."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from proto import Alert, AnalyzerInfo, EventAnalyzed
from services.notifier import rules
from services.runtime.config import ConfigError, NotifyRule, load_config

TZ = "Europe/Berlin"


def local(iso: str) -> float:
    """An instant written on Berlin's wall clock."""
    from zoneinfo import ZoneInfo

    return dt.datetime.fromisoformat(iso).replace(tzinfo=ZoneInfo(TZ)).timestamp()


def rule(**kw) -> NotifyRule:
    return msgspec.convert({"name": "r", "urls": ["json://127.0.0.1/x"], "timezone": TZ, **kw}, NotifyRule)


def analysis(score=90, camera="front_door", labels=("person",), zones=("porch",), start=None) -> EventAnalyzed:
    from proto.messages import risk_level

    return EventAnalyzed(
        event_id="ev-1",
        revision=1,
        camera=camera,
        risk_score=score,
        risk_level=risk_level(score),
        summary="Person in porch",
        analyzer=AnalyzerInfo(name="rules", version="1"),
        analyzed_at=0.0,
        started_at=start if start is not None else local("2026-06-03T23:30"),
        labels=list(labels),
        zones=list(zones),
    )


def fires(r: NotifyRule, a) -> bool:
    f = rules.of_analysis(a) if isinstance(a, EventAnalyzed) else rules.of_alert(a)
    return rules.mismatch(r, f, None) is None


# 2026-06-03 is a Wednesday
@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("2026-06-03T23:30", True),  # Wednesday night
        ("2026-06-04T01:00", True),  # Thursday 01:00: the range that began on Wednesday
        ("2026-06-03T12:00", False),
        ("2026-06-03T22:00", True),  # the start counts
        ("2026-06-04T06:00", False),  # the end does not
        ("2026-06-05T23:30", False),  # Friday night: not a scheduled day
        ("2026-06-06T01:00", False),  # Saturday 01:00 (Friday's night)
        ("2026-06-04T23:30", True),  # Thursday night
        ("2026-06-05T01:00", True),  # Friday 01:00 belongs to Thursday's range
    ],
)
def test_an_overnight_schedule_belongs_to_the_day_it_starts(when, expected):
    r = rule(schedule={"days": ["mon", "tue", "wed", "thu"], "times": ["22:00-06:00"]})
    assert fires(r, analysis(start=local(when))) is expected


def test_several_ranges_and_the_whole_day():
    r = rule(schedule={"days": ["sat", "sun"], "times": ["08:00-09:00", "18:00-19:00"]})
    assert fires(r, analysis(start=local("2026-06-06T08:30")))  # Saturday
    assert not fires(r, analysis(start=local("2026-06-06T12:00")))
    assert fires(r, analysis(start=local("2026-06-07T18:59")))
    assert not fires(r, analysis(start=local("2026-06-08T08:30")))  # Monday
    assert fires(rule(schedule={"days": ["wed"]}), analysis(start=local("2026-06-03T12:00")))  # default: all day


@pytest.mark.parametrize(
    ("when", "quiet"), [("2026-06-03T23:30", True), ("2026-06-04T00:30", True), ("2026-06-04T01:00", False)]
)
def test_quiet_hours_suppress(when, quiet):
    r = rule(quiet_hours=["23:00-01:00"])
    assert rules.mismatch(r, rules.of_analysis(analysis(start=local(when))), None) == ("quiet_hours" if quiet else None)


def test_levels_scores_labels_zones_and_cameras():
    assert fires(rule(min_level="critical"), analysis(score=85))
    assert not fires(rule(min_level="critical"), analysis(score=84))
    assert fires(rule(min_risk=60), analysis(score=60)) and not fires(rule(min_risk=60), analysis(score=59))
    assert fires(rule(labels=["car", "person"]), analysis()) and not fires(rule(labels=["car"]), analysis())
    assert fires(rule(zones=["porch"]), analysis()) and not fires(rule(zones=["street"]), analysis(zones=()))
    assert fires(rule(cameras=["front_door"]), analysis()) and not fires(rule(cameras=["backyard"]), analysis())


def test_health_alerts_reach_only_rules_that_name_camera_system():
    alert = Alert(
        alert_id="a1",
        camera="system",
        kind="disk_low",
        severity="warning",
        message="disk 95% full",
        created_at=local("2026-06-03T12:00"),
    )
    assert not fires(rule(), alert)  # no cameras: every camera but system
    assert fires(rule(cameras=["system"]), alert)
    assert fires(rule(cameras=["system"], labels=["disk_low"]), alert)
    assert not fires(rule(cameras=["system"], labels=["service_down"]), alert)
    assert not fires(rule(cameras=["system"], min_level="critical"), alert)  # warning is "high"
    silent = Alert(
        alert_id="a2", camera="garage", kind="camera_silent", message="garage silent", created_at=0.0, state="resolved"
    )
    f = rules.of_alert(silent)
    assert f.camera == "system" and f.title == "vigil: camera silent resolved (garage)"
    pipeline = Alert(
        alert_id="ev-1-person", camera="front_door", kind="person", message="p", created_at=0.0, event_id="ev-1"
    )
    assert not rules.is_system_alert(pipeline)  # it reaches the rules through its event's analysis


def test_dedupe_keys():
    f = rules.of_analysis(analysis())
    assert rules.dedupe_key(rule(), f) == "front_door/r"
    assert rules.dedupe_key(rule(dedupe=["rule"]), f) == "r"
    assert rules.dedupe_key(rule(dedupe=["camera", "label", "zone"]), f) == "front_door/person/porch"
    alert = rules.of_alert(Alert(alert_id="a", camera="system", kind="disk_low", message="m", created_at=0.0))
    assert rules.dedupe_key(rule(), alert) == "system/r/disk_low"  # one condition does not cool another down


@pytest.mark.parametrize(
    ("url", "what"),
    [
        ("ntfys://bob:hunter2@ntfy.sh/topic", "a password"),
        ("json://example.com/hook?token=abc123", "the parameter token"),
        ("pover://user@host?key=abc", "the parameter key"),
    ],
)
def test_a_secret_in_clear_stops_the_config(tmp_path, url, what):
    path = tmp_path / "v.toml"
    path.write_text(f'[[notify.rules]]\nname = "porch"\nurls = ["{url}"]\n')
    with pytest.raises(ConfigError, match=rf"urls\[0\] holds {what} in clear.*notify.rules\[0\]"):
        load_config(path, environ={})


def test_placeholders_pass_and_the_rule_errors_name_the_field(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text(
        '[[notify.rules]]\nname = "porch"\nurls = ["ntfys://bob:{secret:ntfy}@ntfy.sh/topic", "json://h/x?token={secret:t}"]\n'
    )
    assert load_config(path, environ={}).notify.rules[0].name == "porch"
    path.write_text(
        '[[notify.rules]]\nname = "a"\nurls = ["json://h"]\n[[notify.rules]]\nname = "a"\nurls = ["json://h"]\n'
    )
    with pytest.raises(ConfigError, match=r"rule names must be unique: a twice"):
        load_config(path, environ={})
    path.write_text('[[notify.rules]]\nname = "a"\nurls = ["json://h"]\nmin_risk = 50\nmin_level = "high"\n')
    with pytest.raises(ConfigError, match=r"min_risk or min_level, not both.*notify.rules\[0\]"):
        load_config(path, environ={})
    path.write_text('[[notify.rules]]\nname = "a"\nurls = ["json://h"]\nschedule = {times = ["22:00-6:00"]}\n')
    with pytest.raises(ConfigError, match=r"notify.rules\[0\].schedule.times\[0\]"):
        load_config(path, environ={})
