"""Event snapshots: the best frame of each event revision with its boxes, labels, scores and the camera's
zones drawn, and a small thumbnail, written under <state_dir>/snapshots/.

Why the analyzer makes them: it is the one stage that sees every revision of an event already judged
(the aggregator picks the best detection but holds no pixels; the detector holds the decoded frame but
cannot know which of its frames an event will call best, and drawing every frame would cost every
upload). It knows the camera's zones, and it writes the snapshot *before* it publishes the analysis, so
the notifier can attach it and the recorder stores its name with the analysis. The web service only
reads these files: no page view decodes an image.

Made once per revision (a redelivery finds the file and keeps it), written atomically (a temp file in
the same folder, fsync, rename), named by the camera and a hash of the event id so nothing else a
message carries becomes part of a path."""

from __future__ import annotations

import hashlib
import math
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from proto import Box, EventClosed
from services.runtime.config import Zone
from services.runtime.files import open_beneath

MAX_MEDIA_BYTES = 512 * 1024 * 1024
THUMB_WIDTH = 320
JPEG_QUALITY = 85
CLIP_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov")
ZONE_COLOUR = (0, 215, 255)  # BGR amber: zones are context, boxes are the finding


class FrameUnreadable(Exception):
    """str() is why the best frame could not be had (shown as the analysis' snapshot_error)."""


@dataclass(frozen=True)
class Made:
    snapshot: str | None  # relative to the snapshots folder
    thumbnail: str | None
    error: str | None = None
    written_bytes: int = 0  # 0 when the files were there already (a redelivery)


def names(camera: str, event_id: str, revision: int) -> tuple[str, str]:
    """One flat folder: the installer makes it group vigil and setgid, and a unit with
    RestrictSUIDSGID= could not give a subfolder of its own those bits."""
    stem = f"{camera}.{hashlib.sha256(event_id.encode('utf-8', 'surrogateescape')).hexdigest()[:32]}-r{revision}"
    return f"{stem}.jpg", f"{stem}.thumb.jpg"


def clip_frame_index(best_file_id: str) -> int | None:
    """A clip frame's detection key is "<file_id>:<native frame index>" (Detections.key)."""
    _, sep, tail = best_file_id.rpartition(":")
    return int(tail) if sep and tail.isdigit() else None


def read_frame(media_root: str, ev: EventClosed) -> np.ndarray:
    """The event's best frame in source pixels (BGR). Never leaves the media root, never follows a
    symlink; for a clip, the very frame the detector saw (grabbed up to its index, as the detector
    sampled it), else the frame at its offset."""
    if not ev.best_path:
        raise FrameUnreadable("the event names no best frame")
    try:
        fd = open_beneath(media_root, ev.best_path)
    except (ValueError, OSError) as exc:
        raise FrameUnreadable(f"cannot open {ev.best_path!r}: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FrameUnreadable(f"{ev.best_path!r} is not a regular file")
        if st.st_size > MAX_MEDIA_BYTES:
            raise FrameUnreadable(f"{ev.best_path!r} is larger than {MAX_MEDIA_BYTES} bytes")
        if Path(ev.best_path).suffix.lower() in CLIP_SUFFIXES:
            frame = _clip_frame(fd, clip_frame_index(ev.best_file_id), ev.best_offset_s)
        else:
            with open(fd, "rb", closefd=False) as f:
                frame = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # an empty or broken file: OpenCV asserts rather than answering None
        raise FrameUnreadable(f"cannot decode {ev.best_path!r}: {str(exc).strip()[:120]}") from None
    finally:
        os.close(fd)
    if frame is None:
        raise FrameUnreadable(f"cannot decode {ev.best_path!r}")
    return frame


def _clip_frame(fd: int, index: int | None, offset_s: float) -> np.ndarray | None:
    cap = cv2.VideoCapture(f"/proc/self/fd/{fd}")
    try:
        if not cap.isOpened():
            return None
        if index is None:
            cap.set(cv2.CAP_PROP_POS_MSEC, offset_s * 1000)
            ok, frame = cap.read()
            return frame if ok else None
        for _ in range(index):  # seeking by time lands on key frames; grabbing is exact
            if not cap.grab():
                return None
        ok, frame = cap.read()
        return frame if ok else None
    finally:
        cap.release()


def colour(label: str) -> tuple[int, int, int]:
    """A steady, saturated colour per label (the same label is the same colour on every snapshot)."""
    h = int(hashlib.sha256(label.encode()).hexdigest()[:2], 16) * 180 // 256
    hsv = np.array([[[h, 230, 255]]], np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _clamp(v: float, size: int) -> int:
    return min(max(round(v), -1), size) if math.isfinite(v) else 0


def draw(frame: np.ndarray, boxes: list[Box], zones: list[Zone]) -> np.ndarray:
    """`frame` with the zones outlined and each box drawn with its label and score (in place)."""
    h, w = frame.shape[:2]
    thick = max(2, round(max(h, w) / 400))
    font = max(0.5, max(h, w) / 1600)
    for z in zones:
        pts = np.array([[_clamp(x, w), _clamp(y, h)] for x, y in z.polygon], np.int32).reshape(-1, 1, 2)
        cv2.polylines(frame, [pts], True, ZONE_COLOUR, thick)
        x0, y0 = pts[:, 0, 0].min(), pts[:, 0, 1].min()
        cv2.putText(frame, z.name, (int(x0) + 4, int(y0) + 18), cv2.FONT_HERSHEY_SIMPLEX, font, ZONE_COLOUR, 1)
    for b in sorted(boxes, key=lambda b: b.score):  # the best drawn last, on top
        if not all(math.isfinite(v) for v in (b.x1, b.y1, b.x2, b.y2)):
            continue  # a box no frame holds (a hostile message): drawn nowhere rather than failing the event
        c = colour(b.label)
        p1 = (_clamp(b.x1, w), _clamp(b.y1, h))
        p2 = (_clamp(b.x2, w), _clamp(b.y2, h))
        cv2.rectangle(frame, p1, p2, c, thick)
        text = f"{b.label} {b.score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, max(1, thick // 2))
        ty = p1[1] - 4 if p1[1] - th - base - 4 >= 0 else p1[1] + th + 4
        cv2.rectangle(frame, (p1[0], ty - th - 2), (p1[0] + tw + 4, ty + base), c, cv2.FILLED)
        cv2.putText(frame, text, (p1[0] + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), max(1, thick // 2))
    return frame


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # under `vigil up`; the installer makes it on an appliance
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode(frame: np.ndarray) -> bytes:
    ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise FrameUnreadable("JPEG encoding failed")
    return jpeg.tobytes()


def thumbnail(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    if w <= THUMB_WIDTH:
        return frame
    return cv2.resize(frame, (THUMB_WIDTH, max(1, round(h * THUMB_WIDTH / w))), interpolation=cv2.INTER_AREA)


def make(media_root: str, root: Path, ev: EventClosed, zones: list[Zone]) -> Made:
    """The revision's snapshot and thumbnail under `root` (once), or why there is none. Runs in a
    thread: it decodes and encodes."""
    snap, thumb = names(ev.camera, ev.event_id, ev.revision)
    if (root / snap).is_file() and (root / thumb).is_file():
        return Made(snap, thumb)
    try:
        frame = draw(read_frame(media_root, ev), ev.best_boxes, zones)
        big, small = encode(frame), encode(thumbnail(frame))
    except FrameUnreadable as exc:
        return Made(None, None, str(exc))
    try:
        write_atomic(root / thumb, small)  # the thumbnail first: the snapshot's presence means both are there
        write_atomic(root / snap, big)
    except OSError as exc:  # a full disk, a folder it may not write: the event is still judged
        return Made(None, None, f"cannot write the snapshot in {root}: {exc.strerror or exc}")
    return Made(snap, thumb, written_bytes=len(big) + len(small))
