"""Model families: how to prepare an image for them and how to read their output (pure numpy/OpenCV).

| family  | models                         | input                                   | output per image            |
|---------|--------------------------------|-----------------------------------------|-----------------------------|
| yolox   | YOLOX (the default yolox-nano) | BGR 0-255, top-left letterbox, pad 114  | (A, 5 + C) raw grid offsets |
| yolov8  | YOLOv8 / YOLO11 (Ultralytics)  | RGB 0-1, centred letterbox, pad 114     | (4 + C, A) cx cy w h scores |
| end2end | YOLOv10 / YOLO26, NMS built in | RGB 0-1, centred letterbox, pad 114     | (N, 6) x1 y1 x2 y2 score cls|
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from proto import Box

Family = Literal["yolox", "yolov8", "end2end"]

COCO_LABELS = tuple(
    label.replace("_", " ")
    for label in [
        "person",
        "bicycle",
        "car",
        "motorcycle",
        "airplane",
        "bus",
        "train",
        "truck",
        "boat",
        "traffic_light",
        "fire_hydrant",
        "stop_sign",
        "parking_meter",
        "bench",
        "bird",
        "cat",
        "dog",
        "horse",
        "sheep",
        "cow",
        "elephant",
        "bear",
        "zebra",
        "giraffe",
        "backpack",
        "umbrella",
        "handbag",
        "tie",
        "suitcase",
        "frisbee",
        "skis",
        "snowboard",
        "sports_ball",
        "kite",
        "baseball_bat",
        "baseball_glove",
        "skateboard",
        "surfboard",
        "tennis_racket",
        "bottle",
        "wine_glass",
        "cup",
        "fork",
        "knife",
        "spoon",
        "bowl",
        "banana",
        "apple",
        "sandwich",
        "orange",
        "broccoli",
        "carrot",
        "hot_dog",
        "pizza",
        "donut",
        "cake",
        "chair",
        "couch",
        "potted_plant",
        "bed",
        "dining_table",
        "toilet",
        "tv",
        "laptop",
        "mouse",
        "remote",
        "keyboard",
        "cell_phone",
        "microwave",
        "oven",
        "toaster",
        "sink",
        "refrigerator",
        "book",
        "clock",
        "vase",
        "scissors",
        "teddy_bear",
        "hair_drier",
        "toothbrush",
    ]
)


@dataclass(frozen=True)
class Letterboxed:
    """A frame resized into the model's square input (uint8 HWC, kept small until the batch is built)."""

    pixels: np.ndarray
    ratio: float
    pad_x: float
    pad_y: float
    width: int  # of the source image
    height: int


def letterbox(image: np.ndarray, size: int, family: Family) -> Letterboxed:
    h, w = image.shape[:2]
    ratio = min(size / h, size / w)
    nh, nw = max(1, round(h * ratio)), max(1, round(w * ratio))
    canvas = np.full((size, size, 3), 114, dtype=np.uint8)
    if family == "yolox":  # top-left, as YOLOX was trained
        px = py = 0
    else:
        px, py = (size - nw) // 2, (size - nh) // 2
    interp = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
    canvas[py : py + nh, px : px + nw] = cv2.resize(image, (nw, nh), interpolation=interp)
    return Letterboxed(canvas, ratio, px, py, w, h)


def to_tensor(frames: list[Letterboxed], family: Family) -> np.ndarray:
    """Stack letterboxed frames into the NCHW float32 batch the family expects."""
    batch = np.stack([f.pixels for f in frames])
    if family == "yolox":
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
    rgb = batch[..., ::-1].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(rgb, dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=4)
def anchor_grid(size: int, strides: tuple[int, ...] = (8, 16, 32)) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX grid offsets (A, 2) and strides (A, 1) for every anchor point, in output order."""
    grids, steps = [], []
    for stride in strides:
        n = size // stride
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack((xs, ys), axis=2).reshape(-1, 2))
        steps.append(np.full((n * n, 1), stride))
    return np.concatenate(grids).astype(np.float32), np.concatenate(steps).astype(np.float32)


def guess_family(output_shape: tuple[int, ...], size: int) -> Family:
    """Tell the family from one image's output shape (batch dimension removed) and the input size.

    YOLOX and YOLOv8 both predict one row per anchor point of the stride 8/16/32 grids; YOLOX puts
    anchors first, Ultralytics last. Anything else with 6 columns is an end-to-end (NMS-free) model.
    """
    if len(output_shape) != 2:
        raise ValueError(f"unsupported model output shape {output_shape}")
    a, b = output_shape
    anchors = len(anchor_grid(size)[0])
    if a == anchors and b >= 6:
        return "yolox"
    if b == anchors and a >= 5:
        return "yolov8"
    if b == 6:
        return "end2end"
    raise ValueError(
        f"cannot tell the model family from output shape {output_shape} at input {size}; set detector.family"
    )


def decode(
    raw: np.ndarray,
    family: Family,
    size: int,
    frame: Letterboxed,
    score_threshold: float,
    iou_threshold: float,
    labels: tuple[str, ...] = COCO_LABELS,
) -> list[Box]:
    """One image's raw output -> boxes in source-image pixels, best first."""
    if family == "yolox":
        xyxy, scores, classes = _yolox(raw, size, score_threshold)
    elif family == "yolov8":
        xyxy, scores, classes = _yolov8(raw, score_threshold)
    else:
        keep = raw[:, 4] >= score_threshold
        xyxy, scores, classes = raw[keep, :4].astype(np.float32), raw[keep, 4], raw[keep, 5].astype(int)
    if len(scores) == 0:
        return []
    xyxy = xyxy.copy()
    xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - frame.pad_x) / frame.ratio).clip(0, frame.width)
    xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - frame.pad_y) / frame.ratio).clip(0, frame.height)
    order = range(len(scores)) if family == "end2end" else nms(xyxy, scores, classes, iou_threshold)
    return [
        Box(
            label=labels[int(classes[i])] if 0 <= int(classes[i]) < len(labels) else str(int(classes[i])),
            score=round(float(scores[i]), 4),
            x1=round(float(xyxy[i, 0]), 1),
            y1=round(float(xyxy[i, 1]), 1),
            x2=round(float(xyxy[i, 2]), 1),
            y2=round(float(xyxy[i, 3]), 1),
        )
        for i in sorted(order, key=lambda i: -scores[i])
    ]


def _yolox(raw: np.ndarray, size: int, threshold: float):
    grid, stride = anchor_grid(size)
    if raw.shape[0] != grid.shape[0]:
        raise ValueError(f"model output has {raw.shape[0]} anchors, expected {grid.shape[0]} for input {size}")
    scores = raw[:, 4:5] * raw[:, 5:]
    classes = scores.argmax(axis=1)
    confidence = scores[np.arange(len(scores)), classes]
    keep = confidence >= threshold
    centre = (raw[keep, :2] + grid[keep]) * stride[keep]
    half = np.exp(raw[keep, 2:4]) * stride[keep] / 2
    return np.concatenate((centre - half, centre + half), axis=1), confidence[keep], classes[keep]


def _yolov8(raw: np.ndarray, threshold: float):
    preds = raw.T  # (A, 4 + C)
    scores = preds[:, 4:]
    classes = scores.argmax(axis=1)
    confidence = scores[np.arange(len(scores)), classes]
    keep = confidence >= threshold
    cxcy, wh = preds[keep, :2], preds[keep, 2:4]
    return np.concatenate((cxcy - wh / 2, cxcy + wh / 2), axis=1), confidence[keep], classes[keep]


def nms(xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float) -> list[int]:
    """Class-aware non-maximum suppression (OpenCV's batched NMS); returns kept indices."""
    xywh = np.concatenate((xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]), axis=1)
    idx = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores.tolist(), classes.tolist(), 0.0, iou_threshold)
    return np.asarray(idx).reshape(-1).tolist()
