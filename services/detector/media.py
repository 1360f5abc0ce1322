"""Reading camera files safely and turning them into BGR frames."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import cv2
import numpy as np


class Undecodable(Exception):
    """The file can never be processed (corrupt, not an image, outside the root): dead-letter it."""


def read_media(root: Path, rel_path: str, max_bytes: int) -> bytes:
    """Read a file under `root` without following symlinks or leaving the root."""
    if rel_path.startswith("/") or ".." in Path(rel_path).parts:
        raise Undecodable(f"path {rel_path!r} escapes the media root")
    path = root / rel_path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Undecodable("file vanished before it could be read") from None
    except OSError as exc:
        raise Undecodable(f"cannot open file: {exc.strerror}") from None
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Undecodable("not a regular file")
        if st.st_size > max_bytes:
            raise Undecodable(f"file is {st.st_size} bytes, above the {max_bytes}-byte limit")
        return f.read()


def decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes to BGR; OpenCV refuses more than OPENCV_IO_MAX_IMAGE_PIXELS (set from config)."""
    if not data:
        raise Undecodable("empty file")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise Undecodable(f"image decoder error: {str(exc).strip().splitlines()[-1][:200]}") from None
    if image is None or image.size == 0:
        raise Undecodable("image could not be decoded (corrupt or truncated)")
    return image


def decode_clip_frame(root: Path, rel_path: str) -> np.ndarray:
    """The middle frame of a clip (one frame per clip until the clip issue samples more)."""
    path = root / rel_path
    if path.is_symlink():
        raise Undecodable("clip is a symlink")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise Undecodable("clip could not be opened")
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if frames > 2:
            cap.set(cv2.CAP_PROP_POS_FRAMES, frames // 2)
        ok, frame = cap.read()
        if not ok or frame is None:
            raise Undecodable("clip has no decodable frame")
        return frame
    finally:
        cap.release()
