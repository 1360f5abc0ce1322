"""End to end: real nats-server, real PostgreSQL, real files, every service a real process."""

from __future__ import annotations

import json
import os
import time

import cv2

from services.analyzer import snapshot
from tests.support import consumer_states, drop, photo_bytes, query, recorded_detections, wait_until

ALL = ("watcher", "detector", "aggregator", "recorder")
FULL = (*ALL, "analyzer", "notifier")  # with nothing to notify: the notifier only reads and acks


def drained(nats_url, services=ALL):
    """Nothing pending or unacked on the consumers of `services` (a test that runs no analyzer leaves
    the events for it, as the stream is meant to)."""

    def owner(durable: str) -> str:
        return durable.removeprefix("exhausted-").split("-")[0]

    return all(v == (0, 0) for d, v in consumer_states(nats_url).items() if owner(d) in services)


def test_photos_become_detections_events_analyses_and_alerts(
    make_stack, media, database, nats_server, models_dir, tmp_path
):
    """Four real photos in two cameras: one row each, the right labels, events per camera, each event
    judged (a person in the porch zone at night: critical; the cat by day: low), all acked."""
    porch = [[0, 256], [512, 256], [512, 512], [0, 512]]  # the lower half of the 512 x 512 photos
    stack = make_stack(
        model="yolox-nano",
        models=models_dir,
        aggregator={"idle_seconds": 3.0, "max_seconds": 20.0},
        analyzer={
            "timezone": "UTC",
            "night": "22:00-06:00",
            "cameras": {
                "front_door": {"zones": [{"name": "porch", "points": 30, "labels": ["person"], "polygon": porch}]}
            },
        },
    )
    stack.start(*FULL)
    stack.wait_ready(*FULL)
    midnight = time.time() // 86400 * 86400
    t0 = midnight - 1800  # detection times are the files' mtimes: front_door at 23:30 UTC last night
    t1 = midnight - 12 * 3600  # backyard at noon
    drop(media / "front_door" / "astronaut.jpg", photo_bytes("astronaut"), t0)
    drop(media / "front_door" / "camera.jpg", photo_bytes("camera"), t0 + 1)
    drop(media / "backyard" / "chelsea.jpg", photo_bytes("chelsea"), t1)
    wait_until(
        lambda: query(database, "SELECT 1 FROM detections WHERE path = 'backyard/chelsea.jpg'"), what="chelsea recorded"
    )
    drop(media / "backyard" / "coffee.jpg", photo_bytes("coffee"), t1 + 10)  # 10 s later: beyond idle (3 s)

    wait_until(lambda: len(query(database, "SELECT event_id FROM events")) == 3, timeout=60, what="3 events")
    rows = {r[0]: r[1] for r in query(database, "SELECT path, labels FROM detections")}
    assert set(rows) == {
        "front_door/astronaut.jpg",
        "front_door/camera.jpg",
        "backyard/chelsea.jpg",
        "backyard/coffee.jpg",
    }
    assert "person" in rows["front_door/astronaut.jpg"]
    assert "person" in rows["front_door/camera.jpg"]
    assert "cat" in rows["backyard/chelsea.jpg"]
    assert "cup" in rows["backyard/coffee.jpg"]

    boxes = query(database, "SELECT boxes, width, height FROM detections WHERE path = 'front_door/astronaut.jpg'")[0]
    person = next(b for b in boxes[0] if b[0] == "person")
    assert person[1] >= 0.85 and 0 <= person[2] < person[4] <= boxes[1] and 0 <= person[3] < person[5] <= boxes[2]

    events = query(
        database,
        "SELECT camera, detection_count, extract(epoch from started_at), extract(epoch from ended_at)"
        " FROM events ORDER BY camera, started_at",
    )
    assert [(e[0], e[1]) for e in events] == [("backyard", 1), ("backyard", 1), ("front_door", 2)]
    front_event = events[2]
    assert abs(float(front_event[2]) - t0) < 0.01 and abs(float(front_event[3]) - (t0 + 1)) < 0.01
    # every detection belongs to exactly one event
    assert query(database, "SELECT count(*), count(DISTINCT detection_id) FROM event_detections")[0] == (4, 4)
    alerts = query(database, "SELECT camera, kind FROM alerts")
    assert alerts == [("front_door", "person")]
    # every event judged and recorded with its factors
    wait_until(lambda: len(query(database, "SELECT 1 FROM event_analysis")) == 3, timeout=30, what="3 analyses")
    judged = query(
        database,
        "SELECT e.camera, d.path, a.risk_level, a.risk_score, a.factors, a.zones, a.fallback FROM event_analysis a"
        " JOIN events e USING (event_id) JOIN event_detections ed USING (event_id) JOIN detections d USING (detection_id)"
        " WHERE d.path IN ('front_door/astronaut.jpg', 'backyard/chelsea.jpg')",
    )
    by_path = {r[1]: r for r in judged}
    front, cat = by_path["front_door/astronaut.jpg"], by_path["backyard/chelsea.jpg"]
    names = lambda factors: {f["name"] for f in factors}  # noqa: E731
    assert front[2:4] == ("critical", 100) and front[5] == ["porch"] and not front[6], front
    assert {"label person", "zone porch", "night"} <= names(front[4]), front[4]
    assert cat[2] == "low" and cat[3] < 30 and "label cat" in names(cat[4]) and "night" not in names(cat[4]), cat
    assert all(f["detail"] for f in front[4] + cat[4])
    # every event has its annotated snapshot: the person's box drawn where the detector put it
    snaps = query(database, "SELECT snapshot, thumbnail, snapshot_error FROM event_analysis")
    assert all(s[0] and s[1] and s[2] is None for s in snaps), snaps
    best, best_boxes = query(
        database,
        "SELECT a.snapshot, d.boxes FROM event_analysis a JOIN events e USING (event_id) JOIN detections d"
        " ON d.detection_id = e.best_file_id WHERE e.camera = 'front_door'",
    )[0]
    img = cv2.imread(str(tmp_path / "state" / "snapshots" / best))
    x1, y1, _, y2 = (round(v) for v in max((b for b in best_boxes if b[0] == "person"), key=lambda b: b[1])[2:6])
    far = lambda px: int(abs(px.astype(int) - snapshot.colour("person")).max())  # noqa: E731
    row = img[(y1 + y2) // 2]
    assert min(far(row[x]) for x in (x1 - 1, x1, x1 + 1)) < 40, row[x1 - 1 : x1 + 2]  # the line is on the box's edge
    assert far(row[x1 + 12]) > 80, row[x1 + 12]  # and the photo inside the box is the photo
    wait_until(lambda: drained(nats_server.url, FULL), timeout=10, what="every consumer drained (nothing unacked)")
    codes = stack.stop_all()
    assert codes == {name: 0 for name in FULL}, codes


def test_file_dropped_while_watcher_down_is_processed_once(make_stack, media, database, nats_server):
    """Files that land while the watcher is stopped are found at start; restarts never re-publish."""
    stack = make_stack(model="none")
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    drop(media / "front_door" / "a.jpg", photo_bytes("coffee", scale=0.25))
    wait_until(lambda: query(database, "SELECT 1 FROM detections WHERE path = 'front_door/a.jpg'"), what="a.jpg")
    assert stack.stop("watcher") == 0

    drop(media / "backyard" / "b.jpg", photo_bytes("chelsea", scale=0.25))
    (media / "new_camera").mkdir()
    drop(media / "new_camera" / "c.jpg", photo_bytes("camera", scale=0.25))
    stack.start("watcher")
    wait_until(lambda: len(query(database, "SELECT 1 FROM detections")) == 3, what="b and c after restart")
    assert stack.stop("watcher") == 0
    stack.start("watcher")  # a third start with nothing new must publish nothing
    stack.wait_ready("watcher")
    wait_until(lambda: stack.log("watcher").count('"scan done"') >= 3, what="third scan")
    drop(media / "new_camera" / "d.jpg", photo_bytes("astronaut", scale=0.25))
    wait_until(lambda: len(query(database, "SELECT 1 FROM detections")) == 4, what="d.jpg")
    assert stack.stop("watcher") == 0

    published = [line for line in stack.log("watcher").splitlines() if '"event": "stopped"' in line]
    counts = [json.loads(line).get("published", 0) for line in published]
    assert counts == [1, 2, 1], published  # a, then b + c, then only d: nothing re-published
    assert query(database, "SELECT camera FROM detections WHERE path = 'new_camera/c.jpg'") == [("new_camera",)]
    assert upload_sequence(nats_server.url) == 4  # exactly four FileUploaded ever stored


def upload_sequence(url: str) -> int:
    import asyncio

    import nats

    async def go():
        nc = await nats.connect(url)
        info = await nc.jetstream().stream_info("UPLOADS")
        await nc.close()
        return info.state.last_seq

    return asyncio.run(go())


def test_backlog_written_in_random_order_gives_the_events_of_the_ordered_one(
    make_stack, media, database, nats_server, models_dir
):
    """Files that landed while vigil was down, written in random order with their mtimes set: the
    watcher publishes them by mtime, so the events equal the contract over the detections (what the
    same files uploaded in order give). A reorder window of 2 leaves the ordering to the watcher."""
    import random

    from services.aggregator.grouping import Rules

    rng = random.Random(3)
    t = {"front_door": time.time() - 3000, "backyard": time.time() - 3000}
    files = []
    for i in range(30):
        cam = rng.choice(list(t))
        t[cam] += rng.choice([0.5, 1.0, 2.0, 8.0])
        files.append(
            (
                media / cam / f"img-{rng.getrandbits(32):08x}.jpg",
                photo_bytes(("astronaut", "chelsea", "coffee")[i % 3], quality=60 + i),
                t[cam],
            )
        )
    rng.shuffle(files)
    for path, data, mtime in files:
        drop(path, data, mtime)
    stack = make_stack(
        model="yolox-nano",
        models=models_dir,
        aggregator={"idle_seconds": 3.0, "max_seconds": 20.0, "reorder_window": 2, "batch_size": 4},
        detector={"batch_size": 2},
    )
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    # (query() answers [] until the recorder has created the tables)
    wait_until(
        lambda: (r := query(database, "SELECT count(*) FROM detections")) and r[0][0] == 30,
        timeout=120,
        what="30 files recorded",
    )
    labelled = query(database, "SELECT count(*) FROM detections WHERE box_count > 0")[0][0]
    wait_until(
        lambda: query(database, "SELECT count(*) FROM event_detections")[0][0] == labelled,
        timeout=60,
        what="all in events",
    )
    rules = Rules(3.0, 20.0, 1000)
    want = {e.event_id: frozenset(e.file_ids) for e in _reference_from_rows(database, rules)}
    wait_until(lambda: _events_in_pg(database) == want, timeout=30, what="the contract's events in PostgreSQL")
    assert len(want) >= 4


def _reference_from_rows(dsn, rules):
    from services.aggregator.grouping import reference_events

    dets = recorded_detections(dsn)
    return list(reference_events(dets, rules).values())


def _events_in_pg(dsn):
    links: dict = {}
    for det_id, eid in query(dsn, "SELECT detection_id, event_id FROM event_detections"):
        links.setdefault(eid, set()).add(det_id)
    return {eid: frozenset(v) for eid, v in links.items()}


def test_a_touched_or_resent_identical_file_is_not_a_new_detection(make_stack, media, database, nats_server):
    """Same path, same bytes, new mtime (a `touch`, a camera re-sending a file): the file id is the same,
    so it would be one detection in two events; the watcher remembers it and does not publish it again."""
    from tests.integration.test_service_lifecycle import read_heartbeats

    stack = make_stack(model="none")
    stack.config.write_text(
        stack.config.read_text().replace("drain_seconds = 5.0", "drain_seconds = 5.0\nheartbeat_seconds = 0.5")
    )
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    path = drop(media / "front_door" / "a.jpg", photo_bytes("coffee", scale=0.25), time.time() - 100)
    wait_until(lambda: query(database, "SELECT 1 FROM detections"), what="recorded")
    os.utime(path, (time.time() - 50, time.time() - 50))
    counters = wait_until(
        lambda: (
            (h := read_heartbeats(nats_server.url))
            and (w := next(v for k, v in h.items() if k.startswith("watcher.")))
            and w.counters.get("unchanged")
            and w.counters
        ),
        timeout=30,
        what="the touched file seen and skipped",
    )
    assert counters["published"] == 1


def test_a_camera_with_a_wrong_clock_gets_arrival_times_and_an_alert(make_stack, media, database, nats_server):
    """A camera reset to 2000 and one an hour ahead: their files are dated by arrival, marked
    clock_suspect in PostgreSQL, and health raises camera_clock for each."""
    stack = make_stack(model="none", health={"check_seconds": 0.5, "http_port": 0, "camera_silent_seconds": 0})
    stack.start("watcher", "detector", "recorder", "health")
    stack.wait_ready("watcher", "detector", "recorder", "health")
    before = time.time()
    drop(media / "front_door" / "reset.jpg", photo_bytes("coffee", scale=0.25), 946_684_800.0)
    drop(media / "backyard" / "ahead.jpg", photo_bytes("chelsea", scale=0.25), time.time() + 3600)
    rows = wait_until(
        lambda: (
            (r := query(database, "SELECT path, extract(epoch from captured_at), clock_suspect FROM detections"))
            and len(r) == 2
            and r
        ),
        what="both recorded",
    )
    for path, captured, suspect in rows:
        assert suspect and before - 1 <= float(captured) <= time.time(), (path, captured)
    # the recorder takes alerts off their (interest) stream: read them where it writes them
    wait_until(
        lambda: (
            {r[0] for r in query(database, "SELECT camera FROM alerts WHERE kind = 'camera_clock'")}
            == {"front_door", "backyard"}
        ),
        what="camera_clock for both cameras",
    )


def test_a_file_in_a_folder_that_appears_at_once_is_published_without_waiting_for_a_rescan(
    make_stack, media, database, nats_server, tmp_path
):
    """Issue 12 (a chaos finding): inotify watches a new folder only once it has seen it, so a file
    written into it before that (a camera's first file in its new date folder) raised no event and
    waited for the next rescan, reaching the events after later files. A folder moved in with its
    files inside is the deterministic case: one event for the folder, none for what it holds."""
    stack = make_stack(model="none", watcher={"settle_seconds": 0.3, "rescan_seconds": 3600.0})
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    outside = tmp_path / "outside" / "2026-12-02"
    drop(outside / "first.jpg", photo_bytes("coffee", scale=0.25))
    drop(outside / "nested" / "second.jpg", photo_bytes("chelsea", scale=0.25))
    os.rename(outside, media / "front_door" / "2026-12-02")
    wait_until(lambda: len(query(database, "SELECT 1 FROM detections")) == 2, timeout=30, what="both files, no rescan")
