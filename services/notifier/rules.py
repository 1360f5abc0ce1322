"""Notify rules, pure logic: what an analysis or a health alert is as far as the rules care (`Facts`),
whether a rule wants it (`mismatch`), and the key its cooldown goes by (`dedupe_key`).

A rule fires when every condition it gives holds: cameras (no list: every camera but "system"; health's
alerts are camera "system" and reach only rules that name it), labels (any), zones (any), min_risk or
min_level, schedule (days and time ranges; an overnight range belongs to the day it starts on), and
not quiet_hours. Times are the event's own (its start; an alert's creation) on the rule's clock, so a
backlog replayed after an outage is judged as it would have been at the time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import NamedTuple

from proto import Alert, EventAnalyzed
from proto.messages import RISK_LEVELS, RiskLevel, Severity, risk_level
from proto.topology import SYSTEM_CAMERA
from services.runtime import timeranges
from services.runtime.config import WEEKDAYS, NotifyRule, Schedule


class Facts(NamedTuple):
    source_id: str  # the event id (revisions share it: a rule fires once per event) or the alert id
    camera: str
    labels: tuple[str, ...]
    zones: tuple[str, ...]
    score: int
    level: RiskLevel
    event_time: float
    title: str
    body: str
    event_id: str | None  # for the web UI's link
    snapshot: str | None = None  # the event's annotated snapshot (relative to <state_dir>/snapshots)


def of_analysis(a: EventAnalyzed) -> Facts:
    return Facts(
        source_id=a.event_id,
        camera=a.camera,
        labels=tuple(a.labels),
        zones=tuple(a.zones),
        score=a.risk_score,
        level=a.risk_level,
        event_time=a.started_at or a.analyzed_at,
        title=f"{a.risk_level.capitalize()} risk on {a.camera}",
        body=a.summary,
        event_id=a.event_id,
        snapshot=a.snapshot,
    )


# A health alert's severity as a risk score, so min_risk / min_level read the same for both kinds.
SEVERITY_SCORE: dict[Severity, int] = {"info": 10, "warning": 70, "critical": 90}


def of_alert(alert: Alert) -> Facts:
    score = SEVERITY_SCORE[alert.severity]
    resolved = alert.state == "resolved"
    return Facts(
        source_id=alert.alert_id,
        camera=SYSTEM_CAMERA,
        labels=(alert.kind,),
        zones=(),
        score=score,
        level=risk_level(score),
        event_time=alert.created_at,
        title=f"vigil: {alert.kind.replace('_', ' ')}{' resolved' if resolved else ''}"
        + (f" ({alert.camera})" if alert.camera != SYSTEM_CAMERA else ""),
        body=alert.message,
        event_id=None,
    )


def is_system_alert(alert: Alert) -> bool:
    """Health's (and the detector's) alerts; the aggregator's fast-path alert belongs to an event, which
    reaches the rules through its analysis."""
    return alert.event_id is None


def in_schedule(schedule: Schedule, when: dt.datetime) -> bool:
    minute = timeranges.minute_of_day(when)
    today = WEEKDAYS[when.weekday()]
    yesterday = WEEKDAYS[(when.weekday() - 1) % 7]
    for text in schedule.times:
        rng = timeranges.parse_range(text)
        if not timeranges.overnight(rng) or rng[0] == rng[1]:
            if today in schedule.days and timeranges.in_range(minute, rng):
                return True
        elif (today in schedule.days and minute >= rng[0]) or (yesterday in schedule.days and minute < rng[1]):
            return True
    return False


def mismatch(rule: NotifyRule, f: Facts, default_tz: str | None) -> str | None:
    """Why `rule` does not fire for `f` (a short reason for the log and the counters), or None: it fires."""
    if rule.cameras is None:
        if f.camera == SYSTEM_CAMERA:
            return "camera"
    elif f.camera not in rule.cameras:
        return "camera"
    if rule.labels is not None and not set(rule.labels) & set(f.labels):
        return "labels"
    if rule.zones is not None and not set(rule.zones) & set(f.zones):
        return "zones"
    if rule.min_risk is not None and f.score < rule.min_risk:
        return "risk"
    if rule.min_level is not None and RISK_LEVELS.index(f.level) < RISK_LEVELS.index(rule.min_level):
        return "risk"
    when = timeranges.local(f.event_time, rule.timezone or default_tz)
    if rule.schedule is not None and not in_schedule(rule.schedule, when):
        return "schedule"
    if rule.quiet_hours and timeranges.in_any(when, rule.quiet_hours):
        return "quiet_hours"
    return None


def dedupe_key(rule: NotifyRule, f: Facts) -> str:
    """The key a cooldown goes by: the rule's dedupe fields of these facts (health alerts add their kind:
    a disk that fills is not the same news as a service that stopped)."""
    parts = []
    for field in rule.dedupe:
        if field == "camera":
            parts.append(f.camera)
        elif field == "rule":
            parts.append(rule.name)
        elif field == "label":
            parts.append(",".join(sorted(set(f.labels) & set(rule.labels) if rule.labels else f.labels)))
        elif field == "zone":
            parts.append(",".join(sorted(set(f.zones) & set(rule.zones) if rule.zones else f.zones)))
    if f.camera == SYSTEM_CAMERA and "label" not in rule.dedupe:
        parts.append(",".join(f.labels))
    return "/".join(parts)


def key_hash(text: str) -> str:
    """A KV key token for any text (ids and keys may hold characters a key may not)."""
    return hashlib.sha256(text.encode()).hexdigest()[:32]
