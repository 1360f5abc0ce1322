"""Reading camera files safely and turning them into frames."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import cv2
import numpy as np

from services.runtime.files import open_beneath


class Undecodable(Exception):
    """The file can never be processed (corrupt, not an image, outside the root): dead-letter it."""


def open_under(root: Path, rel_path: str) -> int:
    """Open `rel_path` below `root` one component at a time, refusing a symlink at any level.

    O_NOFOLLOW on the last component alone would still follow a linked directory; walking with
    dir_fd makes "never leave the media root" hold whatever the names. Returns a file descriptor.
    """
    try:
        return open_beneath(root, rel_path)
    except ValueError:
        raise Undecodable(f"path {rel_path!r} escapes the media root") from None
    except FileNotFoundError:
        raise Undecodable("file vanished before it could be read") from None
    except OSError as exc:
        raise Undecodable(f"cannot open file: {exc.strerror} (symlinks are never followed)") from None


def _check_regular(fd: int, max_bytes: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise Undecodable("not a regular file")
    if st.st_size > max_bytes:
        raise Undecodable(f"file is {st.st_size} bytes, above the {max_bytes}-byte limit")


def read_media(root: Path, rel_path: str, max_bytes: int) -> bytes:
    """Read a file under `root` without following symlinks or leaving the root."""
    fd = open_under(root, rel_path)
    with open(fd, "rb") as f:
        _check_regular(fd, max_bytes)
        return f.read()


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF marker without decoding, or None."""
    if not data.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def decode_image(data: bytes, target: int = 0, max_pixels: int = 0) -> tuple[np.ndarray, int, int]:
    """Decode to BGR; returns (image, source width, source height).

    A JPEG much larger than the model input (`target`) is decoded at 1/2, 1/4 or 1/8 scale by
    libjpeg itself, which is several times cheaper than decoding in full and resizing. OpenCV refuses
    more than OPENCV_IO_MAX_IMAGE_PIXELS (set from detector.max_pixels) before allocating.
    """
    if not data:
        raise Undecodable("empty file")
    flag, size, factor = cv2.IMREAD_COLOR, jpeg_size(data) if (target or max_pixels) else None, 1
    # OpenCV checks its pixel limit against the size it decodes to: a reduced decode of a JPEG that
    # claims 50,000 x 50,000 would pass at 1/8. The declared size is what the limit is about.
    if size and max_pixels and size[0] * size[1] > max_pixels:
        raise Undecodable(
            f"image declares {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, above detector.max_pixels {max_pixels:,}"
        )
    if not target:
        size = None
    if size:
        for factor, reduced in _REDUCED:
            if max(size) / factor >= target:
                flag = reduced
                break
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as exc:
        raise Undecodable(f"image decoder error: {str(exc).strip().splitlines()[-1][:200]}") from None
    if image is None or image.size == 0:
        raise Undecodable("image could not be decoded (corrupt or truncated)")
    if size and flag != cv2.IMREAD_COLOR:
        w, h = size
        if abs(image.shape[1] * factor - w) > 2 * factor:
            w, h = h, w  # imdecode applied an EXIF rotation the header size does not know about
        return image, w, h
    return image, image.shape[1], image.shape[0]


def sample_clip(
    root: Path, rel_path: str, fps: float, max_frames: int, max_bytes: int
) -> tuple[list[tuple[int, float, np.ndarray]], float]:
    """Frames of a clip at about `fps` per second, at most `max_frames`: ([(index, offset s, BGR)], duration s)."""
    fd = open_under(root, rel_path)
    # OpenCV opens a path; handing it our already-checked descriptor leaves no window to swap the file.
    cap = None
    try:
        _check_regular(fd, max_bytes)
        cap = cv2.VideoCapture(f"/proc/self/fd/{fd}")
        if not cap.isOpened():
            raise Undecodable("clip could not be opened")
        native = cap.get(cv2.CAP_PROP_FPS)
        native = native if native and 0 < native < 1000 else 25.0
        step = max(1, round(native / fps))
        frames, index = [], 0
        while len(frames) < max_frames:
            if not cap.grab():  # grab() skips decoding the frames we do not sample
                break
            if index % step == 0:
                ok, frame = cap.retrieve()
                if ok and frame is not None:
                    frames.append((index, round(index / native, 3), frame))
            index += 1
        if not frames:
            raise Undecodable("clip has no decodable frame")
        total = cap.get(cv2.CAP_PROP_FRAME_COUNT) or index
        return frames, float(total) / native
    finally:
        if cap is not None:
            cap.release()
        os.close(fd)
