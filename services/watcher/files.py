"""The watcher's pure logic: what counts as a camera file, when it has settled, and its identity."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

from proto.messages import printable, unsafe_char, valid_camera
from services.runtime.files import open_beneath

# Magic bytes of the formats the detector can read; the extension alone is never trusted.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")


def sniff_kind(head: bytes) -> str | None:
    """'image', 'clip' or None from the first 16 bytes of a file."""
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head[4:8] == b"ftyp" or head.startswith(b"\x1a\x45\xdf\xa3") or (head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return "clip"
    return None


# Walks stop after this many segments, chunks or boxes (a fragmented MP4 has two top-level boxes per
# fragment: an hour at one a second is 7,200); a hostile file of tiny ones is then not checked, and the
# detector judges it, instead of costing a read per 8 bytes.
MAX_WALK = 100_000


def incomplete(f, head: bytes, size: int) -> str | None:
    """Why a file of a known format is not whole yet (None: it is, or its format cannot tell).

    An FTP upload cut off mid-file settles like a finished one (nothing writes to it any more), and
    OpenCV decodes a JPEG without its end with a grey bottom: without this check a camera's dropped
    connection would be detected, evented and recorded as if it were the picture. Each format says
    where it ends: a JPEG's EOI marker after its first scan's header (so not an EXIF thumbnail's), a
    PNG's IEND chunk, BMP's and RIFF's (WebP, AVI) declared length, an MP4/MOV's chain of boxes holding
    its `moov` index. Bytes after the end are allowed (motion photos append a clip, some cameras pad
    with NULs or a newline). Matroska (segments may be of "unknown size") is not checked. `f` is open
    at any offset; it is read in place, never whole into memory.
    """

    def at(offset: int, n: int) -> bytes:
        f.seek(offset)
        return f.read(n)

    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg_cut(at, size)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        offset = 8
        for _ in range(MAX_WALK):
            chunk = at(offset, 8)
            if len(chunk) < 8:
                return "PNG without its IEND chunk"
            if chunk[4:8] == b"IEND":
                return None if offset + 12 <= size else "PNG without its IEND chunk"
            offset += 12 + int.from_bytes(chunk[:4], "big")
        return None
    if head.startswith(b"BM") and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return f"BMP of {size} bytes, its header says {declared}" if declared > size else None
    if head[:4] == b"RIFF" and len(head) >= 8:
        declared = int.from_bytes(head[4:8], "little") + 8
        return (
            f"{head[8:12].decode('latin-1').strip()} of {size} bytes, its header says {declared}"
            if declared > size
            else None
        )
    if head[4:8] == b"ftyp":
        offset, indexed = 0, False
        for _ in range(MAX_WALK):
            if offset >= size or (indexed and size - offset < 8 and not at(offset, 8).strip(b"\x00")):
                break  # the end (a few NULs of padding after a whole file are no box)
            box = at(offset, 16)
            if len(box) < 8:
                return f"MP4 cut inside a box header at byte {offset}"
            length, kind = int.from_bytes(box[:4], "big"), box[4:8]
            if length == 1:  # 64-bit length follows
                length = int.from_bytes(box[8:16], "big") if len(box) == 16 else 0
            elif length == 0:  # "to the end of the file"
                length = size - offset
            if length < 8:
                return f"MP4 with a box of length {length} at byte {offset}"
            if offset + length > size:
                return f"MP4 cut inside its {kind.decode('latin-1')!r} box ({size} of {offset + length} bytes)"
            indexed = indexed or kind == b"moov"
            offset += length
        else:
            return None  # more top-level boxes than any camera writes: not walked to the end
        return None if indexed else "MP4 without its index (moov box)"
    return None


def _jpeg_cut(at, size: int) -> str | None:
    """Walk the marker segments from SOI to the first SOS (an EXIF thumbnail, with its own EOI, lives in
    APP1 before it), then look for EOI in what follows: entropy-coded data never holds FF D9 (a data FF
    is followed by 00, or by D0-D7 for a restart marker), so one there is the image's end."""
    offset = 2
    for _ in range(MAX_WALK):
        marker = at(offset, 4)
        if len(marker) < 2:
            return "JPEG cut inside its headers"
        if marker[0] != 0xFF:
            return None  # not a marker where one must be: corrupt, not cut short (the detector says so)
        if marker[1] == 0xFF:  # fill byte
            offset += 1
            continue
        if marker[1] == 0xD8 or 0xD0 <= marker[1] <= 0xD7 or marker[1] == 0x01:  # no length
            offset += 2
            continue
        if marker[1] == 0xD9:
            return None
        if len(marker) < 4:
            return "JPEG cut inside its headers"
        offset += 2 + int.from_bytes(marker[2:4], "big")
        if marker[1] == 0xDA:  # start of scan: the image data follows
            break
    else:
        return None
    # Searched from the end back to the scan: a whole file's EOI is in its last block, so this reads
    # 64 KiB, not the whole file (which the hash then reads again). Any FF D9 after the scan's start
    # will do: a whole file has its EOI there, a file cut short has none (trailing bytes may hold more).
    end = size
    while end > offset:
        start = max(offset, end - (1 << 16))
        if b"\xff\xd9" in at(start, end - start + 1):  # one byte past the block: a marker across the edge
            return None
        end = start
    return "JPEG without its end marker (EOI)"


def camera_id(folder: str, prefix: str = "") -> str | None:
    """The camera id of a folder under the media root: `prefix` + the folder name, when that is a valid
    id (a NATS subject token: letters, digits, '-' and '_'). None otherwise: "front.door" and
    "front door" are never folded into "front_door", whose evidence they would then share."""
    name = prefix + folder
    return name if valid_camera(name) else None


def name_problem(rel: str, prefix: str = "") -> str | None:
    """Why a file under the media root cannot be taken by its name (None: it can). Every message and
    row carries the name as text, so it must be UTF-8 without control characters, and its first folder
    must be a camera id."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    if unsafe_char(rel):
        return "file name contains control characters (or invisible direction marks)"
    folder = rel.split("/", 1)[0]
    if camera_id(folder, prefix) is None:
        return (
            f"camera folder {folder!r} is not a camera id (letters, digits, '-' and '_', at most 128"
            f"{', after the prefix ' + repr(prefix) if prefix else ''}): rename the folder"
        )
    return None


def ledger_key(rel: str) -> str:
    """The ledger's text for a path: the name itself, or its escaped form for a name that is not UTF-8
    or has control characters (SQLite stores UTF-8 text only; such files are only ever rejected)."""
    return printable(rel)


def file_id(camera: str, rel_path: str, sha256: str) -> str:
    """Deterministic id: the same file re-published (after a crash, a rescan) dedupes downstream."""
    return hashlib.sha256(f"{camera}\0{rel_path}\0{sha256}".encode()).hexdigest()[:32]


def is_candidate(rel: Path, extensions: set[str]) -> bool:
    """A file worth watching: inside a camera folder, not hidden/temporary, with a known extension."""
    parts = rel.parts
    return len(parts) >= 2 and not any(p.startswith(".") for p in parts) and rel.suffix.lower() in extensions


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    since: float
    camera: str = ""


class Settler:
    """Tracks files until their size and mtime have stayed the same for `settle_seconds`.

    A slow FTP upload keeps changing size/mtime, so it is never read half-written.
    """

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def observe(self, path: str, size: int, mtime_ns: int, now: float, camera: str | None = None) -> None:
        seen = self._pending.get(path)
        if seen is None or (seen.size, seen.mtime_ns) != (size, mtime_ns):
            self._pending[path] = _Pending(
                size, mtime_ns, now, camera if camera is not None else (seen.camera if seen else "")
            )

    def forget(self, path: str) -> None:
        self._pending.pop(path, None)

    def paths(self) -> list[str]:
        return list(self._pending)

    def settled_in_order(self, now: float, max_wait: float) -> list[tuple[str, int, int]]:
        """The settled paths in capture order (mtime, then path), minus those whose camera still has an
        earlier file settling: a big clip still being written holds back the camera's later snapshots
        (for at most `max_wait` seconds), so the camera's files leave in the order they were taken."""
        earliest: dict[str, int] = {}
        for v in self._pending.values():
            if now - v.since < self.settle_seconds and v.mtime_ns < earliest.get(v.camera, v.mtime_ns + 1):
                earliest[v.camera] = v.mtime_ns
        done = []
        for p, v in list(self._pending.items()):
            if now - v.since < self.settle_seconds:
                continue
            if v.mtime_ns > earliest.get(v.camera, v.mtime_ns) and now - v.since < self.settle_seconds + max_wait:
                continue
            done.append((p, v.size, v.mtime_ns))
            del self._pending[p]
        return sorted(done, key=lambda r: (r[2], r[0]))

    def settled(self, now: float) -> list[tuple[str, int, int]]:
        """Paths whose (size, mtime) were unchanged for settle_seconds; they leave the pending set."""
        done = [(p, v.size, v.mtime_ns) for p, v in self._pending.items() if now - v.since >= self.settle_seconds]
        for p, _, _ in done:
            del self._pending[p]
        return done


class Ledger:
    """Durable record of what was published (SQLite in the state dir).

    JetStream's duplicate window is 2 minutes; this marker makes "never published twice" hold across
    restarts of any length. A row is written only after the PubAck, so a crash in between at worst
    re-publishes with the same Nats-Msg-Id / file_id, which downstream dedupes.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a marked batch survives a power cut (NORMAL could lose the last ones, which would only be
        # re-published and deduplicated downstream by file id, but "never published twice" is the point)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS published (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
            " file_id TEXT, status TEXT, at REAL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS published_file_id ON published (file_id)")

    def known(self, path: str, size: int, mtime_ns: int) -> bool:
        row = self._db.execute("SELECT size, mtime_ns FROM published WHERE path = ?", (path,)).fetchone()
        return row is not None and (row[0], row[1]) == (size, mtime_ns)

    def published_before(self, file_id: str) -> bool:
        """The same content at the same path (the file id) was published already: a `touch` or a camera
        re-sending an identical file is not a new detection."""
        return (
            self._db.execute(
                "SELECT 1 FROM published WHERE file_id = ? AND status = 'published' LIMIT 1", (file_id,)
            ).fetchone()
            is not None
        )

    def mark(self, rows: list[tuple[str, int, int, str, str, float]]) -> None:
        """rows: (path, size, mtime_ns, file_id, status, at); status is 'published' or 'rejected: why'."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO published VALUES (?, ?, ?, ?, ?, ?)", rows)

    def prune(self, existing: set[str]) -> int:
        """Delete the rows of files that no longer exist; returns how many went."""
        gone = [(p,) for (p,) in self._db.execute("SELECT path FROM published") if p not in existing]
        if gone:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM published WHERE path = ?", gone)
        return len(gone)

    def close(self) -> None:
        self._db.close()


def hash_file(root: str | Path, rel: str) -> tuple[str, bytes, int, int, str | None]:
    """sha256, first 16 bytes, the (size, mtime_ns) read *after* hashing, so a change is noticed, and
    why the file is not whole yet (`incomplete`; then it is not hashed: "" stands for the digest).

    Opened folder by folder without following a symlink at any level (services/runtime/files.py), never
    blocking on a FIFO; raises NotRegularFile for anything but a plain file, OSError when it cannot open.
    """
    fd = open_beneath(root, rel)
    with open(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(rel)
        head = f.read(16)
        cut = incomplete(f, head, os.fstat(fd).st_size)
        if cut is not None:
            st = os.fstat(fd)
            return "", head, st.st_size, st.st_mtime_ns, cut
        f.seek(0)
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        st = os.fstat(fd)
    return digest, head, st.st_size, st.st_mtime_ns, None


class NotRegularFile(OSError):
    pass
