"""GPU check: one short run on a lent GPU machine (never in CI), figures for the issue note.

On the GPU machine, in a venv with the project installed (`pip install -e .`):

    pip uninstall -y onnxruntime          # the CPU wheel and onnxruntime-gpu install the same module:
    pip install onnxruntime_gpu-*.whl     # with both, whichever was installed last wins, silently
    pip install nvidia_ml_py-*.whl        # NVML readings (optional: the check says when it is missing)
    python -m tests.gpu.check --models-dir DIR --out DIR

What it records (printed, and results.json in --out):
- versions: NVIDIA driver and its CUDA, the CUDA runtime (cuda-python), cuDNN, onnxruntime and its
  providers, TensorRT (if it imports) and whether libnvinfer loads;
- NVML once, through gpu-stats' own readers (NVML and nvidia-smi);
- images/s per backend (CPU, onnxruntime CUDA EP, onnxruntime TensorRT EP where it loads, vigil's
  TensorRT backend where tensorrt imports) at batch 1 and at real batches, with NVML sampled in a thread
  meanwhile (utilisation, power, memory, and this process as gpu-stats maps it to its unit). A
  fixed-batch export is re-exported with a dynamic batch when that is possible; otherwise its batch
  figures are labelled "as N runs of batch 1", never passed off as real batches;
- the detector's own inference path (Engine.run: tensor, backend, box decoding) against the raw
  onnxruntime CUDA loop on the same frames: their ratio (goal: at least 0.85);
- the fallback path with the GPU made to fail (a sticky CUDA error after three batches): the CPU takes
  the batch, restart_reason is set.
Exit status: 0; 1 when a GPU is present but no GPU backend produced a figure; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import msgspec
import numpy as np

SECONDS = float(os.environ.get("VIGIL_CHECK_SECONDS", "3.0"))  # per measurement


def guarded(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a report: record the failure, go on measuring
        return {"error": traceback.format_exc(limit=3)[-1500:]}


# ---- what is installed ----------------------------------------------------------------------------
def versions() -> dict:
    out: dict = {"python": sys.version.split()[0], "host": socket.gethostname()}

    def ort():
        import onnxruntime

        return {
            "version": onnxruntime.__version__,
            "providers": onnxruntime.get_available_providers(),
            "device": onnxruntime.get_device(),
        }

    def nvml():
        import pynvml

        pynvml.nvmlInit()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        return {
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "driver_cuda": f"{cuda // 1000}.{cuda % 1000 // 10}",
            "gpus": pynvml.nvmlDeviceGetCount(),
        }

    def cuda_runtime():
        from services.detector.trt import check_driver
        from services.detector.trt import cuda_runtime as rt

        return {"cuda_python": check_driver(rt())}

    def cudnn():
        for name in ("libcudnn.so.9", "libcudnn.so.8", "libcudnn.so"):
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                continue
            lib.cudnnGetVersion.restype = ctypes.c_size_t
            return {"library": name, "version": lib.cudnnGetVersion()}
        return {"error": "no libcudnn on the loader path"}

    def tensorrt():
        from services.detector.backends import tensorrt_library

        found = {"libnvinfer": tensorrt_library()}
        try:
            import tensorrt as trt

            found["python"] = trt.__version__
        except ImportError as exc:
            found["python"] = f"not importable: {exc}"
        return found

    for key, fn in (
        ("onnxruntime", ort),
        ("nvml", nvml),
        ("cuda_runtime", cuda_runtime),
        ("cudnn", cudnn),
        ("tensorrt", tensorrt),
    ):
        out[key] = guarded(fn)
    return out


def gpu_present(vers: dict) -> bool:
    nvml = vers.get("nvml", {})
    return Path("/dev/nvidia0").exists() or (isinstance(nvml.get("gpus"), int) and nvml["gpus"] > 0)


def gpu_stats_readers() -> dict:
    """gpu-stats' own code paths (services/gpu_stats/readers.py): NVML and the nvidia-smi CSV fallback."""
    from services.gpu_stats.readers import NvmlReader, SmiReader

    return {
        name: guarded(lambda make=make: msgspec.to_builtins(make().read(socket.gethostname())))
        for name, make in (("nvml", NvmlReader), ("nvidia-smi", lambda: SmiReader("nvidia-smi")))
    }


class NvmlSampler:
    """NVML every 100 ms in a thread while a backend runs; summary() of what it saw."""

    def __init__(self) -> None:
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.error = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception as exc:  # noqa: BLE001
            self.nvml, self.error = None, repr(exc)
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def __enter__(self) -> NvmlSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(2)

    def loop(self) -> None:
        from services.gpu_stats.readers import unit_of

        n = self.nvml
        while n is not None and not self.stop.wait(0.1):
            try:
                h = n.nvmlDeviceGetHandleByIndex(int(os.environ.get("VIGIL_CHECK_GPU", "0")))
                mem = n.nvmlDeviceGetMemoryInfo(h)
                procs = []
                for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2"):
                    try:
                        procs = getattr(n, name)(h)
                        break
                    except Exception:  # noqa: BLE001 - NVMLLibraryMismatchError on older drivers: try _v2
                        continue
                self.samples.append(
                    {
                        "util": n.nvmlDeviceGetUtilizationRates(h).gpu,
                        "power_w": n.nvmlDeviceGetPowerUsage(h) / 1000,
                        "mem_mb": mem.used / 2**20,
                        "procs": {p.pid: (unit_of(p.pid), int((p.usedGpuMemory or 0) / 2**20)) for p in procs},
                    }
                )
            except Exception as exc:  # noqa: BLE001
                self.error = repr(exc)
                return

    def summary(self) -> dict:
        if not self.samples:
            return {"error": self.error or "no samples"}
        util = [s["util"] for s in self.samples]
        mine = [s["procs"][os.getpid()] for s in self.samples if os.getpid() in s["procs"]]
        return {
            "samples": len(util),
            "util_mean": round(sum(util) / len(util), 1),
            "util_max": max(util),
            "power_w_max": round(max(s["power_w"] for s in self.samples), 1),
            "mem_mb_max": round(max(s["mem_mb"] for s in self.samples)),
            "this_process": {
                "seen_in": len(mine),
                "unit": mine[-1][0] if mine else None,
                "mem_mb": mine[-1][1] if mine else None,
            },
        }


# ---- models and frames ----------------------------------------------------------------------------
def dynamic_batch(path: Path, out: Path) -> Path | None:
    """The model with its batch dimension made symbolic, if it then gives the same rows as batch 1."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return None
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(out))
    try:
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        shape = [d if isinstance(d, int) else 2 for d in session.get_inputs()[0].shape]
        x = np.random.default_rng(1).uniform(0, 255, shape).astype(np.float32)
        both = session.run(None, {name: x})[0]
        one = session.run(None, {name: x[1:2]})[0]
        return out if both.shape[0] == 2 and np.allclose(both[1], one[0], atol=1e-3) else None
    except Exception:  # noqa: BLE001 - reshapes with a fixed batch inside: not convertible
        return None


def frames(engine, n: int) -> list:
    """n letterboxed frames of real photos (scikit-image's, when installed), else of noise."""
    try:
        from services.detector.media import decode_image
        from tests.support import photo_bytes

        images = [
            decode_image(photo_bytes(name), engine.size)[0] for name in ("astronaut", "chelsea", "coffee", "camera")
        ]
    except Exception:  # noqa: BLE001
        images = [np.random.default_rng(i).integers(0, 255, (480, 640, 3), dtype=np.uint8) for i in range(4)]
    return [engine.prepare(images[i % len(images)]) for i in range(n)]


def rate(call, images: int, seconds: float = SECONDS) -> float:
    call()  # warm-up: CUDA context, autotuning, an engine build
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        n += images
    return round(n / (time.perf_counter() - start), 1)


# ---- the measurements ---------------------------------------------------------------------------
def measure_backend(make, tensors: dict[int, np.ndarray], fixed: int | None) -> dict:
    started = time.perf_counter()
    backend = make()
    out: dict = {"name": backend.name, "init_s": round(time.perf_counter() - started, 2), "images_per_s": {}}
    with NvmlSampler() as sampler:
        for batch, x in tensors.items():
            label = (
                str(batch)
                if fixed in (None, batch)
                else f"{batch} (as {batch // fixed} runs of batch {fixed}: fixed-batch export)"
            )
            out["images_per_s"][label] = rate(lambda x=x: backend.infer(x), batch)
    out["nvml"] = sampler.summary()
    getattr(backend, "close", lambda: None)()
    return out


def detector_path_vs_raw(engine_of, frames_of, batch: int) -> dict:
    """Engine.run (what the detector's inference thread does per batch) against session.run alone."""
    from services.detector import decoders

    engine = engine_of()
    fs = frames_of(engine, batch)
    x = decoders.to_tensor(fs, engine.info.family)
    gpu = getattr(engine.backend, "gpu", None)
    if gpu is None:
        raise RuntimeError(f"the detector's backend is not on the GPU: {engine.name}")
    session, name = gpu.session, engine.info.input_name
    raw = rate(lambda: session.run(None, {name: x}), batch)
    detector = rate(lambda: engine.run(fs), batch)
    return {
        "backend": engine.name,
        "batch": batch,
        "raw_session_images_per_s": raw,
        "engine_run_images_per_s": detector,
        "ratio": round(detector / raw, 3),
        "goal": 0.85,
    }


def fallback_path(info, cfg, engines: Path) -> dict:
    """The onnxruntime CUDA backend, made to fail with a sticky CUDA error after three batches."""
    from services.detector import backends
    from services.detector.fallback import FallbackBackend
    from tests.fake_accelerators import illegal_address

    class Failing:
        def __init__(self):
            self.inner, self.left = backends.cuda_backend(info, cfg, engines), 3
            self.name = self.inner.name

        def infer(self, batch):
            if self.left <= 0:
                raise illegal_address()
            self.left -= 1
            return self.inner.infer(batch)

    events: list = []
    fb = FallbackBackend(Failing, lambda: backends.cpu_backend(info, cfg), on_change=lambda s, r: events.append(s))
    x = np.zeros((1, 3, info.size, info.size), np.float32)
    names = []
    for _ in range(5):
        fb.infer(x)
        names.append(fb.name)
    return {"backends_per_batch": names, "events": events, "restart_reason": fb.restart_reason}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from services.detector import backends
    from services.detector.engine import Engine
    from services.detector.model import find_model, inspect_model
    from services.runtime.config import DetectorConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engines = out / "engines"
    results: dict = {"versions": versions()}
    results["gpu_present"] = gpu_present(results["versions"])
    print(json.dumps(results, indent=1), flush=True)
    results["gpu_stats"] = guarded(gpu_stats_readers)

    cfg = DetectorConfig(models_dir=args.models_dir, batch_size=32, threads=os.cpu_count() or 2)
    path = find_model(cfg)
    info = inspect_model(path, cfg)
    if info.fixed_batch is not None and (dyn := dynamic_batch(path, out / f"{path.stem}-dynamic.onnx")) is not None:
        info = inspect_model(dyn, cfg)
    results["model"] = {"file": info.path.name, "fixed_batch": info.fixed_batch, "size": info.size}
    rng = np.random.default_rng(0)
    tensors = {b: rng.uniform(0, 255, (b, 3, info.size, info.size)).astype(np.float32) for b in (1, 8, 32)}

    def trt_backend():
        from services.detector import trt

        plan = trt.plan_engine(info, cfg, engines)
        if not plan.path.exists():
            engines.mkdir(parents=True, exist_ok=True)
            trt.build(plan)  # in-process here: this is a measurement, not the service
        return trt.TensorRTBackend(info, cfg, engines, plan)

    candidates = {
        "cpu": lambda: backends.cpu_backend(info, cfg),
        "onnxruntime-gpu": lambda: backends.cuda_backend(info, cfg, engines),
        "onnxruntime-cuda-ep": lambda: backends.OnnxRuntimeBackend(
            info, cfg, [("CUDAExecutionProvider", {"device_id": cfg.device}), "CPUExecutionProvider"], gpu=True
        ),
        "tensorrt": trt_backend,
    }
    results["backends"] = {}
    for name, make in candidates.items():
        results["backends"][name] = guarded(lambda make=make: measure_backend(make, tensors, info.fixed_batch))
        print(name, json.dumps(results["backends"][name]), flush=True)

    dcfg = DetectorConfig(
        models_dir=str(info.path.parent), model=info.path.name, backend="cuda", batch_size=8, threads=cfg.threads
    )
    results["detector_vs_raw"] = {
        str(b): guarded(
            lambda b=b: detector_path_vs_raw(
                lambda: Engine(msgspec.structs.replace(dcfg, batch_size=b), engines, lambda *a: None), frames, b
            )
        )
        for b in (1, 8)
    }
    print("detector vs raw", json.dumps(results["detector_vs_raw"]), flush=True)
    results["fallback"] = guarded(lambda: fallback_path(info, cfg, engines))
    print("fallback", json.dumps(results["fallback"]), flush=True)

    gpu_figures = [n for n, r in results["backends"].items() if n != "cpu" and "images_per_s" in r]
    results["gpu_backends_with_figures"] = gpu_figures
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if results["gpu_present"] and not gpu_figures:
        print("a GPU is present but no GPU backend produced a figure (see the errors above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
