"""Inference backends behind one small interface, called from the detector's inference thread:

    backend.infer(batch: float32 NCHW) -> first model output, one row per image
    backend.name -> "onnxruntime:cpu", "onnxruntime:cuda:0", "tensorrt:cuda:0:fp16", ...

GPU code is imported lazily, so a machine without CUDA or TensorRT never loads it.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from services.detector.gpu_errors import EngineNotBuilt
from services.detector.model import ModelInfo
from services.detector.trt import TensorRTBackend, batch_profile, plan_engine  # tensorrt itself imports lazily
from services.runtime.config import DetectorConfig


class Backend(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    # optional: def close(self) -> None - free device memory (called when the GPU is dropped)


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OnnxRuntimeBackend:
    """onnxruntime with the given execution providers (TensorRT EP, CUDA EP, CPU).

    `gpu=True`: the session must run on one of GPU_PROVIDERS, whichever of those onnxruntime could
    load (it skips a listed provider it cannot load, with a warning); a session that ends up on the CPU
    is refused, so the fallback wrapper reports the GPU as failed instead of calling the CPU a GPU.
    `enable_fallback=0`: onnxruntime's Python wrapper would otherwise retry a failed session creation
    with a provider list of its own and no provider options (device_id dropped: the wrong GPU)."""

    def __init__(self, info: ModelInfo, cfg: DetectorConfig, providers: list, session=None, gpu: bool = False) -> None:
        import onnxruntime as ort

        if session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = cfg.threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(info.path), options, providers=providers, enable_fallback=0)
        used = session.get_providers()
        asked = [p[0] if isinstance(p, tuple) else p for p in providers]
        if gpu and used[0] not in GPU_PROVIDERS:
            raise RuntimeError(
                f"onnxruntime could load none of the GPU providers asked for ({', '.join(a for a in asked if a in GPU_PROVIDERS)}); "
                f"it runs {used}"
            )
        self.session = session
        self.info = info
        self.name = (
            "onnxruntime:cpu"
            if used[0] == "CPUExecutionProvider"
            else f"onnxruntime:{used[0].removesuffix('ExecutionProvider').lower()}:{cfg.device}"
        )

    def infer(self, batch: np.ndarray) -> np.ndarray:
        fixed = self.info.fixed_batch
        if fixed is None or len(batch) == fixed:
            return self.session.run(None, {self.info.input_name: batch})[0]
        # A fixed-batch export: run it `fixed` images at a time, padding the last run with copies.
        out = []
        for i in range(0, len(batch), fixed):
            chunk = batch[i : i + fixed]
            if len(chunk) < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - len(chunk), axis=0)])
            out.append(self.session.run(None, {self.info.input_name: chunk})[0][: min(fixed, len(batch) - i)])
        return np.concatenate(out)

    def close(self) -> None:
        self.session = None  # onnxruntime frees the session's device memory with the object


def cpu_backend(info: ModelInfo, cfg: DetectorConfig) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(info, cfg, ["CPUExecutionProvider"])


def tensorrt_library() -> str | None:
    """The TensorRT library (libnvinfer) if the dynamic loader can load it here, else None.

    onnxruntime lists its TensorRT EP whenever the wheel was built with it (onnxruntime-gpu always is),
    whether or not TensorRT is installed; only a library that loads makes the EP usable. pip's tensorrt
    wheels keep it in the `tensorrt_libs` package folder, outside the loader's path: loading it from
    there by full path makes the EP's own dlopen by soname find it (what onnxruntime.preload_dlls does).
    """
    folders = []
    spec = importlib.util.find_spec("tensorrt_libs")
    if spec is not None and spec.submodule_search_locations:
        folders = list(spec.submodule_search_locations)
    for soname in ("libnvinfer.so.10", "libnvinfer.so.11"):
        for candidate in [*(os.path.join(folder, soname) for folder in folders), soname]:
            try:
                ctypes.CDLL(candidate)
                return candidate
            except OSError:
                continue
    return None


def gpu_providers(
    cfg: DetectorConfig, info: ModelInfo, available: list[str], tensorrt_loads: bool, cache_dir: Path
) -> list:
    """The onnxruntime provider chain for the GPU: the TensorRT EP only where TensorRT loads, then CUDA.

    The TensorRT EP builds its engine at the first inference of a shape it has no engine for: its
    profile covers every batch the detector runs (1..batch_size, or the export's fixed batch), so it
    builds once, at the warm-up before READY (Engine.start_backend), and its engine and timing caches
    in the state directory make later starts load instead of build."""
    chain: list = []
    if "TensorrtExecutionProvider" in available and tensorrt_loads:
        caches = str(cache_dir / "onnxruntime-trt")
        lo, opt, hi = batch_profile(info.fixed_batch, cfg.batch_size)
        shape = f"3x{info.size}x{info.size}"
        chain.append(
            (
                "TensorrtExecutionProvider",
                {
                    "device_id": cfg.device,
                    "trt_fp16_enable": cfg.precision == "fp16",
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": caches,
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": caches,
                    "trt_profile_min_shapes": f"{info.input_name}:{lo}x{shape}",
                    "trt_profile_opt_shapes": f"{info.input_name}:{opt}x{shape}",
                    "trt_profile_max_shapes": f"{info.input_name}:{hi}x{shape}",
                },
            )
        )
    if "CUDAExecutionProvider" in available:
        chain.append(("CUDAExecutionProvider", {"device_id": cfg.device}))
    return chain


def cuda_backend(info: ModelInfo, cfg: DetectorConfig, cache_dir: Path, tensorrt_ep: bool = True) -> OnnxRuntimeBackend:
    """onnxruntime on the GPU: its TensorRT EP where TensorRT loads (and `tensorrt_ep`), else its CUDA EP."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chain = gpu_providers(cfg, info, available, tensorrt_ep and tensorrt_library() is not None, cache_dir)
    if not chain:
        raise RuntimeError(f"onnxruntime has no GPU execution provider here (available: {available})")
    (cache_dir / "onnxruntime-trt").mkdir(parents=True, exist_ok=True)
    return OnnxRuntimeBackend(info, cfg, [*chain, "CPUExecutionProvider"], gpu=True)


def tensorrt_backend(info: ModelInfo, cfg: DetectorConfig, cache_dir, initial: bool = True) -> Backend:
    return TensorRTBackend(info, cfg, cache_dir, initial=initial)


def plugin_class(spec: str):
    _, module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)


def plugin_backend(spec: str, info: ModelInfo, cfg: DetectorConfig) -> Backend:
    """`plugin:package.module:Class` - a backend class taking (info, cfg), e.g. for other accelerators."""
    return plugin_class(spec)(info, cfg)


@dataclass(frozen=True)
class BuildJob:
    """An engine to build before READY (services/detector/engine_build.py)."""

    command: list[str]
    what: str
    target: Path


def build_job(cfg: DetectorConfig, info: ModelInfo, cache_dir: Path) -> BuildJob | None:
    """The engine this config needs and the cache lacks, if any. A plugin class may offer one too, with
    a static `build_job(info, cfg, cache_dir)`."""
    if cfg.backend.startswith("plugin:"):
        make = getattr(plugin_class(cfg.backend), "build_job", None)
        return make(info, cfg, cache_dir) if make is not None else None
    if cfg.backend == "tensorrt" or (cfg.backend == "auto" and importlib.util.find_spec("tensorrt") is not None):
        plan = plan_engine(info, cfg, cache_dir)
        if not plan.path.exists():
            return BuildJob(plan.command(), f"TensorRT engine for {info.name} ({plan.precision})", plan.path)
    return None


def gpu_factory(cfg: DetectorConfig, info: ModelInfo, cache_dir) -> Callable[[bool], Backend] | None:
    """What to try on the accelerator for this config, or None for CPU only. The factory takes
    `initial`: True for the first try, before READY, where an engine may be built; False for the
    retries after a fallback, in the inference thread, where nothing may be built (no watchdog beats):
    onnxruntime's TensorRT EP is then left out, and a TensorRT engine that will not load is kept."""
    if cfg.backend == "cpu":
        return None
    if cfg.backend == "tensorrt":
        return lambda initial: tensorrt_backend(info, cfg, cache_dir, initial)
    if cfg.backend == "cuda":
        return lambda initial: cuda_backend(info, cfg, cache_dir, tensorrt_ep=initial)
    if cfg.backend.startswith("plugin:"):
        return lambda initial: plugin_backend(cfg.backend, info, cfg)
    # auto: a machine with no accelerator stack at all is a CPU machine, not a degraded GPU one
    if not gpu_stack_present():
        return None
    return lambda initial: _best_gpu(info, cfg, cache_dir, initial)


def gpu_stack_present() -> bool:
    import onnxruntime as ort

    return importlib.util.find_spec("tensorrt") is not None or "CUDAExecutionProvider" in ort.get_available_providers()


def _best_gpu(info: ModelInfo, cfg: DetectorConfig, cache_dir, initial: bool) -> Backend:
    errors = []
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            return tensorrt_backend(info, cfg, cache_dir, initial)
        except EngineNotBuilt:
            raise  # its build failed or timed out before READY: the CPU, not a build by onnxruntime's EP instead
        except Exception as exc:  # noqa: BLE001 - reported with the next candidate's error
            errors.append(f"tensorrt: {exc}")
    try:
        return cuda_backend(info, cfg, cache_dir, tensorrt_ep=initial)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"onnxruntime-gpu: {exc}")
    raise RuntimeError("; ".join(errors))
