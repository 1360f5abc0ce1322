"""Reading and decoding camera files: reduced JPEG decode, per-camera filters."""

import cv2
import numpy as np
import pytest

from proto import Box
from services.detector.engine import keep_for_camera
from services.detector.media import Undecodable, decode_image, jpeg_size, read_media
from services.runtime.config import CameraFilter, DetectorConfig


def jpeg(w, h):
    return cv2.imencode(".jpg", np.full((h, w, 3), 128, np.uint8))[1].tobytes()


def test_jpeg_size_from_header():
    assert jpeg_size(jpeg(1920, 1080)) == (1920, 1080)
    assert jpeg_size(b"\x89PNG") is None


def test_large_jpeg_is_decoded_reduced_but_reports_source_size():
    image, w, h = decode_image(jpeg(1920, 1080), target=416)
    assert (w, h) == (1920, 1080)
    assert image.shape[1] == 480  # 1/4 scale: still >= 416 on the long side


def test_small_jpeg_is_decoded_in_full():
    image, w, h = decode_image(jpeg(320, 240), target=416)
    assert image.shape[:2] == (240, 320) and (w, h) == (320, 240)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0" + b"\x00" * 40, b"random bytes"])
def test_corrupt_images_are_undecodable(data):
    with pytest.raises(Undecodable):
        decode_image(data)


def test_reading_refuses_escapes_symlinks_and_oversize(tmp_path):
    (tmp_path / "cam").mkdir()
    (tmp_path / "cam" / "a.jpg").write_bytes(b"x" * 100)
    (tmp_path / "cam" / "link.jpg").symlink_to(tmp_path / "cam" / "a.jpg")
    assert read_media(tmp_path, "cam/a.jpg", 1000) == b"x" * 100
    outside = tmp_path.parent / (tmp_path.name + "-outside")
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"s")
    (tmp_path / "cam" / "linkdir").symlink_to(outside)  # a linked directory is refused too
    for rel, limit, reason in [
        ("cam/../../etc/passwd", 1000, "escapes"),
        ("cam/link.jpg", 1000, "cannot open"),
        ("cam/linkdir/secret.jpg", 1000, "cannot open"),
        ("/etc/passwd", 1000, "escapes"),
        ("cam/a.jpg", 10, "limit"),
        ("cam/gone.jpg", 1000, "vanished"),
    ]:
        with pytest.raises(Undecodable, match=reason):
            read_media(tmp_path, rel, limit)


def test_per_camera_labels_and_min_scores():
    cfg = DetectorConfig(
        score_threshold=0.3, cameras={"drive": CameraFilter(labels=["person", "car"], min_score={"car": 0.6})}
    )
    boxes = [
        Box("person", 0.4, 0, 0, 1, 1),
        Box("car", 0.5, 0, 0, 1, 1),
        Box("car", 0.7, 0, 0, 1, 1),
        Box("cat", 0.9, 0, 0, 1, 1),
    ]
    assert [(b.label, b.score) for b in keep_for_camera(boxes, "drive", cfg)] == [("person", 0.4), ("car", 0.7)]
    assert keep_for_camera(boxes, "other", cfg) == boxes


def test_exif_rotated_jpeg_reports_the_rotated_size():
    """A portrait photo stored landscape with EXIF Orientation=6: sizes follow the decoded image."""
    data = bytearray(jpeg(3200, 1600))
    # APP1 Exif segment with a single Orientation=6 tag (little-endian TIFF), inserted after SOI
    tiff = (
        b"II*\x00\x08\x00\x00\x00"
        + b"\x01\x00"
        + b"\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00"
        + b"\x00\x00\x00\x00"
    )
    app1 = b"\xff\xe1" + (len(tiff) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + tiff
    data[2:2] = app1
    image, w, h = decode_image(bytes(data), target=416)
    assert (w, h) == (1600, 3200) and image.shape[0] > image.shape[1]


def test_clip_batches_are_split_by_frame_budget():
    """16 clips in one fetch are decoded a few at a time, so memory and watchdog time stay bounded."""
    from proto import FileUploaded
    from services.detector.service import Detector

    cfg = DetectorConfig(batch_size=16, clip_max_frames=120)
    det = Detector.__new__(Detector)
    det.cfg = cfg
    up = lambda kind, i: (FileUploaded(file_id=str(i), camera="c", path="p", size=1, mtime=0, sha256="s", kind=kind), i)  # noqa: E731
    units = [up("clip", i) for i in range(3)] + [up("image", i) for i in range(10, 30)]
    groups = det.frame_budget_groups(units)
    assert [len(g) for g in groups] == [1, 1, 1, 20]
    assert sum(len(g) for g in groups) == len(units)


def test_a_jpeg_declaring_too_many_pixels_is_refused_before_decoding():
    from tests.integration.test_bad_input import jpeg_bomb

    with pytest.raises(Undecodable, match="50000x50000 = 2,500,000,000 pixels"):
        decode_image(jpeg_bomb(), target=416, max_pixels=50_000_000)
