"""YOLOX pre/post-processing with synthetic tensors (no model needed)."""

import numpy as np
import pytest

from services.detector import yolox


def test_anchor_grid_matches_model_output():
    grid, stride = yolox.anchor_grid(416)
    assert grid.shape == (3549, 2) and stride.shape == (3549, 1)
    assert stride[0, 0] == 8 and stride[-1, 0] == 32
    assert tuple(grid[52]) == (0, 1)  # second row of the stride-8 grid


def test_letterbox_keeps_aspect_and_pads_114():
    image = np.zeros((100, 200, 3), np.uint8)
    blob, ratio = yolox.letterbox(image, 416)
    assert blob.shape == (3, 416, 416) and blob.dtype == np.float32
    assert ratio == pytest.approx(416 / 200)
    assert blob[0, 0, 0] == 0 and blob[0, 415, 0] == 114  # image top-left, padding below


def raw_with(anchors):
    """A raw output with given (anchor index, cx, cy, w, h, class, score) entries."""
    raw = np.zeros((3549, 85), np.float32)
    grid, stride = yolox.anchor_grid(416)
    for idx, cx, cy, w, h, cls, score in anchors:
        s = stride[idx, 0]
        raw[idx, 0] = cx / s - grid[idx, 0]
        raw[idx, 1] = cy / s - grid[idx, 1]
        raw[idx, 2] = np.log(w / s)
        raw[idx, 3] = np.log(h / s)
        raw[idx, 4] = 1.0
        raw[idx, 5 + cls] = score
    return raw


def test_decode_scales_back_to_source_pixels():
    raw = raw_with([(100, 100.0, 50.0, 40.0, 20.0, 0, 0.9)])
    (box,) = yolox.decode(raw, 416, ratio=0.5, image_w=832, image_h=832, score_threshold=0.3, iou_threshold=0.45)
    assert box.label == "person" and box.score == pytest.approx(0.9)
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((160, 80, 240, 120), abs=0.2)


def test_nms_suppresses_same_class_keeps_other_class():
    raw = raw_with([
        (100, 100, 100, 50, 50, 0, 0.9),
        (101, 102, 101, 50, 50, 0, 0.8),  # overlaps the first, same class: suppressed
        (102, 101, 100, 50, 50, 15, 0.7),  # overlaps, but a cat: kept
        (200, 300, 300, 30, 30, 0, 0.2),  # below threshold
    ])
    boxes = yolox.decode(raw, 416, 1.0, 416, 416, 0.3, 0.45)
    assert [(b.label, b.score) for b in boxes] == [("person", pytest.approx(0.9)), ("cat", pytest.approx(0.7))]


def test_boxes_are_clipped_to_image():
    raw = raw_with([(0, 2.0, 2.0, 40.0, 40.0, 2, 0.8)])
    (box,) = yolox.decode(raw, 416, 1.0, 416, 416, 0.3, 0.45)
    assert box.x1 == 0 and box.y1 == 0


def test_wrong_anchor_count_is_reported():
    with pytest.raises(ValueError, match="anchors"):
        yolox.decode(np.zeros((100, 85), np.float32), 416, 1.0, 10, 10, 0.3, 0.45)
