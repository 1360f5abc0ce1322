"""The watcher's pure logic: file kinds, settling, identity, the durable ledger."""

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import unsafe_field
from services.watcher.files import (
    MAX_WALK,
    Ledger,
    NotRegularFile,
    Settler,
    camera_id,
    file_id,
    hash_file,
    incomplete,
    is_candidate,
    ledger_key,
    name_problem,
    sniff_kind,
)


@pytest.mark.parametrize(
    "head, kind",
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "image"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image"),
        (b"\x00\x00\x00\x18ftypmp42", "clip"),
        (b"\x1a\x45\xdf\xa3\x01\x00", "clip"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "clip"),
        (b"GIF89a", None),
        (b"hello world, not an image", None),
        (b"", None),
    ],
)
def test_sniff_kind(head, kind):
    assert sniff_kind(head) == kind


def test_settles_only_after_quiet_period():
    s = Settler(2.0)
    s.observe("f", 10, 1, now=0.0)
    s.observe("f", 20, 2, now=1.5)  # still growing: clock restarts
    assert s.settled(now=3.0) == []
    s.observe("f", 20, 2, now=3.0)  # unchanged: clock keeps running
    assert s.settled(now=3.6) == [("f", 20, 2)]
    assert len(s) == 0


def test_camera_id_is_the_folder_name_or_nothing():
    """A folder name that is not a valid id is refused, never folded: "front.door" and "front door"
    must not become front_door, whose quota and evidence they would then share."""
    assert camera_id("garage-1") == "garage-1"
    assert camera_id("cam", "site1-") == "site1-cam"
    for bad in ("front door", "front.door", "*>", "", "x" * 129, "caf\u00e9"):
        assert camera_id(bad) is None, bad


@pytest.mark.parametrize(
    "rel, why",
    [
        (os.fsdecode(b"front_door/\xff.jpg"), "not valid UTF-8"),
        (os.fsdecode(b"\xe9t\xe9/a.jpg"), "not valid UTF-8"),
        ("front_door/a\x1b[31m.jpg", "control characters"),
        ("front_door/a\nb.jpg", "control characters"),
        ("front_door/a\u0085.jpg", "control characters"),
        ("front_door/evil\u202egpj.exe", "control characters"),  # shown as "evilexe.jpg"
        ("front_door/a\u2028b.jpg", "control characters"),
        ("front.door/a.jpg", "not a camera id"),
        ("front door/a.jpg", "not a camera id"),
    ],
)
def test_names_that_cannot_travel_are_refused(rel, why):
    assert why in name_problem(rel)
    assert not unsafe_field(ledger_key(rel))  # what the ledger and the dead letter carry is clean text


def test_good_names_pass():
    assert name_problem("front_door/2026/12/01/Caf\u00e9 \u00e0 10h.jpg") is None
    assert name_problem("front_door/\U0001f468\u200d\U0001f469.jpg") is None  # a zero-width joiner in an emoji is text
    assert name_problem("cam/a.jpg", "site-") is None
    assert "after the prefix" in name_problem("cam/a.jpg", "bad prefix ")


def test_file_id_is_deterministic_and_distinct():
    assert file_id("c", "c/a.jpg", "ab") == file_id("c", "c/a.jpg", "ab")
    assert file_id("c", "c/a.jpg", "ab") != file_id("c", "c/b.jpg", "ab")


def test_candidates():
    ext = {".jpg"}
    assert is_candidate(Path("cam/2026/a.jpg"), ext)
    assert not is_candidate(Path("a.jpg"), ext)  # not inside a camera folder
    assert not is_candidate(Path("cam/.a.jpg.part"), ext)
    assert not is_candidate(Path("cam/a.txt"), ext)


def test_ledger_survives_reopen(tmp_path):
    """The durable marker outlives the process: a restart does not re-publish."""
    db = tmp_path / "ledger.sqlite3"
    ledger = Ledger(db)
    ledger.mark([("cam/a.jpg", 10, 5, "id", "published", 0.0)])
    ledger.close()
    ledger = Ledger(db)
    assert ledger.known("cam/a.jpg", 10, 5)
    assert not ledger.known("cam/a.jpg", 11, 5)  # same name, new content: publish again


def test_hash_file_refuses_symlink_and_fifo(tmp_path):
    target = tmp_path / "t.jpg"
    target.write_bytes(b"\xff\xd8\xff\xd9" + b"x" * 11)  # SOI, EOI, and trailing bytes
    (tmp_path / "link.jpg").symlink_to(target)
    with pytest.raises(OSError):
        hash_file(tmp_path, "link.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")
    with pytest.raises(NotRegularFile):
        hash_file(tmp_path, "fifo.jpg")
    digest, head, size, _, cut = hash_file(tmp_path, "t.jpg")
    assert head.startswith(b"\xff\xd8\xff") and size == 15 and len(digest) == 64 and cut is None


def test_hash_file_never_leaves_the_root_through_a_linked_folder(tmp_path):
    """A parent folder swapped for a symlink (between the watcher's check and its hash) must not lead
    the hash outside the root: only the last component had O_NOFOLLOW before."""
    root, outside = tmp_path / "media", tmp_path / "etc"
    (root / "cam").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"\xff\xd8\xffsecret")
    (root / "cam" / "sub").symlink_to(outside)
    with pytest.raises(OSError):
        hash_file(root, "cam/sub/secret.jpg")
    for bad in ("../etc/secret.jpg", "/etc/passwd", "cam//x.jpg", "cam/./x.jpg"):
        with pytest.raises(ValueError):
            hash_file(root, bad)


# ---- a file cut short (a dropped FTP upload) is told from a whole one ---------------------------------
def _whole_files(tmp: Path) -> dict[str, bytes]:
    import cv2
    import skimage.data

    cat = cv2.resize(skimage.data.chelsea(), (96, 64))
    out = {ext: cv2.imencode(ext, cat)[1].tobytes() for ext in (".jpg", ".png", ".bmp", ".webp")}
    for ext, fourcc in ((".mp4", "mp4v"), (".avi", "MJPG")):
        writer = cv2.VideoWriter(str(tmp / f"c{ext}"), cv2.VideoWriter_fourcc(*fourcc), 5.0, (96, 64))
        for i in range(6):
            writer.write(np.roll(cat, i * 7, axis=1))
        writer.release()
        out[ext] = (tmp / f"c{ext}").read_bytes()
    # an EXIF APP1 holding a thumbnail, itself a whole JPEG with its own EOI, and NUL padding
    thumb = cv2.imencode(".jpg", cv2.resize(cat, (16, 12)))[1].tobytes()
    app1 = b"Exif\x00\x00" + thumb + b"\x00" * 64
    out[".exif.jpg"] = out[".jpg"][:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + out[".jpg"][2:]
    return out


def _cut(data: bytes, size: int | None = None) -> str | None:
    import io

    return incomplete(io.BytesIO(data), data[:16], len(data) if size is None else size)


def test_whole_files_of_every_checked_format_are_complete(tmp_path):
    for ext, data in _whole_files(tmp_path).items():
        assert _cut(data) is None, ext
    jpeg = _whole_files(tmp_path)[".jpg"]
    assert _cut(jpeg + b"\x00" * 300) is None  # a camera that pads its JPEGs with NULs
    assert _cut(b"\x1a\x45\xdf\xa3" + b"\x00" * 40) is None  # Matroska: not checked (sizes may be "unknown")
    # bytes after the end: a newline, fill bytes, a text trailer, a motion photo's clip, NUL padding
    files = _whole_files(tmp_path)
    for trailer in (b"\r\n", b"\xff" * 16, b"camera 3 v1.2", files[".mp4"], b"\x00" * 5000):
        assert _cut(files[".jpg"] + trailer) is None, trailer[:16]
        assert _cut(files[".exif.jpg"] + trailer) is None, trailer[:16]
    assert _cut(files[".png"] + b"\n") is None
    assert _cut(files[".mp4"] + b"\x00" * 4) is None


@given(st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_file_cut_short_is_incomplete(tmp_path, data):
    """Wherever an upload stops (after the 16 bytes that say its format), the watcher sees it is not
    whole: a JPEG's entropy-coded data never holds FF D9, a PNG ends with IEND, BMP and RIFF declare
    their length, an MP4's boxes overrun the end."""
    files = _WHOLE.setdefault("files", _whole_files(tmp_path))
    ext = data.draw(st.sampled_from(sorted(files)))
    whole = files[ext]
    cut = data.draw(st.integers(min_value=16, max_value=len(whole) - 1))
    assert _cut(whole[:cut]) is not None, (ext, cut, len(whole))


_WHOLE: dict[str, dict[str, bytes]] = {}


def test_the_reasons_name_the_missing_part(tmp_path):
    files = _whole_files(tmp_path)
    assert _cut(files[".jpg"][:300]) == "JPEG cut inside its headers"
    assert _cut(b"\xff\xd8\xff\xd9") is None  # its start and its end: whole (and nothing to decode)
    assert _cut(files[".jpg"][: len(files[".jpg"]) - 2]) == "JPEG without its end marker (EOI)"
    assert _cut(files[".png"][:500]) == "PNG without its IEND chunk"
    assert "its header says" in _cut(files[".bmp"][:500])
    assert _cut(files[".mp4"][: len(files[".mp4"]) - 10]).startswith("MP4 cut inside its 'moov' box")
    assert _cut(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2") == "MP4 without its index (moov box)"
    assert _cut(b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2\x00\x00\x00\x04free") == (
        "MP4 with a box of length 4 at byte 24"
    )
    # a hostile chain of 8-byte boxes is walked only so far (MAX_WALK), then left to the detector
    ftyp = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    assert _cut(ftyp + b"\x00\x00\x00\x08free" * (MAX_WALK + 5)) is None
    assert _cut(ftyp + b"\x00\x00\x00\x08free" * 1000) == "MP4 without its index (moov box)"
    # 64-bit box lengths, and a last box "to the end of the file"
    assert _cut(ftyp + b"\x00\x00\x00\x01mdat" + (24).to_bytes(8, "big") + b"x" * 8 + b"\x00\x00\x00\x00moov") is None
