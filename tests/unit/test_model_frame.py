"""The best frame a vision model is sent: a JPEG no larger than 1024 px, taken from an image or from a
clip at the frame's offset, never from outside the media root or through a symlink."""

from __future__ import annotations

import os

import cv2
import numpy as np

from proto import EventClosed, LabelSummary
from services.analyzer.model import best_frame
from tests.support import photo_bytes


def event(path: str, offset: float = 0.0) -> EventClosed:
    return EventClosed(
        event_id="ev-1", camera="cam", started_at=0.0, ended_at=0.0, file_ids=["f"], labels={"person": LabelSummary(count=1, max_score=0.9)},
        best_file_id="f", close_reason="idle", best_path=path, best_offset_s=offset,
    )  # fmt: skip


def test_an_image_is_sent_scaled_to_at_most_1024_px(tmp_path):
    (tmp_path / "cam").mkdir()
    (tmp_path / "cam" / "big.jpg").write_bytes(photo_bytes("astronaut", scale=3.0))  # 1536 x 1536
    jpeg = best_frame(str(tmp_path), event("cam/big.jpg"))
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert jpeg[:2] == b"\xff\xd8" and img.shape[:2] == (1024, 1024)


def test_a_clip_gives_the_frame_at_its_offset(tmp_path):
    (tmp_path / "cam").mkdir()
    path = tmp_path / "cam" / "clip.avi"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(30):  # frame i is filled with grey level 8 * i
        out.write(np.full((48, 64, 3), 8 * i, np.uint8))
    out.release()
    img = cv2.imdecode(
        np.frombuffer(best_frame(str(tmp_path), event("cam/clip.avi", 2.0)), np.uint8), cv2.IMREAD_GRAYSCALE
    )
    assert abs(int(img.mean()) - 8 * 20) <= 12  # 2.0 s at 10 fps: frame 20


def test_nothing_outside_the_root_through_a_link_or_unreadable(tmp_path):
    root = tmp_path / "media"
    (root / "cam").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(photo_bytes("astronaut"))
    os.symlink(tmp_path / "secret.jpg", root / "cam" / "link.jpg")
    (root / "cam" / "empty.jpg").write_bytes(b"")
    (root / "cam" / "junk.jpg").write_bytes(b"\xff\xd8 not really")
    for path in ("cam/link.jpg", "../secret.jpg", "/etc/passwd", "cam/empty.jpg", "cam/junk.jpg", "cam/missing.jpg"):
        assert best_frame(str(root), event(path)) is None, path
