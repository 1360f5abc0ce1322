"""Event snapshots: the boxes are drawn where the detection's boxes are (pixels checked), a clip's
snapshot is the very frame the detector sampled, a revision is made once, written atomically, under a
name no camera controls; and anything unreadable is a reason, not a crash."""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np

from proto import Box, EventClosed, LabelSummary
from services.analyzer import snapshot
from services.detector.media import sample_clip
from services.runtime.config import Zone

GREY = 90


def event(path: str, boxes=(), best_file_id="f", offset=0.0, revision=1, event_id="ev-1") -> EventClosed:
    return EventClosed(
        event_id=event_id, camera="cam", started_at=0.0, ended_at=0.0, file_ids=[best_file_id],
        labels={"person": LabelSummary(count=1, max_score=0.9)}, best_file_id=best_file_id, close_reason="idle",
        best_path=path, best_offset_s=offset, best_boxes=list(boxes), revision=revision,
    )  # fmt: skip


def decoded(path: Path) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR).astype(int)


def near(pixel, colour, tol=40) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour, strict=True))


def test_boxes_and_zones_are_drawn_where_they_are(tmp_path):
    media, out = tmp_path / "media", tmp_path / "snaps"
    (media / "cam").mkdir(parents=True)
    cv2.imwrite(str(media / "cam" / "a.png"), np.full((300, 400, 3), GREY, np.uint8))
    box = Box(label="person", score=0.9, x1=50, y1=60, x2=200, y2=220)
    zone = Zone(name="porch", polygon=[(250, 20), (380, 20), (380, 280), (250, 280)])
    made = snapshot.make(str(media), out, event("cam/a.png", [box]), [zone])
    assert made.error is None and made.written_bytes > 0
    img = decoded(out / made.snapshot)
    person = snapshot.colour("person")
    assert img.shape[:2] == (300, 400)
    for x, y in [(50, 140), (200, 140), (125, 220), (185, 60)]:  # on the box's four edges
        assert near(img[y, x], person), (x, y, img[y, x], person)
    for x, y in [(125, 140), (30, 140), (230, 140), (125, 250)]:  # inside and outside: the frame untouched
        assert near(img[y, x], (GREY,) * 3, 12), (x, y, img[y, x])
    assert near(img[150, 380], snapshot.ZONE_COLOUR, 60) and near(img[150, 315], (GREY,) * 3, 12)
    thumb = decoded(out / made.thumbnail)
    assert thumb.shape[:2] == (240, 320)


def test_a_clips_snapshot_is_the_frame_the_detector_sampled(tmp_path):
    media = tmp_path / "media"
    (media / "cam").mkdir(parents=True)
    clip = media / "cam" / "c.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(30):  # frame i is filled with grey level 8 * i
        writer.write(np.full((48, 64, 3), 8 * i, np.uint8))
    writer.release()
    frames, _ = sample_clip(media, "cam/c.avi", fps=2.0, max_frames=10, max_bytes=10**8)
    index, _, seen = frames[3]  # the detector's 4th sample: native frame 15
    assert index == 15
    # the frame index in the detection key wins over the offset (seeking by time lands on key frames)
    frame = snapshot.read_frame(str(media), event("cam/c.avi", best_file_id=f"clip:{index}", offset=0.0))
    assert np.array_equal(frame, seen)
    assert abs(int(frame.mean()) - 8 * 15) <= 6


def test_made_once_per_revision_atomically_under_a_hashed_name(tmp_path):
    media, out = tmp_path / "media", tmp_path / "snaps"
    (media / "cam").mkdir(parents=True)
    cv2.imwrite(str(media / "cam" / "a.jpg"), np.full((100, 100, 3), GREY, np.uint8))
    hostile = "../../etc/passwd\x00\n"
    first = snapshot.make(str(media), out, event("cam/a.jpg", event_id=hostile), [])
    assert re.fullmatch(r"cam\.[0-9a-f]{32}-r1\.jpg", first.snapshot), first.snapshot
    again = snapshot.make(str(media), out, event("cam/a.jpg", event_id=hostile), [])
    assert again.snapshot == first.snapshot and again.written_bytes == 0  # a redelivery makes nothing
    second = snapshot.make(str(media), out, event("cam/a.jpg", event_id=hostile, revision=2), [])
    assert second.snapshot != first.snapshot and second.written_bytes > 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp")) == []
    assert oct((out / first.snapshot).stat().st_mode & 0o777) == "0o640"


def test_unreadable_frames_and_hostile_boxes_are_reasons_not_crashes(tmp_path):
    media, out = tmp_path / "media", tmp_path / "snaps"
    (media / "cam").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    os.symlink(tmp_path / "secret.jpg", media / "cam" / "link.jpg")
    (media / "cam" / "junk.jpg").write_bytes(b"\xff\xd8 not really")
    for path in ("cam/link.jpg", "../secret.jpg", "cam/junk.jpg", "cam/missing.jpg", None):
        made = snapshot.make(str(media), out, event(path), [])
        assert made.snapshot is None and made.error, path
    cv2.imwrite(str(media / "cam" / "ok.png"), np.full((50, 50, 3), GREY, np.uint8))
    boxes = [Box("person", 0.9, float("nan"), 0, 10, 10), Box("cat", 0.5, -1e300, -5, 1e300, 1e9)]
    made = snapshot.make(str(media), out, event("cam/ok.png", boxes), [])
    assert made.error is None and (out / made.snapshot).stat().st_size > 0
