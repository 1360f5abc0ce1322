"""YOLOX pre- and post-processing (pure numpy/OpenCV; unit-tested without a model).

Input: BGR image letterboxed into a square with pad 114, image at the top-left, float32 NCHW 0-255.
Output per anchor point: cx, cy, w, h (grid-relative), objectness, class scores (post-sigmoid).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from proto import Box

COCO_LABELS = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop "
    "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
    "teddy_bear hair_drier toothbrush"
).split()
COCO_LABELS = tuple(label.replace("_", " ") for label in COCO_LABELS)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Scale `image` to fit `size`x`size`, pad with 114 at the right/bottom; returns (CHW float32, ratio)."""
    h, w = image.shape[:2]
    ratio = min(size / h, size / w)
    nh, nw = max(1, int(round(h * ratio))), max(1, int(round(w * ratio)))
    padded = np.full((size, size, 3), 114, dtype=np.uint8)
    padded[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32), ratio


@functools.lru_cache(maxsize=4)
def anchor_grid(size: int, strides: tuple[int, ...] = (8, 16, 32)) -> tuple[np.ndarray, np.ndarray]:
    """Grid offsets (A, 2) and strides (A, 1) for every anchor point, in the model's output order."""
    grids, steps = [], []
    for stride in strides:
        n = size // stride
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack((xs, ys), axis=2).reshape(-1, 2))
        steps.append(np.full((n * n, 1), stride))
    return np.concatenate(grids).astype(np.float32), np.concatenate(steps).astype(np.float32)


def decode(
    raw: np.ndarray,
    size: int,
    ratio: float,
    image_w: int,
    image_h: int,
    score_threshold: float,
    iou_threshold: float,
    labels: tuple[str, ...] = COCO_LABELS,
) -> list[Box]:
    """Raw YOLOX output (A, 5 + classes) for one image -> boxes in source pixels after class-wise NMS."""
    grid, stride = anchor_grid(size)
    if raw.shape[0] != grid.shape[0]:
        raise ValueError(f"model output has {raw.shape[0]} anchors, expected {grid.shape[0]} for input {size}")
    scores = raw[:, 4:5] * raw[:, 5:]
    classes = scores.argmax(axis=1)
    confidence = scores[np.arange(len(scores)), classes]
    keep = confidence >= score_threshold
    if not keep.any():
        return []
    raw, classes, confidence = raw[keep], classes[keep], confidence[keep]
    centre = (raw[:, :2] + grid[keep]) * stride[keep]
    half = np.exp(raw[:, 2:4]) * stride[keep] / 2
    xyxy = np.concatenate((centre - half, centre + half), axis=1) / ratio
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, image_w)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, image_h)
    return nms(xyxy, confidence, classes, iou_threshold, labels)


def nms(xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, labels: tuple[str, ...]) -> list[Box]:
    """Class-aware non-maximum suppression (OpenCV's batched NMS), best score first."""
    xywh = np.concatenate((xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]), axis=1)
    idx = cv2.dnn.NMSBoxesBatched(xywh.tolist(), scores.tolist(), classes.tolist(), 0.0, iou_threshold)
    order = sorted(np.asarray(idx).reshape(-1).tolist(), key=lambda i: -scores[i])
    return [
        Box(
            label=labels[int(classes[i])] if int(classes[i]) < len(labels) else str(int(classes[i])),
            score=round(float(scores[i]), 4),
            x1=round(float(xyxy[i, 0]), 1),
            y1=round(float(xyxy[i, 1]), 1),
            x2=round(float(xyxy[i, 2]), 1),
            y2=round(float(xyxy[i, 3]), 1),
        )
        for i in order
    ]
