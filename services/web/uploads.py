"""POST /api/v1/uploads/<camera>: a camera (or a script) pushes an image or a clip over HTTP.

The body is streamed to a hidden temp file in the camera's own folder (the watcher skips hidden names),
bounded by web.upload_max_bytes, checked by its magic bytes, fsynced and renamed into place: from then
on it is exactly an FTP upload (the watcher publishes it, `vigil trace` finds it). The answer carries
the file id the watcher will give it (the same deterministic id: camera, path, SHA-256)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import secrets
import time
from pathlib import Path

from proto.messages import valid_camera
from services.watcher.files import file_id, incomplete, sniff_kind

CHUNK = 64 * 1024


class Refused(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def kind_of(head: bytes) -> str | None:
    """The file's extension by its magic bytes (the watcher's own test decides); None: not an image or
    clip vigil reads."""
    if sniff_kind(head) is None:
        return None
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"BM") and len(head) >= 14:
        return ".bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return ".avi"
    if head[4:8] == b"ftyp":
        return ".mov" if head[8:10] == b"qt" else ".mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return ".mkv"
    return None


def camera_folder(media_root: str, camera: str) -> Path:
    """The camera's folder, which must exist already (`vigil camera add` makes it): an upload never
    creates a camera. Refused: a name that is not a camera id, a folder that is missing or a symlink."""
    if not valid_camera(camera):
        raise Refused(404, "unknown_camera", "not a camera name (letters, digits, '-' and '_')")
    folder = Path(media_root) / camera
    if folder.is_symlink() or not folder.is_dir():
        raise Refused(404, "unknown_camera", f"no camera {camera!r}: its folder does not exist")
    return folder


def _fsync_folder(folder: Path) -> None:
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _cut(path: Path, head: bytes, size: int) -> str | None:
    with open(path, "rb", buffering=0) as f:
        return incomplete(f, head, size)


async def receive(
    content, folder: Path, camera_id: str, max_bytes: int, length: int | None, accepted: set[str]
) -> dict:
    """Stream `content` (aiohttp's StreamReader) into the folder; the answer's JSON, or Refused."""
    if length is not None and length > max_bytes:
        raise Refused(413, "too_large", f"{length} bytes is more than the limit of {max_bytes}")
    tmp = folder / f".upload-{secrets.token_hex(8)}"
    digest = hashlib.sha256()
    size = 0
    head = b""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    except OSError as exc:  # a camera folder vigil-web may not write (made by root 0755, say)
        raise Refused(
            507 if exc.errno == errno.ENOSPC else 500,
            "cannot_write",
            f"cannot write into the camera's folder: {exc.strerror} (it must be writable by group vigil)",
        ) from None
    # the unit's UMask=0077 would leave 0600, which the watcher (another user, group vigil) cannot read
    os.fchmod(fd, 0o640)
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise Refused(413, "too_large", f"more than the limit of {max_bytes} bytes")
                if len(head) < 16:
                    head += chunk[: 16 - len(head)]
                digest.update(chunk)
                f.write(chunk)
            if size == 0:
                raise Refused(400, "empty", "the body is empty")
            ext = kind_of(head)
            if ext is None:
                raise Refused(415, "not_media", "not an image or clip (JPEG, PNG, BMP, WebP, MP4, MOV, MKV, AVI)")
            if ext not in accepted:
                raise Refused(415, "not_accepted", f"{ext} files are not watched here (watcher.*_extensions)")
            f.flush()
            # the whole body arrived, so a file cut short is the sender's: said now (the watcher would
            # hold it for a resume that HTTP cannot make, then reject it)
            cut = await asyncio.to_thread(_cut, tmp, head, size)
            if cut is not None:
                raise Refused(422, "incomplete", f"not a whole file: {cut}")
            await asyncio.to_thread(os.fsync, f.fileno())  # on the disk before it is answered for
        name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}{ext}"
        os.rename(tmp, folder / name)
        await asyncio.to_thread(_fsync_folder, folder)  # the rename survives a power cut
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise Refused(
            507 if exc.errno == errno.ENOSPC else 500, "cannot_write", f"cannot store it: {exc.strerror}"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    rel = f"{folder.name}/{name}"
    return {"file_id": file_id(camera_id, rel, digest.hexdigest()), "path": rel, "bytes": size}
