"""The rule-based analyzer: an event's risk score (0-100), its level, a sentence, and the factors that
make the score, from the event and the config alone. Same input, same output: no clock, no state.

The score is the sum of these factors, clamped to 0-100 (each factor is shown with its points):
- `label <name>`: the label's points (analyzer.label_points, the camera's over them; other labels
  other_label_points), once per label seen.
- `count`: count_points per detection of the top label after its first, at most count_max_points.
- `dwell`: dwell_points x min(1, the event's duration / dwell_full_seconds).
- `confidence`: score_points x (2 x the top label's best score - 1): +score_points at 1.0, 0 at 0.5.
- `zone <name>`: the zone's points, once per zone in which a box of its labels stood (its bottom-centre).
- `night`: (night_multiplier - 1) x the sum of the above when it is positive and the event started in
  the night hours on the camera's clock (its time zone, DST included).
The top label is the one with the most points (then the best score, then the name).
"""

from __future__ import annotations

from typing import NamedTuple

from proto import EventClosed, Factor, printable
from proto.messages import RiskLevel, risk_level
from services.runtime import timeranges
from services.runtime.config import AnalyzerConfig, Zone

VERSION = "rules-1"


class CameraRules(NamedTuple):
    label_points: dict[str, int]
    other_label_points: int
    count_points: int
    count_max_points: int
    dwell_points: int
    dwell_full_seconds: float
    score_points: int
    night: str
    night_multiplier: float
    timezone: str | None
    zones: tuple[Zone, ...]


def camera_rules(cfg: AnalyzerConfig, camera: str) -> CameraRules:
    cam = cfg.cameras.get(camera)
    points = dict(cfg.label_points)
    if cam is not None:
        points.update(cam.label_points)
    return CameraRules(
        label_points=points,
        other_label_points=cfg.other_label_points,
        count_points=cfg.count_points,
        count_max_points=cfg.count_max_points,
        dwell_points=cfg.dwell_points,
        dwell_full_seconds=cfg.dwell_full_seconds,
        score_points=cfg.score_points,
        night=(cam.night if cam and cam.night else cfg.night),
        night_multiplier=cfg.night_multiplier,
        timezone=(cam.timezone if cam and cam.timezone else cfg.timezone),
        zones=tuple(cam.zones) if cam else (),
    )


class Judgement(NamedTuple):
    score: int
    level: RiskLevel
    summary: str
    factors: list[Factor]
    zones: list[str]  # zones a box stood in
    night: bool


def inside(x: float, y: float, polygon: list[tuple[float, float]]) -> bool:
    """Even-odd ray casting: is (x, y) inside the polygon (corners in order, either direction)?"""
    hit = False
    n = len(polygon)
    for i in range(n):
        x1, y1 = polygon[i]
        x2, y2 = polygon[(i + 1) % n]
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            hit = not hit
    return hit


def _points(rules: CameraRules, label: str) -> int:
    return rules.label_points.get(label, rules.other_label_points)


def judge(ev: EventClosed, rules: CameraRules) -> Judgement:
    factors: list[Factor] = []
    ranked = sorted(ev.labels.items(), key=lambda kv: (-_points(rules, kv[0]), -kv[1].max_score, kv[0]))
    for label, s in ranked:
        pts = _points(rules, label)
        if pts:
            n = "1 detection" if s.count == 1 else f"{s.count} detections"
            factors.append(
                Factor(name=f"label {label}", points=pts, detail=f"{label} seen ({n}, best score {s.max_score:.2f})")
            )
    top = ranked[0] if ranked and _points(rules, ranked[0][0]) > 0 else None
    duration = max(0.0, ev.ended_at - ev.started_at)
    if top is not None:
        label, s = top
        if s.count > 1 and rules.count_points:
            pts = min(rules.count_max_points, rules.count_points * (s.count - 1))
            factors.append(Factor(name="count", points=pts, detail=f"{s.count} {label} detections"))
        dwell = round(rules.dwell_points * min(1.0, duration / rules.dwell_full_seconds))
        if dwell:
            factors.append(Factor(name="dwell", points=dwell, detail=f"on camera for {duration:.0f} s"))
        conf = round(rules.score_points * (2 * s.max_score - 1))
        if conf:
            factors.append(Factor(name="confidence", points=conf, detail=f"best {label} score {s.max_score:.2f}"))
    zones: list[str] = []
    for zone in rules.zones:
        wanted = set(zone.labels) if zone.labels is not None else {lb for lb in ev.labels if _points(rules, lb) > 0}
        spot = next((sp for sp in ev.spots if sp.label in wanted and inside(sp.x, sp.y, zone.polygon)), None)
        if spot is not None:  # spots come best first: the detail names the best box in the zone
            zones.append(zone.name)
            if zone.points:
                factors.append(
                    Factor(
                        name=f"zone {zone.name}",
                        points=zone.points,
                        detail=f"{spot.label} at ({spot.x}, {spot.y}) in zone {zone.name} (score {spot.score:.2f})",
                    )
                )
    subtotal = sum(f.points for f in factors)
    when = timeranges.local(ev.started_at, rules.timezone)
    night = timeranges.in_any(when, [rules.night])
    if night and subtotal > 0 and rules.night_multiplier > 1:
        extra = round(subtotal * (rules.night_multiplier - 1))
        factors.append(
            Factor(
                name="night",
                points=extra,
                detail=f"{when:%H:%M} {when.tzname()} is within night hours {rules.night} (x{rules.night_multiplier:g})",
            )
        )
    score = max(0, min(100, sum(f.points for f in factors)))
    level = risk_level(score)
    return Judgement(
        score,
        level,
        summary(ev, [lb for lb, _ in ranked], zones, when, night, duration, level, score),
        factors,
        zones,
        night,
    )


def summary(
    ev: EventClosed, labels: list[str], zones: list[str], when, night: bool, duration: float, level: str, score: int
) -> str:
    """One sentence for a phone: "Person in porch on front_door at 23:40 (night) for 12 s: critical risk (100)"."""
    names = labels[:3]
    what = (" and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]) if names else "Nothing"
    what = what[:1].upper() + what[1:]
    where = f" in {', '.join(zones)}" if zones else ""
    for_ = f" for {duration:.0f} s" if duration >= 1 else ""
    text = f"{what}{where} on {ev.camera} at {when:%H:%M}{' (night)' if night else ''}{for_}: {level} risk ({score})"
    return printable(text)[:300]
