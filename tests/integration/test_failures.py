"""Crashes, outages and bad input: nothing lost, nothing duplicated, the rest of the run unaffected."""

from __future__ import annotations

import time

from tests.integration.test_pipeline import ALL, drained
from tests.support import drop, photo_bytes, query, stream_messages, tagged, wait_until


def test_kill_9_detector_mid_batch_and_aggregator_mid_event(make_stack, media, database, nats_server, models_dir):
    """SIGKILL of the detector mid-batch and of the aggregator mid-event loses and duplicates nothing."""
    n = 40
    # idle (the default 30 s) outlasts the detector's restart plus the redelivery of its killed batch
    # (ack_wait 15 s) even on a loaded CI machine, so the late detections still join the open event.
    stack = make_stack(
        model="yolox-nano",
        models=models_dir,
        detector={"batch_size": 8},
        aggregator={"idle_seconds": 30.0, "max_seconds": 300.0},
    )
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    data = [photo_bytes("astronaut", quality=60 + i % 30, scale=0.5 + (i % 7) / 20) for i in range(n)]
    for i, blob in enumerate(data):
        drop(media / "front_door" / f"p{i:03}.jpg", blob)  # one continuous event

    wait_until(lambda: len(query(database, "SELECT 1 FROM detections")) >= 8, what="first batches")
    stack.kill("detector")
    stack.start("detector")
    wait_until(lambda: len(query(database, "SELECT 1 FROM detections")) >= n // 2, timeout=90, what="half recorded")
    stack.kill("aggregator")  # the event is still open: its state lives in KV
    stack.start("aggregator")

    wait_until(lambda: len(query(database, "SELECT 1 FROM detections")) == n, timeout=120, what="all detections")
    wait_until(lambda: query(database, "SELECT 1 FROM events"), timeout=120, what="the event")
    wait_until(lambda: drained(nats_server.url), timeout=60, what="nothing unacked")
    assert query(database, "SELECT count(*), count(DISTINCT path) FROM detections")[0] == (n, n)
    events = query(database, "SELECT event_id, detection_count FROM events")
    assert len(events) == 1 and events[0][1] == n, events
    assert query(database, "SELECT count(*) FROM event_detections")[0][0] == n
    assert len(stream_messages(nats_server.url, "DLQ")) == 0
    assert stack.log("detector").count('"event": "ready"') == 2


def test_postgres_outage_loses_nothing(make_stack, media, database, nats_server, postgres):
    """While PostgreSQL is stopped nothing is acked; when it returns every row arrives exactly once."""
    stack = make_stack(model="none")
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    small = photo_bytes("coffee", scale=0.1)
    for i in range(10):
        drop(media / "backyard" / f"before{i}.jpg", tagged(small, i))
    wait_until(lambda: len(query(database, "SELECT 1 FROM detections")) == 10, what="rows before the outage")

    postgres.stop()
    try:
        for i in range(25):
            drop(media / "backyard" / f"during{i}.jpg", tagged(small, i))
        wait_until(lambda: "database unavailable, holding batch" in stack.log("recorder"), what="recorder holding")
        time.sleep(3)  # the outage lasts a while; the recorder must neither ack nor crash
        assert stack.procs["recorder"].poll() is None
    finally:
        postgres.start()
    wait_until(lambda: len(query(database, "SELECT 1 FROM detections")) == 35, timeout=60, what="rows after the outage")
    wait_until(lambda: drained(nats_server.url), timeout=30, what="nothing unacked")
    assert query(database, "SELECT count(DISTINCT file_id) FROM detections")[0][0] == 35


def test_corrupt_jpeg_is_dead_lettered_and_slow_upload_waits(make_stack, media, database, nats_server):
    """A corrupt JPEG goes to the DLQ with its reason; a slow upload is read only once complete."""
    stack = make_stack(model="none", watcher={"settle_seconds": 1.0})
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    good = photo_bytes("chelsea", scale=0.3)
    drop(media / "backyard" / "corrupt.jpg", good[:20] + b"\x00" * 50 + b"\xff\xd9")  # SOI and JFIF, garbage, its end
    drop(media / "backyard" / "good.jpg", good)

    slow = media / "front_door" / "slow.jpg"
    blob = photo_bytes("astronaut", scale=0.5)
    chunks = [blob[i : i + len(blob) // 8 + 1] for i in range(0, len(blob), len(blob) // 8 + 1)]
    with open(slow, "wb") as f:  # an FTP-style upload: visible name, growing for ~3 s
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            time.sleep(0.4)

    wait_until(lambda: len(query(database, "SELECT 1 FROM detections")) == 2, what="good + slow recorded")
    wait_until(lambda: drained(nats_server.url), timeout=20, what="nothing unacked")
    rows = dict(query(database, "SELECT path, width FROM detections"))
    assert set(rows) == {"backyard/good.jpg", "front_door/slow.jpg"}
    assert rows["front_door/slow.jpg"] == 256  # the complete image (512 * 0.5), not a truncated read
    letters = stream_messages(nats_server.url, "DLQ")
    assert len(letters) == 1
    assert letters[0].stage == "detector" and letters[0].camera == "backyard"
    assert "corrupt" in letters[0].reason or "decode" in letters[0].reason
    assert (
        '"path": "backyard/corrupt.jpg"' in letters[0].original_payload or "corrupt.jpg" in letters[0].original_payload
    )


def test_an_upload_cut_short_is_held_for_its_resume_and_rejected_if_it_never_comes(
    make_stack, media, database, nats_server
):
    """A camera's FTP connection drops mid-file: the partial file settles like a finished one (nothing
    writes to it), but it is never processed as complete. Resumed (APPE appends the rest), it is
    recorded once, whole; left cut past watcher.incomplete_seconds, it is a watcher dead letter with
    the reason; resumed after that, the whole file is a new version and recorded."""
    import hashlib

    from services.watcher.files import file_id

    stack = make_stack(model="none", watcher={"settle_seconds": 0.5, "incomplete_seconds": 8.0})
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    import cv2
    import skimage.data

    photo = photo_bytes("astronaut", scale=0.5)
    png = cv2.imencode(".png", cv2.resize(skimage.data.chelsea(), (160, 120)))[1].tobytes()
    half = {
        "front_door/resumed.jpg": photo,
        "front_door/resumed.png": png,
        "front_door/abandoned.jpg": photo_bytes("coffee", scale=0.4),
    }
    for rel, data in half.items():
        (media / rel).parent.mkdir(parents=True, exist_ok=True)
        (media / rel).write_bytes(data[: len(data) * 2 // 5])  # the connection dropped here
    drop(media / "front_door" / "whole.jpg", photo_bytes("chelsea", scale=0.3))  # the next one, whole
    wait_until(lambda: query(database, "SELECT 1 FROM detections WHERE path = 'front_door/whole.jpg'"), what="whole")
    time.sleep(3)  # settled (0.5 s) long ago: before, the partial files were published here
    assert query(database, "SELECT path FROM detections WHERE path <> 'front_door/whole.jpg'") == []
    assert stream_messages(nats_server.url, "DLQ") == []
    for rel in ("front_door/resumed.jpg", "front_door/resumed.png"):  # the camera reconnects: APPE
        with open(media / rel, "ab") as f:
            f.write(half[rel][len(half[rel]) * 2 // 5 :])

    def letters():
        return [m for m in stream_messages(nats_server.url, "DLQ") if m.path == "front_door/abandoned.jpg"]

    (letter,) = wait_until(letters, timeout=60, what="the abandoned upload rejected")
    assert letter.stage == "watcher" and letter.camera == "front_door"
    assert "truncated upload: JPEG without its end marker (EOI), unchanged for" in letter.reason
    with open(media / "front_door" / "abandoned.jpg", "ab") as f:  # the camera comes back a day late
        f.write(half["front_door/abandoned.jpg"][len(half["front_door/abandoned.jpg"]) * 2 // 5 :])
    wait_until(lambda: len(query(database, "SELECT 1 FROM detections")) == 4, what="every whole file recorded")
    wait_until(lambda: drained(nats_server.url), timeout=20, what="nothing unacked")
    rows = query(database, "SELECT path, file_id FROM detections ORDER BY path")
    assert rows == sorted(
        (rel, file_id("front_door", rel, hashlib.sha256(data).hexdigest()))
        for rel, data in {**half, "front_door/whole.jpg": (media / "front_door" / "whole.jpg").read_bytes()}.items()
    )  # each once, and each the whole file's bytes
    assert len(stream_messages(nats_server.url, "DLQ")) == 1
