"""retention's filesystem side: scan the media root, decide what goes (pure), delete safely.

Safety rules, each enforced here and tested:
  - the media root may not be / or a home directory (refused at start);
  - symlinks are never followed and never deleted; neither are FIFOs, sockets or devices;
  - deletion walks the path one directory fd at a time with O_NOFOLLOW and unlinks relative to the
    parent's fd, so a directory swapped for a symlink mid-run cannot redirect it outside the root;
  - a path containing "..", "." or an absolute part is refused;
  - only files the pipeline has finished with (recorded in PostgreSQL, or dead-lettered) are deleted.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from proto import FTP_UPLOAD_FOLDER
from services.runtime.config import ConfigError, RetentionConfig, parse_watermark
from services.runtime.files import safe_parts
from services.watcher.files import camera_id, name_problem

DAY = 86400.0


class MediaFile(NamedTuple):
    rel: str  # relative to the media root, POSIX separators (as in FileUploaded.path)
    camera: str
    size: int
    mtime: float  # the capture time: the file's mtime, or the pipeline's sane one once it is recorded
    ctime: float = 0.0  # when the file last changed on this box (a camera cannot set it)
    arrived: float | None = None  # when the watcher took it (recorded files); youth is judged by this


class Plan(NamedTuple):
    delete: list[tuple[MediaFile, str]]  # (file, rule) oldest first within each rule
    kept_skipped: int
    young_skipped: int
    unrecorded_skipped: int


def check_root(root: str) -> Path:
    """Refuse a media root that is /, a home directory, or above one: a typo must not delete a system."""
    path = Path(os.path.realpath(root))
    homes = {Path("/root"), Path("/home")} | {Path(os.path.realpath(os.path.expanduser("~")))}
    with contextlib.suppress(OSError):
        homes |= {Path("/home") / d for d in os.listdir("/home")}
    if path == Path("/") or path in homes or any(h.is_relative_to(path) for h in homes):
        raise ConfigError(
            f"config error: media_root {root} is / or a home directory (or contains one): retention refuses to run there"
        )
    return path


def scan(root: Path, prefix: str = "", hidden: list[MediaFile] | None = None) -> list[MediaFile]:
    """Every regular file under <root>/<camera>/..., never through a symlink; hidden files (uploads
    in progress) are not media, and go to `hidden` when given (the stale-upload sweep). Folders that
    are not camera ids and names that are not UTF-8 (or hold control characters) are not listed: the
    watcher refused them, so the pipeline never recorded them and nothing here could ever delete them;
    their names could not even be queried."""
    out: list[MediaFile] = []
    try:
        with os.scandir(root) as cams:
            cameras = [
                (e, camera_id(e.name, prefix))
                for e in cams
                if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
            ]
    except OSError:
        return out
    for cam, camera in cameras:
        if camera is None:
            continue
        stack = [(cam.path, cam.name)]
        while stack:
            folder, rel = stack.pop()
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        if e.name.startswith("."):
                            if hidden is not None and e.is_file(follow_symlinks=False):
                                with contextlib.suppress(OSError):
                                    st = e.stat(follow_symlinks=False)
                                    if name_problem(f"{rel}/{e.name}", prefix) is None:
                                        hidden.append(
                                            MediaFile(f"{rel}/{e.name}", camera, st.st_size, st.st_mtime, st.st_ctime)
                                        )
                            continue
                        try:
                            st = e.stat(follow_symlinks=False)
                        except OSError:
                            continue  # vanished meanwhile
                        if stat.S_ISDIR(st.st_mode):
                            stack.append((e.path, f"{rel}/{e.name}"))
                        elif stat.S_ISREG(st.st_mode) and name_problem(f"{rel}/{e.name}", prefix) is None:
                            out.append(MediaFile(f"{rel}/{e.name}", camera, st.st_size, st.st_mtime, st.st_ctime))
            except OSError:
                continue  # unreadable folder: nothing there we could delete anyway
    return out


def watermark_bytes(text: str, total: int) -> int:
    kind, value = parse_watermark(text)
    return int(total * value / 100) if kind == "percent" else int(value)


def plan(
    files: list[MediaFile], finished: set[str], kept: set[str], cfg: RetentionConfig, now: float, free: int, total: int
) -> Plan:
    """What one run deletes: age, then per-camera quota, then watermark pressure (oldest first across
    cameras, never younger than min_keep_seconds). Only finished, not-kept files are deletable."""
    chosen: dict[str, tuple[MediaFile, str]] = {}
    skipped_kept: set[str] = set()
    skipped_unrecorded: set[str] = set()
    young_set: set[str] = set()

    def deletable(f: MediaFile) -> bool:
        if f.rel in kept:
            skipped_kept.add(f.rel)
            return False
        if f.rel not in finished:
            skipped_unrecorded.add(f.rel)
            return False
        return True

    def young(f: MediaFile) -> bool:
        # by arrival, not by the camera's clock: a just-uploaded file is never deleted, whatever its mtime says
        return (f.arrived if f.arrived is not None else f.mtime) > now - cfg.min_keep_seconds

    by_age = sorted(files, key=lambda f: (f.mtime, f.rel))
    for f in by_age:
        cam = cfg.cameras.get(f.camera)
        max_age = (cam.max_age_days if cam and cam.max_age_days is not None else cfg.max_age_days) * DAY
        if f.mtime < now - max_age and deletable(f):
            chosen[f.rel] = (f, "age")
    usage: dict[str, int] = {}
    for f in files:
        if f.rel not in chosen:
            usage[f.camera] = usage.get(f.camera, 0) + f.size
    for f in by_age:
        cam = cfg.cameras.get(f.camera)
        quota = cam.max_bytes if cam and cam.max_bytes is not None else cfg.camera_max_bytes
        if quota and usage.get(f.camera, 0) > quota and f.rel not in chosen:
            if young(f):
                young_set.add(f.rel)  # the promise holds under a quota too: it may be an event still open
            elif deletable(f):
                chosen[f.rel] = (f, "quota")
                usage[f.camera] -= f.size
    freed = sum(f.size for f, _ in chosen.values())
    # Below the low watermark, free up to the high one (counting what age and quota already free):
    # hysteresis, so runs do not repeat just above the low mark.
    if free < watermark_bytes(cfg.low_watermark, total):
        need = watermark_bytes(cfg.high_watermark, total) - (free + freed)
        # oldest arrival first: a camera's clock cannot move its files to the back (or the front) of the
        # queue. First from the cameras holding more than an equal share of what all cameras hold, and
        # only while they do: one busy (or hostile) camera cannot push out the others' evidence.
        by_arrival = sorted(files, key=lambda f: (f.arrived if f.arrived is not None else f.mtime, f.rel))
        share = sum(usage.values()) / len(usage) if usage else 0

        def take(f: MediaFile) -> None:
            nonlocal need
            if young(f):
                young_set.add(f.rel)
            elif deletable(f):
                chosen[f.rel] = (f, "watermark")
                usage[f.camera] -= f.size
                need -= f.size

        for f in by_arrival:
            if need <= 0:
                break
            if f.rel not in chosen and usage.get(f.camera, 0) > share:
                take(f)
        for f in by_arrival:
            if need <= 0:
                break
            if f.rel not in chosen:
                take(f)
    order = sorted(chosen.values(), key=lambda x: (x[0].mtime, x[0].rel))
    return Plan(order, len(skipped_kept - chosen.keys()), len(young_set), len(skipped_unrecorded - chosen.keys()))


def _open_folders(root: Path, parts: list[str]) -> list[int]:
    """fds of root and each folder of `parts[:-1]`, each opened with O_NOFOLLOW relative to its
    parent: a symlink anywhere on the way raises ValueError, a missing folder FileNotFoundError."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fds = [os.open(root, flags)]
    try:
        for part in parts[:-1]:
            try:
                fds.append(os.open(part, flags, dir_fd=fds[-1]))
            except FileNotFoundError:
                raise
            except OSError as exc:  # ELOOP/ENOTDIR: a symlink or a file where a folder should be
                raise ValueError(f"{'/'.join(parts)!r}: not reachable through plain folders ({exc.strerror})") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def lstat_under(root: Path, rel: str) -> os.stat_result | None:
    """The file's own stat if <root>/<rel> exists without a symlink at any level, else None."""
    try:
        parts = safe_parts(rel)
        fds = _open_folders(root, parts)
    except (OSError, ValueError):
        return None
    try:
        return os.stat(parts[-1], dir_fd=fds[-1], follow_symlinks=False)
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)


def unlink_under(root: Path, rel: str) -> int:
    """Delete <root>/<rel> if, and only if, it is a regular file reached without any symlink.
    Returns the bytes freed (0 if it was already gone); raises ValueError for an unsafe path."""
    parts = safe_parts(rel)
    try:
        fds = _open_folders(root, parts)
    except FileNotFoundError:
        return 0
    try:
        try:
            st = os.stat(parts[-1], dir_fd=fds[-1], follow_symlinks=False)
        except FileNotFoundError:
            return 0
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{rel!r} is not a regular file")
        os.unlink(parts[-1], dir_fd=fds[-1])
        # Remove folders this left empty (date folders), never the camera folder itself nor the upload
        # folder of a camera's FTP account (which it may not make again).
        for i in range(len(parts) - 2, 0, -1):
            if i == 1 and parts[1] == FTP_UPLOAD_FOLDER:
                break
            try:
                os.rmdir(parts[i], dir_fd=fds[i])
            except OSError:
                break
        return st.st_size
    finally:
        for fd in fds:
            os.close(fd)


def free_space(root: Path) -> tuple[int, int]:
    """(free bytes for unprivileged writers, total bytes) of the filesystem holding root."""
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def present(root: Path, rels: Iterable[str]) -> set[str]:
    """Which of these relative paths exist as regular files reached without a symlink at any level."""
    return {rel for rel in rels if (st := lstat_under(root, rel)) is not None and stat.S_ISREG(st.st_mode)}


class FallingFast:
    """The watcher's early warning: free space is below the low watermark, or falling so fast it will
    be within `horizon` seconds (before retention's own next check could notice)."""

    def __init__(self, low_watermark: str, horizon: float) -> None:
        self.low_watermark, self.horizon = low_watermark, horizon
        self.last: tuple[float, int] | None = None

    def check(self, now: float, free: int, total: int) -> str | None:
        low = watermark_bytes(self.low_watermark, total)
        last, self.last = self.last, (now, free)
        if free < low:
            return f"free {free} below the low watermark {low}"
        if last is not None and now > last[0]:
            rate = (last[1] - free) / (now - last[0])  # bytes per second being consumed
            if rate > 0 and free - rate * self.horizon < low:
                return (
                    f"free {free} falling at {rate:.0f} B/s: below the low watermark {low} within {self.horizon:.0f}s"
                )
        return None
