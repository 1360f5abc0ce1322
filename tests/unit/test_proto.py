"""The wire contract: readable JSON, typed headers, declared topology."""

import json

import msgspec
import pytest

import proto
from proto import Box, Detections, FileUploaded
from proto.topology import CONSUMERS, STREAMS


def test_roundtrip_and_readable_json():
    msg = Detections(
        file_id="f",
        camera="cam",
        path="cam/a.jpg",
        captured_at=1.5,
        width=4,
        height=3,
        model="m",
        inference_ms=2.0,
        boxes=[Box("person", 0.9, 1, 2, 3, 4)],
    )
    data = proto.encode(msg)
    doc = json.loads(data)
    assert doc["type"] == "Detections" and doc["boxes"] == [["person", 0.9, 1, 2, 3, 4]]
    assert proto.decode(data) == msg


def test_headers_name_type_version_and_dedupe_id():
    msg = FileUploaded(file_id="f", camera="c", path="c/x.jpg", size=1, mtime=0.0, sha256="s", kind="image")
    assert proto.headers_for(msg, "upload-f") == {
        "Vigil-Type": "FileUploaded",
        "Vigil-Version": "1",
        "Nats-Msg-Id": "upload-f",
    }


def test_unknown_version_is_refused():
    data = proto.encode(FileUploaded(file_id="f", camera="c", path="p", size=1, mtime=0.0, sha256="s", kind="image"))
    with pytest.raises(ValueError, match="Vigil-Version"):
        proto.decode(data, {"Vigil-Version": "99"})


def test_garbage_payload_raises():
    with pytest.raises(msgspec.DecodeError):
        proto.decode(b"\xff\x00 not json")
    with pytest.raises(msgspec.ValidationError):
        proto.decode(b'{"type": "FileUploaded", "camera": 3}')


def test_every_stream_is_bounded_and_described():
    for s in STREAMS:
        assert s.description and s.max_age > 0 and s.max_bytes > 0, s.name
        assert all(subj.startswith(("vigil.", "$JS.EVENT.ADVISORY.")) for subj in s.subjects)


def test_every_consumer_has_a_stream_and_sane_limits():
    names = {s.name for s in STREAMS}
    for c in CONSUMERS:
        assert c.stream in names
        assert c.max_deliver == -1 or c.max_deliver >= len(c.backoff)  # -1: never given up (the exhausted-* advisories)
        assert c.max_ack_pending > 0 and c.ack_wait > 0


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\n", "\x7f", "\x85", "\x9b", "\u202e", "\u2066", "\u200f", "\u2028"])
def test_text_with_control_or_direction_characters_is_refused_both_ways(char):
    """NUL stalls PostgreSQL, ESC and CSI drive terminals, U+202E shows "evil\u202egpj.exe" as "evilexe.jpg":
    refused at encode (where the message is made) and at decode (whatever another process sent), escaped or raw."""
    det = Detections(
        file_id="f",
        camera="cam",
        path=f"cam/a{char}.jpg",
        captured_at=1.0,
        width=1,
        height=1,
        model="m",
        inference_ms=1.0,
        boxes=[Box("person", 0.9, 1, 2, 3, 4)],
    )
    with pytest.raises(ValueError, match="`path`"):
        proto.encode(det)
    doc = json.loads(proto.encode(Detections(**{**msgspec.structs.asdict(det), "path": "cam/a.jpg"})))
    doc["boxes"][0][0] = f"per{char}son"
    for raw in (json.dumps(doc).encode(), json.dumps(doc, ensure_ascii=False).encode()):
        with pytest.raises(msgspec.ValidationError, match=r"`boxes\[0\]\.label`"):
            proto.decode(raw)
    assert "\\" in proto.printable(f"a{char}b") and not proto.unsafe_field(proto.printable(f"a{char}b"))


def test_a_dead_letter_keeps_the_bytes_it_could_not_use():
    letter = proto.DeadLetter(
        stage="s", reason="r", original_subject="x", original_payload='{"path": "a\\u0000"}\x00\x1b'
    )
    assert proto.decode(proto.encode(letter)).original_payload == letter.original_payload
