"""The watcher's pure logic: file kinds, settling, identity, the durable ledger."""

import os
from pathlib import Path

import pytest

from proto import unsafe_field
from services.watcher.files import (
    Ledger,
    NotRegularFile,
    Settler,
    camera_id,
    file_id,
    hash_file,
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
    target.write_bytes(b"\xff\xd8\xff" + b"x" * 10)
    (tmp_path / "link.jpg").symlink_to(target)
    with pytest.raises(OSError):
        hash_file(tmp_path, "link.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")
    with pytest.raises(NotRegularFile):
        hash_file(tmp_path, "fifo.jpg")
    digest, head, size, _ = hash_file(tmp_path, "t.jpg")
    assert head.startswith(b"\xff\xd8\xff") and size == 13 and len(digest) == 64


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
