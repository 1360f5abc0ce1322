"""The detector's model and the backend that runs it: inference in chunks of batch_size, boxes decoded
and filtered per camera. No bus here: the service (service.py) feeds it frames."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from proto import Box
from services.detector import decoders
from services.detector.backends import Backend, BuildJob, OnnxRuntimeBackend, build_job, gpu_factory
from services.detector.decoders import Letterboxed
from services.detector.fallback import FallbackBackend
from services.detector.gpu_errors import EngineNotBuilt
from services.detector.model import ModelInfo, find_model, inspect_model
from services.detector.trt import batch_profile
from services.runtime.config import DetectorConfig

# Models that run no inference: "none" finds nothing, "synthetic" finds one whole-frame person in every
# frame. Both measure the pipeline's own cost; "synthetic" also exercises grouping and alerts.
NO_MODEL = ("none", "synthetic")


class StickyRestarts:
    """When this detector last exited for a fresh CUDA context (a file of timestamps in its state
    directory). A GPU that poisons its context again and again would otherwise restart the unit until
    systemd's start limit leaves it failed, detecting nothing: past `limit` such exits in `window`
    seconds, the GPU stays off (at start and at every retry: the CPU, degraded, saying why) until the
    window has passed."""

    def __init__(self, path: Path, limit: int = 3, window: float = 3600.0) -> None:
        self.path, self.limit, self.window = path, limit, window

    def recent(self, now: float | None = None) -> list[float]:
        now = time.time() if now is None else now
        try:
            stamps = [float(x) for x in self.path.read_text().split()]
        except (OSError, ValueError):
            return []
        return [t for t in stamps if now - self.window <= t <= now]

    def record(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with contextlib.suppress(OSError):  # a full or read-only disk: the restart still happens
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(" ".join(str(t) for t in [*self.recent(now), now][-self.limit :]) + "\n")

    def refusal(self, now: float | None = None) -> str | None:
        recent = self.recent(now)
        if len(recent) < self.limit:
            return None
        return (
            f"{len(recent)} sticky CUDA errors within {self.window / 3600:g} h: the GPU stays off until "
            f"{time.strftime('%H:%M', time.localtime(min(recent) + self.window))} (or {self.path} is removed)"
        )


class Engine:
    """The model plus the backend that runs it (or nothing, for models "none" and "synthetic").

    `start=False` opens only the model and its CPU session; the detector then builds whatever engine
    the accelerator lacks (build_job) before READY and opens the backends with start_backend()."""

    def __init__(self, cfg: DetectorConfig, cache_dir: Path, on_change, start: bool = True) -> None:
        self.cfg, self.cache_dir, self.on_change = cfg, cache_dir, on_change
        self.info: ModelInfo | None = None
        self.backend: Backend | None = None
        self.make_gpu = None
        self.sticky = StickyRestarts(cache_dir / "sticky-cuda-errors")
        if cfg.model in NO_MODEL:
            return
        path = find_model(cfg)  # refuses to start without a model, naming the fix
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = cfg.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.info = info = inspect_model(path, cfg, session)
        self.make_cpu = lambda: OnnxRuntimeBackend(info, cfg, ["CPUExecutionProvider"], session=session)
        self.make_gpu = gpu_factory(cfg, info, cache_dir)
        self.sticky = StickyRestarts(cache_dir / "sticky-cuda-errors")
        if start:
            self.start_backend()

    def build_job(self) -> BuildJob | None:
        """The accelerator engine to build before READY, if the cache lacks it. Any error here (no
        driver, no GPU) is left to start_backend, whose failure is what gets reported."""
        if self.make_gpu is None or self.info is None:
            return None
        try:
            return build_job(self.cfg, self.info, self.cache_dir)
        except Exception:  # noqa: BLE001 - see above
            return None

    def start_backend(self, build_failure: str | None = None) -> None:
        """Open the backend: the CPU, or the GPU wrapped in the CPU fallback, warmed up at the largest
        batch (so whatever an execution provider builds lazily is built now, before READY). Never builds
        a TensorRT engine itself, and a GPU that hit sticky CUDA errors again and again stays off."""
        if self.backend is not None or self.info is None:
            return
        if self.make_gpu is None:
            self.backend = self.make_cpu()
            return
        inner, first = self.make_gpu, [True]

        def make_gpu():
            initial, first[0] = first[0], False
            refused = self.sticky.refusal()  # asked at every try: the GPU comes back once the window has passed
            if refused is not None:
                raise RuntimeError(refused)
            try:
                return inner(initial)
            except EngineNotBuilt as exc:  # say why the engine is missing, not only that it is
                raise EngineNotBuilt(build_failure or str(exc)) from exc

        self.backend = backend = FallbackBackend(
            make_gpu,
            self.make_cpu,
            max_errors=self.cfg.gpu_max_errors,
            retry=self.cfg.gpu_retry_seconds,
            retry_max=self.cfg.gpu_retry_max_seconds,
            on_change=self.on_change,
        )
        if not backend.degraded:
            hi = batch_profile(self.info.fixed_batch, self.cfg.batch_size)[2]
            backend.infer(np.zeros((hi, 3, self.info.size, self.info.size), np.float32))

    @property
    def restart_reason(self) -> str | None:
        """Set after a sticky CUDA error: only a new process can use the GPU again."""
        return getattr(self.backend, "restart_reason", None)

    @property
    def name(self) -> str:
        return self.backend.name if self.backend else "none"

    @property
    def model(self) -> str:
        return self.info.name if self.info else self.cfg.model

    @property
    def size(self) -> int:
        return self.info.size if self.info else 0

    def prepare(self, image) -> Letterboxed:
        if self.info is None:
            return Letterboxed(image[:1, :1], 1.0, 0, 0, image.shape[1], image.shape[0])
        return decoders.letterbox(image, self.info.size, self.info.family)

    def run(self, frames: list[Letterboxed], progress=lambda: None) -> list[tuple[list[Box], float]]:
        """Inference thread: boxes and per-frame milliseconds, in chunks of batch_size; `progress` is
        called after each chunk, so a long clip batch keeps the watchdog fed while a hang does not."""
        if self.backend is None or self.info is None:
            if self.cfg.model == "synthetic":  # one whole-frame person per frame: events without a model's cost
                return [([Box("person", 0.9, 0.0, 0.0, float(f.width), float(f.height))], 0.0) for f in frames]
            return [([], 0.0)] * len(frames)
        info, out = self.info, []
        for i in range(0, len(frames), self.cfg.batch_size):
            chunk = frames[i : i + self.cfg.batch_size]
            started = time.perf_counter()
            raw = self.backend.infer(decoders.to_tensor(chunk, info.family))
            ms = (time.perf_counter() - started) * 1000 / len(chunk)
            for frame, row in zip(chunk, raw, strict=False):
                boxes = decoders.decode(
                    row, info.family, info.size, frame, self.cfg.score_threshold, self.cfg.nms_iou, info.labels
                )
                out.append((boxes, ms))
            progress()
        return out


def keep_for_camera(boxes: list[Box], camera: str, cfg: DetectorConfig) -> list[Box]:
    """Per-camera label list and minimum score per label."""
    rule = cfg.cameras.get(camera)
    if rule is None:
        return boxes
    return [
        b
        for b in boxes
        if (rule.labels is None or b.label in rule.labels)
        and b.score >= rule.min_score.get(b.label, cfg.score_threshold)
    ]
