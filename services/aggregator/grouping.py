"""Event grouping, pure logic: the contract, the reorder buffer, and the incremental grouper.

The contract is `reference_events`: per camera, take the detections that have boxes, sort them by
(captured_at, key), and cut before a detection that is more than `idle` seconds after the previous one
(close reason "idle"), that would make the event longer than `max_seconds` ("max_window"), or that would
make it hold more than `max_detections` ("max_detections"). An event's id comes from its first detection.
Nothing else - arrival order, batch boundaries, restarts, the wall clock - may change the result.

The aggregator gets there incrementally. Detections wait unacked in a per-camera `ReorderBuffer` and
are grouped in (captured_at, key) order once the disorder bound says nothing earlier can still come
(`ReorderBuffer.release`). `group_in_order` then extends or cuts the camera's current event exactly as
the contract does. A detection that still arrives earlier than what was grouped (beyond the bound:
days later after a re-publish or `vigil dlq retry`) goes through `place_late`: it is a duplicate if an
event already holds it; otherwise it joins the event that covers its time (or one within `idle` of it),
which is published again with a higher revision; only if there is none does it become an event of its
own. It never joins a second event.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from proto import Alert, Box, Detections, EventClosed, LabelSummary, Spot
from proto.messages import MAX_BEST_BOXES, MAX_SPOTS


class Rules(NamedTuple):
    idle: float
    max_seconds: float
    max_detections: int
    alert_label: str = "person"
    alert_score: float = 0.90


def event_id(camera: str, first_key: str) -> str:
    return "ev-" + hashlib.sha256(f"{camera}\0{first_key}".encode()).hexdigest()[:24]


def order(det: Detections) -> tuple[float, str]:
    """The total order of the contract: capture time, then the detection key for equal times."""
    return (det.captured_at, det.key)


def _px(v: float) -> int:
    return round(v) if math.isfinite(v) else 0


def best_boxes(det: Detections) -> list[Box]:
    """The boxes an event's snapshot draws: its best detection's, the MAX_BEST_BOXES best-scored."""
    return (
        sorted(det.boxes, key=lambda b: -b.score)[:MAX_BEST_BOXES]
        if len(det.boxes) > MAX_BEST_BOXES
        else list(det.boxes)
    )


def merge_spots(spots: list[Spot], det: Detections) -> list[Spot]:
    """`spots` with `det`'s boxes added: per distinct (label, x, y) its best score, the MAX_SPOTS best
    kept (score, then label and position: a total order, so the result does not depend on the order
    the detections came in)."""
    best = {(s.label, s.x, s.y): s.score for s in spots}
    changed = False
    for b in det.boxes:
        k = (b.label, _px((b.x1 + b.x2) / 2), _px(b.y2))
        if b.score > best.get(k, -math.inf):
            best[k] = b.score
            changed = True
    if not changed:
        return spots
    ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_SPOTS]
    return [Spot(label, x, y, score) for (label, x, y), score in ranked]


# ---- the contract -------------------------------------------------------------------------------
def reference_events(detections: Iterable[Detections], rules: Rules) -> dict[str, EventClosed]:
    """The events a set of detections must give, by event id (written plainly, apart from the
    incremental code below, so that tests and the chaos run can hold the service against it)."""
    per_camera: dict[str, dict[str, Detections]] = {}
    for d in detections:
        if d.boxes:
            seen = per_camera.setdefault(d.camera, {})
            if d.key not in seen or order(d) < order(seen[d.key]):
                seen[d.key] = d  # the same detection twice (another time): the earlier counts
    out: dict[str, EventClosed] = {}
    for camera, by_key in per_camera.items():
        dets = sorted(by_key.values(), key=order)
        groups: list[list[Detections]] = []
        reasons: list[str] = []
        for d in dets:
            if groups:
                g = groups[-1]
                if d.captured_at - g[-1].captured_at > rules.idle:
                    reasons.append("idle")
                elif d.captured_at - g[0].captured_at > rules.max_seconds:
                    reasons.append("max_window")
                elif len(g) >= rules.max_detections:
                    reasons.append("max_detections")
                else:
                    g.append(d)
                    continue
            groups.append([d])
        reasons.append("idle")
        for g, reason in zip(groups, reasons, strict=False):
            labels: dict[str, LabelSummary] = {}
            best = (-1.0, 0.0, "")
            best_det: Detections | None = None
            spots: list[Spot] = []
            for d in g:
                spots = merge_spots(spots, d)
                for b in d.boxes:
                    s = labels.setdefault(b.label, LabelSummary(count=0, max_score=b.score))
                    s.count += 1
                    s.max_score = max(s.max_score, b.score)
                    if b.score > best[0]:
                        best = (b.score, d.captured_at, d.key)
                        best_det = d
            eid = event_id(camera, g[0].key)
            out[eid] = EventClosed(
                event_id=eid,
                camera=camera,
                started_at=g[0].captured_at,
                ended_at=g[-1].captured_at,
                file_ids=[d.key for d in g],
                labels=labels,
                best_file_id=best[2],
                close_reason=reason,
                spots=spots,
                best_path=best_det.path if best_det else None,
                best_offset_s=best_det.offset_s if best_det else 0.0,
                best_boxes=best_boxes(best_det) if best_det else [],
            )  # type: ignore[arg-type]
    return out


# ---- state ----------------------------------------------------------------------------------------
class EventState(msgspec.Struct, kw_only=True):
    """One event as the aggregator keeps it (camera state in KV, and the event index)."""

    event_id: str
    camera: str
    started_at: float
    ended_at: float
    keys: list[str]  # detection keys, in the order they were added (capture order for in-order ones)
    labels: dict[str, LabelSummary]
    best_file_id: str
    best_score: float
    close_reason: str = "idle"
    revision: int = 1  # bumped by every change; EventClosed carries it
    published: int = 0  # the highest revision whose EventClosed got its PubAck
    alerted: bool = False  # the fast-path alert of this event was raised: never again, whatever follows
    spots: list[Spot] = []
    best_path: str | None = None
    best_offset_s: float = 0.0
    best_boxes: list[Box] = []

    def message(self) -> EventClosed:
        return EventClosed(
            event_id=self.event_id,
            camera=self.camera,
            started_at=self.started_at,
            ended_at=self.ended_at,
            file_ids=list(self.keys),
            labels=self.labels,
            best_file_id=self.best_file_id,
            close_reason=self.close_reason,
            revision=self.revision,
            spots=list(self.spots),
            best_path=self.best_path,
            best_offset_s=self.best_offset_s,
            best_boxes=list(self.best_boxes),
        )  # type: ignore[arg-type]


class CameraState(msgspec.Struct, kw_only=True):
    """What the aggregator keeps per camera (KV vigil_aggregator, key cam.<camera>); bounded: one event
    of at most max_detections keys, plus what one commit publishes."""

    current: EventState | None = None  # the latest event in capture order: the only one in-order detections extend
    sealed_t: float | None = None  # (sealed_t, sealed_key): the last detection grouped in order
    sealed_key: str = ""
    # written before they are published, cleared after their PubAcks (an outbox): a crash in between
    # re-publishes exactly these, under the same Nats-Msg-Id
    outbox: list[EventState] = []
    outbox_alerts: list[Alert] = []

    def sealed(self) -> tuple[float, str] | None:
        return None if self.sealed_t is None else (self.sealed_t, self.sealed_key)


def new_event(det: Detections) -> EventState:
    return EventState(
        event_id=event_id(det.camera, det.key),
        camera=det.camera,
        started_at=det.captured_at,
        ended_at=det.captured_at,
        keys=[],
        labels={},
        best_file_id=det.key,
        best_score=-1.0,
    )


def add_to(ev: EventState, det: Detections, rules: Rules, now: float) -> Alert | None:
    """Put `det` into `ev` (bounds, labels, best frame); the event's alert if this is its first reason to alert."""
    ev.keys.append(det.key)
    ev.started_at = min(ev.started_at, det.captured_at)
    ev.ended_at = max(ev.ended_at, det.captured_at)
    ev.revision += 1 if ev.published >= ev.revision else 0
    alert = None
    ev.spots = merge_spots(ev.spots, det)
    for box in det.boxes:
        s = ev.labels.get(box.label)
        if s is None:
            ev.labels[box.label] = LabelSummary(count=1, max_score=box.score)
        else:
            s.count += 1
            s.max_score = max(s.max_score, box.score)
        if box.score > ev.best_score:
            ev.best_score, ev.best_file_id = box.score, det.key
            ev.best_path, ev.best_offset_s = det.path, det.offset_s
            ev.best_boxes = best_boxes(det)
        if box.label == rules.alert_label and box.score >= rules.alert_score and not ev.alerted:
            ev.alerted = True
            alert = Alert(
                alert_id=f"{ev.event_id}-{box.label}",
                camera=det.camera,
                kind=box.label,
                message=f"{box.label} ({box.score:.2f}) on {det.camera}",
                created_at=now,
                file_id=det.file_id,
                event_id=ev.event_id,
                score=box.score,
            )
    return alert


def cut_reason(ev: EventState, t: float, rules: Rules) -> str | None:
    """Why a detection at `t` (not earlier than the event's last) cannot join `ev`, or None if it can."""
    if t - ev.ended_at > rules.idle:
        return "idle"
    if t - ev.started_at > rules.max_seconds:
        return "max_window"
    if len(ev.keys) >= rules.max_detections:
        return "max_detections"
    return None


def set_reason(ev: EventState, reason: str) -> None:
    if ev.close_reason != reason:
        ev.close_reason = reason
        ev.revision += 1 if ev.published >= ev.revision else 0


def dirty(ev: EventState) -> bool:
    return ev.revision > ev.published


def group_in_order(
    state: CameraState, det: Detections, rules: Rules, now: float
) -> tuple[EventState | None, Alert | None]:
    """Group a detection later than everything grouped so far. Returns the event it cut off (now
    final in the contract's sense, to be published if changed) and the alert it raised."""
    ev = state.current
    cut = None
    if ev is not None:
        reason = cut_reason(ev, det.captured_at, rules)
        if reason is not None:
            set_reason(ev, reason)
            cut, ev = ev, None
    if ev is None:
        ev = state.current = new_event(det)
    alert = add_to(ev, det, rules, now)
    state.sealed_t, state.sealed_key = order(det)
    return cut, alert


def late_window(t: float, rules: Rules) -> tuple[float, float]:
    """Started-at range of the events a late detection at `t` could belong to or join."""
    return t - rules.max_seconds - rules.idle, t + rules.idle


def place_late(det: Detections, candidates: list[EventState], rules: Rules) -> tuple[str, EventState | None]:
    """Where a detection earlier than the camera's sealed point goes: ("duplicate", ev), ("join", ev) or
    ("new", None). Candidates are the camera's events whose start lies in `late_window`."""
    t = det.captured_at
    for ev in candidates:
        if det.key in ev.keys:
            return "duplicate", ev
    roomy = [ev for ev in candidates if len(ev.keys) < rules.max_detections]
    covering = sorted(
        (ev for ev in roomy if ev.started_at <= t <= ev.ended_at), key=lambda e: (e.started_at, e.event_id)
    )
    if covering:
        return "join", covering[0]
    near = []
    for ev in roomy:
        if t < ev.started_at and ev.started_at - t <= rules.idle and ev.ended_at - t <= rules.max_seconds:
            near.append((ev.started_at - t, ev.started_at, ev.event_id, ev))
        elif t > ev.ended_at and t - ev.ended_at <= rules.idle and t - ev.started_at <= rules.max_seconds:
            near.append((t - ev.ended_at, ev.started_at, ev.event_id, ev))
    if near:
        return "join", min(near, key=lambda x: x[:3])[3]
    return "new", None


# ---- the reorder buffer -------------------------------------------------------------------------
@dataclass
class Held:
    det: Detections
    msgs: list  # the message and any redelivery of it: all acked together
    arrived: float  # monotonic
    touched: float  # monotonic, last in_progress() (or arrival)


@dataclass
class _Camera:
    heap: list[tuple[float, str]] = field(default_factory=list)
    held: dict[str, Held] = field(default_factory=dict)
    arrivals: deque = field(default_factory=deque)  # (arrived, (t, key)) in arrival order


class ReorderBuffer:
    """Detections held unacked until grouping them in capture order is safe.

    Per camera, detections leave in (captured_at, key) order when
    - the stage has caught up (`caught_up`: nothing upstream pending or in flight, everything delivered
      to us seen): nothing earlier can be on its way, so everything goes;
    - more than `window` detections of the camera are held: the earliest go (any arrival order in which
      no detection comes more than `window` places after a later-captured one groups as if sorted);
    - a detection has been held `hold_seconds`: it and everything captured before it go (covers a
      detector that crashed holding earlier files: they come back after its ack_wait);
    - more than `cap` detections are held in all (the consumer's max_ack_pending must never be reached,
      or nothing new would be delivered): the earliest of the fullest camera go.
    Times are monotonic: the wall clock may jump without changing anything.
    """

    def __init__(self, window: int, hold_seconds: float, cap: int) -> None:
        self.window, self.hold_seconds, self.cap = window, hold_seconds, cap
        self.cameras: dict[str, _Camera] = {}
        self.total = 0

    def __len__(self) -> int:
        return self.total

    def holds(self, camera: str) -> bool:
        c = self.cameras.get(camera)
        return bool(c and c.held)

    def add(self, det: Detections, msg, now: float) -> bool:
        """Hold `det`; False when it is already held (a redelivery: its message is acked with the first)."""
        c = self.cameras.setdefault(det.camera, _Camera())
        held = c.held.get(det.key)
        if held is not None:
            held.msgs.append(msg)
            return False
        o = order(det)
        c.held[det.key] = Held(det, [msg], now, now)
        heapq.heappush(c.heap, o)
        c.arrivals.append((now, o))
        self.total += 1
        return True

    def _pop(self, c: _Camera) -> Held:
        _, key = heapq.heappop(c.heap)
        self.total -= 1
        return c.held.pop(key)

    def latest(self) -> dict[str, tuple[float, str]]:
        """Per camera, the latest detection held now (what a caught-up check may release)."""
        return {name: max(c.heap) for name, c in self.cameras.items() if c.heap}

    def release(self, now: float, caught_up_to: dict[str, tuple[float, str]] | None = None) -> list[Held]:
        """What may be grouped now: per camera in capture order (cameras are independent).
        `caught_up_to`: the stage had caught up when these (per camera) were the latest held."""
        out: list[Held] = []
        for name, c in list(self.cameras.items()):
            threshold = (caught_up_to or {}).get(name)
            while c.arrivals and (c.arrivals[0][1][1] not in c.held or c.arrivals[0][0] <= now - self.hold_seconds):
                _arrived, o = c.arrivals.popleft()
                if o[1] in c.held and (threshold is None or o > threshold):
                    threshold = o
            while c.heap and ((threshold is not None and c.heap[0] <= threshold) or len(c.held) > self.window):
                out.append(self._pop(c))
            if not c.held:
                del self.cameras[name]
        while self.total > self.cap:
            name, c = max(self.cameras.items(), key=lambda kv: len(kv[1].held))
            out.append(self._pop(c))
            if not c.held:
                del self.cameras[name]
        return out

    def put_back(self, items: list[Held]) -> None:
        """A commit failed (or stopped early): hold these again, with their original arrival times."""
        touched = set()
        for h in items:
            c = self.cameras.setdefault(h.det.camera, _Camera())
            if h.det.key in c.held:
                c.held[h.det.key].msgs.extend(h.msgs)
                continue
            c.held[h.det.key] = h
            heapq.heappush(c.heap, order(h.det))
            c.arrivals.append((h.arrived, order(h.det)))
            touched.add(h.det.camera)
            self.total += 1
        for name in touched:  # keep arrival order, so the hold time is judged from the right one
            c = self.cameras[name]
            c.arrivals = deque(sorted(c.arrivals, key=lambda a: a[0]))

    def all(self) -> list[Held]:
        return [h for c in self.cameras.values() for h in c.held.values()]

    def stale(self, now: float, older_than: float) -> list[Held]:
        """Held long enough that their ack_wait needs refreshing (in_progress)."""
        out = []
        for c in self.cameras.values():
            for h in c.held.values():
                if now - h.touched >= older_than:
                    h.touched = now
                    out.append(h)
        return out
