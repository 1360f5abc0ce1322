"""Opening files under the media root, where every name is controlled by a camera (or whoever can
write there): one walk for the watcher, the detector and retention."""

from __future__ import annotations

import os
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def safe_parts(rel: str) -> list[str]:
    """The components of a path relative to the media root; ValueError for an absolute path, or one
    with "..", "." or empty components (a forged message must not name a file elsewhere)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe path {rel!r}")
    return parts


def open_beneath(root: str | Path, rel: str) -> int:
    """A read-only fd of `rel` below `root`, opened one folder at a time relative to its parent with
    O_NOFOLLOW: a symlink at any level (a camera folder swapped for a link to /etc between a check and
    the open) fails with ELOOP/ENOTDIR instead of leading out of the root. O_NONBLOCK: a FIFO never
    blocks the open. Raises OSError (FileNotFoundError when a part is missing) or ValueError."""
    parts = safe_parts(rel)
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def write_secret(path: Path, text: str) -> None:
    """A credential file: 0600 from its first byte (never readable by others, whatever the umask),
    written beside its final name and renamed into place, so a reader sees the old or the new one."""
    tmp = path.with_name(f".{path.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
