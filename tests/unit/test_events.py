"""Event grouping on the detections' own times."""

from proto import Box, Detections
from services.events import EventGrouper

PERSON = Box("person", 0.95, 0, 0, 10, 10)
CAT = Box("cat", 0.6, 0, 0, 10, 10)


def det(fid, t, camera="cam", boxes=(PERSON,)):
    return Detections(file_id=fid, camera=camera, path=f"{camera}/{fid}.jpg", captured_at=t, width=100, height=100,
                      model="m", inference_ms=1.0, boxes=list(boxes))


def grouper(idle=30, max_window=90):
    return EventGrouper(idle, max_window, "person", 0.9)


def feed(g, dets, arrival=1000.0):
    closed, alerts = [], []
    for d in dets:
        c, a = g.add(d, arrival)
        closed += c
        alerts += a
    return closed, alerts


def test_idle_gap_closes_event():
    """A detection more than `idle` after the last one closes the open event and starts a new one."""
    g = grouper()
    closed, _ = feed(g, [det("a", 0), det("b", 10), det("c", 25), det("d", 60)])
    assert len(closed) == 1
    assert closed[0].file_ids == ["a", "b", "c"] and closed[0].close_reason == "idle"
    assert (closed[0].started_at, closed[0].ended_at) == (0, 25)
    assert g.cameras["cam"].open.file_ids == ["d"]


def test_max_window_closes_long_event():
    g = grouper(idle=30, max_window=90)
    closed, _ = feed(g, [det(str(i), i * 20) for i in range(7)])  # 0..120 s, never idle
    assert closed[0].close_reason == "max_window"
    assert closed[0].file_ids == ["0", "1", "2", "3", "4"]


def test_cameras_are_independent():
    g = grouper()
    closed, _ = feed(g, [det("a", 0, "front"), det("b", 100, "back"), det("c", 10, "front")])
    assert closed == []
    assert g.cameras["front"].open.file_ids == ["a", "c"]


def test_empty_detections_make_no_event():
    g = grouper()
    assert feed(g, [det("a", 0, boxes=())]) == ([], [])
    assert g.cameras == {}


def test_replay_gives_same_event_ids():
    """Same detections, fresh state: identical events (the crash-replay guarantee)."""
    dets = [det("a", 0), det("b", 5), det("c", 100), det("d", 105), det("e", 300)]
    first, _ = feed(grouper(), dets)
    second, _ = feed(grouper(), dets)
    assert [e.event_id for e in first] == [e.event_id for e in second]
    assert len(first) == 2


def test_redelivered_detection_is_not_counted_twice():
    g = grouper()
    closed, _ = feed(g, [det("a", 0), det("b", 5), det("a", 0), det("c", 100), det("b", 5)])
    assert closed[0].file_ids == ["a", "b"]
    assert g.cameras["cam"].open.file_ids == ["c"]


def test_alert_once_per_event_above_threshold():
    g = grouper()
    _, alerts = feed(g, [det("a", 0, boxes=[Box("person", 0.5, 0, 0, 1, 1)]), det("b", 1), det("c", 2), det("d", 100)])
    assert [a.file_id for a in alerts] == ["b", "d"]
    assert alerts[0].kind == "person" and alerts[0].event_id != alerts[1].event_id


def test_timer_closes_only_quiet_cameras():
    """The wall-clock timer closes an event once no detection arrived and none happened for `idle`."""
    g = grouper(idle=30)
    g.add(det("a", 1000.0), arrival=1000.0)
    assert g.due(now=1020.0) == []
    g.add(det("old", 10.0, camera="replay"), arrival=1020.0)  # old file: detection time long past
    assert g.due(now=1025.0) == []  # replay camera received something 5 s ago: not quiet
    closed = g.due(now=1051.0)
    assert sorted(e.camera for e in closed) == ["cam", "replay"]


def test_labels_summarised():
    g = grouper()
    feed(g, [det("a", 0, boxes=[PERSON, CAT]), det("b", 1, boxes=[CAT])])
    (ev,) = feed(g, [det("z", 500)])[0]
    assert ev.labels["cat"].count == 2 and ev.labels["person"].max_score == 0.95
    assert ev.best_file_id == "a"


def test_redelivery_after_several_closed_events_is_still_recognised():
    """d1's ack was lost; two later events closed before d1 came back: it joins nothing twice."""
    g = grouper(idle=30)
    closed, _ = feed(g, [det("d1", 0), det("d2", 100), det("d3", 200), det("d1", 0)])
    assert [e.file_ids for e in closed] == [["d1"], ["d2"]]
    assert g.cameras["cam"].open.file_ids == ["d3"] and g.cameras["cam"].open.started_at == 200
