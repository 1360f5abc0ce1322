"""Inference backends behind one small interface: `detect(image) -> list[Box]`, called from a worker thread."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from proto import Box
from services.detector import yolox
from services.runtime.config import ConfigError, DetectorConfig

YOLOX_NANO = "yolox_nano.onnx"


class Backend(Protocol):
    name: str
    model: str

    def detect(self, image: np.ndarray) -> list[Box]: ...


class NoneBackend:
    """No inference: every file gets zero boxes. For measuring the pipeline's own overhead."""

    name = "none"
    model = "none"

    def detect(self, image: np.ndarray) -> list[Box]:
        return []


class OnnxYolox:
    """YOLOX-Nano on ONNX Runtime's CPU provider."""

    name = "onnxruntime-cpu"

    def __init__(self, model_path: Path, cfg: DetectorConfig) -> None:
        import onnxruntime as ort  # lazy: the `none` model needs no runtime

        options = ort.SessionOptions()
        options.intra_op_num_threads = cfg.threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = int(inp.shape[2]) if isinstance(inp.shape[2], int) else 416
        self.cfg = cfg
        self.model = f"yolox-nano@{hashlib.sha256(model_path.read_bytes()).hexdigest()[:12]}"

    def detect(self, image: np.ndarray) -> list[Box]:
        blob, ratio = yolox.letterbox(image, self.size)
        (raw,) = self.session.run(None, {self.input_name: blob[None]})
        h, w = image.shape[:2]
        return yolox.decode(raw[0], self.size, ratio, w, h, self.cfg.score_threshold, self.cfg.nms_iou)


def load_backend(cfg: DetectorConfig) -> Backend:
    """Build the configured backend, or stop the service at start with a message that says what to do."""
    if cfg.model == "none":
        return NoneBackend()
    model_path = Path(cfg.models_dir) / YOLOX_NANO
    if not model_path.is_file():
        raise ConfigError(
            f"config error: detector.model is {cfg.model!r} but {model_path} does not exist. "
            f"Put {YOLOX_NANO} into detector.models_dir (VIGIL_DETECTOR__MODELS_DIR), "
            f"or set detector.model = \"none\" to run without inference"
        )
    return OnnxYolox(model_path, cfg)
