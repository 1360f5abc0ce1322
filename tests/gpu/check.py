"""GPU check, run in one short call on a lent GPU machine (never in CI):

    python -m tests.gpu.check --models-dir DIR [--out DIR]

Prints NVML readings (raw, and through gpu-stats' NVML and nvidia-smi readers), then images/s of YOLOX-Nano at batch 1, 8 and 32 on every backend that works
there: onnxruntime CUDA EP (carry the onnxruntime-gpu wheel), TensorRT through vigil's own backend
(if tensorrt imports), the fallback wrapper, and the CPU for comparison. Writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import numpy as np


def nvml() -> list[dict]:
    try:
        import pynvml
    except ImportError:
        return [{"error": "nvidia-ml-py not installed"}]
    pynvml.nvmlInit()
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        out.append({
            "index": i, "name": pynvml.nvmlDeviceGetName(h), "util": pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
            "mem_used_mb": mem.used // 2**20, "mem_total_mb": mem.total // 2**20,
            "temp_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
        })
    return out


def gpu_stats_readers() -> dict:
    """gpu-stats' own code paths (services/gpu_stats_readers.py): NVML and the nvidia-smi CSV fallback."""
    import socket

    import msgspec

    from services.gpu_stats_readers import NvmlReader, SmiReader

    out = {}
    for name, make in (("nvml", NvmlReader), ("nvidia-smi", lambda: SmiReader("nvidia-smi"))):
        try:
            out[name] = msgspec.to_builtins(make().read(socket.gethostname()))
        except Exception:  # noqa: BLE001 - report, keep measuring
            out[name] = {"error": traceback.format_exc(limit=3)}
    return out


def measure(backend, batch: int, size: int, seconds: float = 3.0) -> float:
    x = np.random.default_rng(0).uniform(0, 255, (batch, 3, size, size)).astype(np.float32)
    backend.infer(x)  # warm-up (engine build, CUDA context, autotuning)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        backend.infer(x)
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from services.detector import backends
    from services.detector.fallback import FallbackBackend
    from services.detector.model import find_model, inspect_model
    from services.runtime.config import DetectorConfig

    results: dict = {"nvml": nvml(), "gpu_stats": gpu_stats_readers(), "backends": {}}
    print("NVML:", json.dumps(results["nvml"], indent=1))
    cfg = DetectorConfig(models_dir=args.models_dir, batch_size=32, threads=8)
    info = inspect_model(find_model(cfg), cfg)
    candidates = {
        "cpu": lambda: backends.cpu_backend(info, cfg),
        "onnxruntime-cuda": lambda: backends.cuda_backend(info, cfg),
        "tensorrt": lambda: backends.tensorrt_backend(info, cfg, Path(args.out) / "engines"),
        "auto+fallback": lambda: FallbackBackend(backends.gpu_factory(DetectorConfig(models_dir=args.models_dir), info, Path(args.out) / "engines")
                                                 or (lambda: backends.cpu_backend(info, cfg)), lambda: backends.cpu_backend(info, cfg)),
    }
    for name, make in candidates.items():
        try:
            started = time.perf_counter()
            backend = make()
            init_s = time.perf_counter() - started
            rates = {b: round(measure(backend, b, info.size), 1) for b in (1, 8, 32)}
            results["backends"][name] = {"name": backend.name, "init_s": round(init_s, 2), "images_per_s": rates}
        except Exception as exc:  # noqa: BLE001 - a report, not a service
            results["backends"][name] = {"error": repr(exc), "trace": traceback.format_exc()[-1500:]}
        print(name, json.dumps(results["backends"][name]))
    Path(args.out, "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
