"""Event grouping, pure logic: detections per camera become events.

An event closes when no detection came for `idle` seconds or when it has lasted `max_window`
seconds, judged on the detections' own times (file mtimes), so replaying the same detections after a
crash gives the same events with the same ids. A wall-clock timer closes an event only once its
camera has gone quiet (no arrival for `idle` seconds), so a fast replay of old files is not cut up.
"""

from __future__ import annotations

import hashlib

import msgspec

from proto import Alert, Detections, EventClosed, LabelSummary


class OpenEvent(msgspec.Struct, kw_only=True):
    event_id: str
    camera: str
    started_at: float
    last_at: float
    last_arrival: float  # wall clock of the latest detection's arrival; only for the quiet check
    file_ids: list[str]
    labels: dict[str, LabelSummary]
    best_file_id: str
    best_score: float
    alerted: bool = False


RECENT_CLOSED_KEYS = 2000  # per camera: enough to recognise any redelivery after a crash


class CameraState(msgspec.Struct, kw_only=True):
    """What the aggregator keeps per camera in KV: the open event and the detection keys of recently
    closed events (a redelivered detection of a closed event must not join the next one)."""

    open: OpenEvent | None = None
    last_closed_ids: list[str] = []


def event_id(camera: str, first_file_id: str) -> str:
    return "ev-" + hashlib.sha256(f"{camera}\0{first_file_id}".encode()).hexdigest()[:24]


class EventGrouper:
    def __init__(self, idle: float, max_window: float, alert_label: str, alert_score: float) -> None:
        self.idle = idle
        self.max_window = max_window
        self.alert_label = alert_label
        self.alert_score = alert_score
        self.cameras: dict[str, CameraState] = {}

    def add(self, det: Detections, arrival: float) -> tuple[list[EventClosed], list[Alert]]:
        """Add one detection; returns the events it closed and the alerts it raised."""
        if not det.boxes:
            return [], []
        state = self.cameras.setdefault(det.camera, CameraState())
        ev = state.open
        key = det.key
        if (ev is not None and key in ev.file_ids) or key in state.last_closed_ids:
            return [], []  # a redelivery after a crash: already counted
        closed: list[EventClosed] = []
        t = det.captured_at
        if ev is not None and (t - ev.last_at > self.idle or t - ev.started_at > self.max_window):
            closed.append(self._close(state, "idle" if t - ev.last_at > self.idle else "max_window"))
            ev = None
        if ev is None:
            ev = state.open = OpenEvent(
                event_id=event_id(det.camera, key), camera=det.camera, started_at=t, last_at=t,
                last_arrival=arrival, file_ids=[], labels={}, best_file_id=det.file_id, best_score=-1.0,
            )
        ev.file_ids.append(key)
        ev.started_at = min(ev.started_at, t)
        ev.last_at = max(ev.last_at, t)
        ev.last_arrival = arrival
        alerts: list[Alert] = []
        for box in det.boxes:
            summary = ev.labels.get(box.label)
            if summary is None:
                ev.labels[box.label] = LabelSummary(count=1, max_score=box.score)
            else:
                summary.count += 1
                summary.max_score = max(summary.max_score, box.score)
            if box.score > ev.best_score:
                ev.best_score, ev.best_file_id = box.score, key
            if box.label == self.alert_label and box.score >= self.alert_score and not ev.alerted:
                ev.alerted = True
                alerts.append(
                    Alert(
                        alert_id=f"{ev.event_id}-{box.label}", camera=det.camera, kind=box.label,
                        message=f"{box.label} ({box.score:.2f}) on {det.camera}", created_at=arrival,
                        file_id=det.file_id, event_id=ev.event_id, score=box.score,
                    )
                )
        return closed, alerts

    def due(self, now: float) -> list[EventClosed]:
        """Close events whose camera has gone quiet: nothing arrived and nothing happened for `idle`."""
        out = []
        for state in self.cameras.values():
            ev = state.open
            if ev is not None and now - ev.last_arrival > self.idle and now - ev.last_at > self.idle:
                out.append(self._close(state, "idle"))
        return out

    def _close(self, state: CameraState, reason: str) -> EventClosed:
        ev = state.open
        assert ev is not None
        state.open = None
        state.last_closed_ids = (state.last_closed_ids + ev.file_ids)[-RECENT_CLOSED_KEYS:]
        return EventClosed(
            event_id=ev.event_id, camera=ev.camera, started_at=ev.started_at, ended_at=ev.last_at,
            file_ids=list(ev.file_ids), labels=ev.labels, best_file_id=ev.best_file_id, close_reason=reason,
        )
