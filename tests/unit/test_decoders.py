"""Output decoders of every model family, run through a real onnxruntime session on tiny ONNX models
built here with the `onnx` helper API, whose outputs are known constants."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from proto import Box
from services.detector import decoders
from services.detector.backends import OnnxRuntimeBackend
from services.detector.decoders import Letterboxed
from services.detector.model import inspect_model, parse_labels
from services.runtime.config import DetectorConfig

S = 64  # tiny square input


def constant_model(path, raw: np.ndarray, batch: int | str = "N", names: str | None = None):
    """A model whose output is `raw` (one image's output) for every image of the batch."""
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, S, S])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, *raw.shape])
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=1),  # (N,1,1,1)
        helper.make_node("Squeeze", ["m", "ax"], ["m3"]),  # (N,1,1)
        helper.make_node("Mul", ["m3", "zero"], ["z"]),
        helper.make_node("Add", ["z", "raw"], ["output"]),  # broadcast to (N, *raw.shape)
    ]
    inits = [
        numpy_helper.from_array(np.array([3], np.int64), "ax"),
        numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero"),
        numpy_helper.from_array(raw[None].astype(np.float32), "raw"),
    ]
    graph = helper.make_graph(nodes, "const", [inp], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    if names:
        helper.set_model_props(model, {"names": names})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def run_model(path, frames):
    cfg = DetectorConfig(threads=1)
    info = inspect_model(path, cfg)
    backend = OnnxRuntimeBackend(info, cfg, ["CPUExecutionProvider"])
    raw = backend.infer(decoders.to_tensor(frames, info.family))
    return info, [
        decoders.decode(r, info.family, info.size, f, 0.3, 0.45, info.labels) for r, f in zip(raw, frames, strict=False)
    ]


def frame_of(w, h, family):
    return decoders.letterbox(np.zeros((h, w, 3), np.uint8), S, family)


def yolox_raw(entries):
    """(anchor, cx, cy, w, h, class, score) in input pixels -> raw YOLOX output."""
    grid, stride = decoders.anchor_grid(S)
    raw = np.zeros((len(grid), 85), np.float32)
    for idx, cx, cy, w, h, cls, score in entries:
        s = stride[idx, 0]
        raw[idx, :4] = cx / s - grid[idx, 0], cy / s - grid[idx, 1], np.log(w / s), np.log(h / s)
        raw[idx, 4] = 1.0
        raw[idx, 5 + cls] = score
    return raw


def test_yolox_family_through_onnxruntime(tmp_path):
    """YOLOX raw grid output: decoded, NMS'd per class, mapped back through the top-left letterbox."""
    raw = yolox_raw(
        [
            (10, 20, 20, 16, 8, 0, 0.9),
            (11, 21, 20, 16, 8, 0, 0.8),
            (12, 20, 21, 16, 8, 15, 0.7),
            (40, 40, 40, 8, 8, 2, 0.1),
        ]
    )
    path = constant_model(tmp_path / "yolox.onnx", raw, batch=1)
    frames = [frame_of(128, 64, "yolox"), frame_of(64, 64, "yolox")]  # batch 2 on a batch-1 export: run one by one
    info, (boxes, same) = run_model(path, frames)
    assert info.family == "yolox" and info.fixed_batch == 1 and info.labels[0] == "person"
    assert [(b.label, b.score) for b in boxes] == [("person", pytest.approx(0.9)), ("cat", pytest.approx(0.7))]
    assert (boxes[0].x1, boxes[0].y1, boxes[0].x2, boxes[0].y2) == pytest.approx((24, 32, 56, 48), abs=0.2)  # ratio 0.5
    assert (same[0].x1, same[0].x2) == pytest.approx((12, 28), abs=0.2)


def test_yolov8_family_with_labels_from_metadata(tmp_path):
    """Ultralytics (4 + C, anchors) output, centred letterbox, class names from the model's metadata."""
    raw = np.zeros((4 + 3, 84), np.float32)  # 84 anchor points at input 64
    raw[:4, 5] = (32, 32, 20, 10)
    raw[4 + 2, 5] = 0.8  # class 2
    raw[:4, 6] = (33, 32, 20, 10)
    raw[4 + 2, 6] = 0.6  # overlaps: suppressed
    raw[:4, 7] = (10, 10, 4, 4)
    raw[4 + 0, 7] = 0.2  # below threshold
    path = constant_model(tmp_path / "v8.onnx", raw, names="{0: 'dog', 1: 'van', 2: 'parcel'}")
    info, (boxes,) = run_model(path, [frame_of(128, 64, "yolov8")])
    assert info.family == "yolov8" and info.fixed_batch is None and info.labels == ("dog", "van", "parcel")
    (box,) = boxes
    assert box.label == "parcel" and box.score == pytest.approx(0.8)
    # ratio 0.5, image centred vertically with 16 px padding: y = (27 - 16) / 0.5
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((44, 22, 84, 42), abs=0.2)


def test_end2end_family_needs_no_nms(tmp_path):
    """(N, 6) x1 y1 x2 y2 score class: boxes pass through as given (overlaps kept), low scores dropped."""
    raw = np.array([[10, 10, 30, 30, 0.9, 0], [11, 11, 31, 31, 0.85, 0], [0, 0, 5, 5, 0.1, 1]], np.float32)
    path = constant_model(tmp_path / "e2e.onnx", raw)
    info, (boxes,) = run_model(path, [frame_of(64, 64, "end2end")])
    assert info.family == "end2end"
    assert [(b.label, b.x1) for b in boxes] == [("person", 10), ("person", 11)]


def test_family_is_guessed_from_shape():
    assert decoders.guess_family((3549, 85), 416) == "yolox"
    assert decoders.guess_family((84, 8400), 640) == "yolov8"
    assert decoders.guess_family((300, 6), 640) == "end2end"
    with pytest.raises(ValueError):
        decoders.guess_family((1, 2, 3), 640)
    with pytest.raises(ValueError, match=r"detector\.family"):
        decoders.guess_family((10, 10), 640)


def test_labels_file_format():
    assert parse_labels("person\n\ncar\n") == ("person", "car")
    assert parse_labels("{1: 'b', 0: 'a'}") == ("a", "b")


def test_anchor_grid_matches_yolox_nano():
    grid, stride = decoders.anchor_grid(416)
    assert grid.shape == (3549, 2) and stride[0, 0] == 8 and stride[-1, 0] == 32


def test_letterbox_families():
    image = np.zeros((100, 200, 3), np.uint8)
    top_left = decoders.letterbox(image, 416, "yolox")
    centred = decoders.letterbox(image, 416, "yolov8")
    assert top_left.pad_y == 0 and centred.pad_y == (416 - 208) // 2
    assert top_left.pixels[415, 0, 0] == 114 and top_left.pixels[0, 0, 0] == 0
    assert decoders.to_tensor([centred], "yolov8").max() <= 1.0


def test_fixed_batch_export_is_padded(tmp_path):
    """A model exported with a fixed batch of 4, fed 3 frames: padded, and exactly 3 results come back."""
    raw = np.array([[10, 10, 30, 30, 0.9, 0]], np.float32)
    path = constant_model(tmp_path / "b4.onnx", raw, batch=4)
    info, results = run_model(path, [frame_of(64, 64, "end2end")] * 3)
    assert info.fixed_batch == 4 and len(results) == 3 and all(r[0].label == "person" for r in results)


def test_models_without_inference():
    """ "none" finds nothing; "synthetic" (benchmarks of grouping) finds one whole-frame person per frame."""
    from pathlib import Path

    from services.detector.engine import Engine
    from services.runtime.config import DetectorConfig

    frames = [Letterboxed(np.zeros((1, 1, 3), np.uint8), 1.0, 0, 0, 64, 48)] * 3
    none = Engine(DetectorConfig(model="none"), Path("/nonexistent"), lambda *_: None)
    assert none.run(frames) == [([], 0.0)] * 3 and none.model == "none"
    synthetic = Engine(DetectorConfig(model="synthetic"), Path("/nonexistent"), lambda *_: None)
    assert (
        synthetic.run(frames) == [([Box("person", 0.9, 0.0, 0.0, 64.0, 48.0)], 0.0)] * 3
        and synthetic.model == "synthetic"
    )
