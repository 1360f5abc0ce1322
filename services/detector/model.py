"""What a model file is: its family, input size, batch dimension and labels, read once at start."""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.detector.catalog import CATALOG, model_file
from services.detector.decoders import COCO_LABELS, Family, guess_family
from services.runtime.config import ConfigError, DetectorConfig


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    family: Family
    input_name: str
    size: int  # square input side
    fixed_batch: int | None  # the model's batch dimension when it is not dynamic
    labels: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.path.stem}@{self.sha256[:12]}"


def find_model(cfg: DetectorConfig) -> Path:
    path = Path(cfg.models_dir) / model_file(cfg.model)
    if not path.is_file():
        how = f"run `vigil models pull {cfg.model}`" if cfg.model in CATALOG else f"put {path.name} there"
        raise ConfigError(
            f"config error: detector.model is {cfg.model!r} but {path} does not exist: {how} "
            f'(models dir: detector.models_dir / VIGIL_DETECTOR__MODELS_DIR), or set detector.model = "none"'
        )
    return path


def parse_labels(text: str) -> tuple[str, ...]:
    """Labels from model metadata (Ultralytics writes a dict literal) or a file with one per line."""
    text = text.strip()
    if text.startswith("{"):
        names = ast.literal_eval(text)
        return tuple(str(names[i]) for i in sorted(names))
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def inspect_model(path: Path, cfg: DetectorConfig, session=None) -> ModelInfo:
    """Read shapes and metadata with an onnxruntime CPU session (reused as the CPU backend)."""
    import onnxruntime as ort

    if session is None:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = inp.shape
    size = shape[2] if isinstance(shape[2], int) else 640
    fixed = shape[0] if isinstance(shape[0], int) else None
    out_shape = session.get_outputs()[0].shape[1:]
    if not all(isinstance(d, int) for d in out_shape):  # symbolic dims: run once to see the real shape
        dummy = np.zeros((1, 3, size, size), np.float32)
        out_shape = session.run(None, {inp.name: dummy})[0].shape[1:]
    family = guess_family(tuple(out_shape), size) if cfg.family == "auto" else cfg.family
    meta = session.get_modelmeta().custom_metadata_map
    if cfg.labels_file:
        labels = parse_labels(Path(cfg.labels_file).read_text())
    elif "names" in meta:
        labels = parse_labels(meta["names"])
    else:
        labels = COCO_LABELS
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return ModelInfo(path, sha, family, inp.name, size, fixed, labels)
