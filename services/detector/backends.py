"""Inference backends behind one small interface, called from the detector's inference thread:

    backend.infer(batch: float32 NCHW) -> first model output, one row per image
    backend.name -> "onnxruntime:cpu", "onnxruntime:cuda:0", "tensorrt:cuda:0:fp16", ...

GPU code is imported lazily, so a machine without CUDA or TensorRT never loads it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Protocol

import numpy as np

from services.detector.model import ModelInfo
from services.runtime.config import DetectorConfig


class Backend(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


class OnnxRuntimeBackend:
    """onnxruntime with the given execution providers (TensorRT EP, CUDA EP, CPU)."""

    def __init__(self, info: ModelInfo, cfg: DetectorConfig, providers: list, session=None) -> None:
        import onnxruntime as ort

        if session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = cfg.threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(info.path), options, providers=providers)
        used = session.get_providers()
        wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if wanted != "CPUExecutionProvider" and used[0] != wanted:
            raise RuntimeError(f"{wanted} requested but onnxruntime chose {used}")
        self.session = session
        self.info = info
        self.name = "onnxruntime:cpu" if used[0] == "CPUExecutionProvider" else f"onnxruntime:{used[0].removesuffix('ExecutionProvider').lower()}:{cfg.device}"

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


def cpu_backend(info: ModelInfo, cfg: DetectorConfig) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(info, cfg, ["CPUExecutionProvider"])


def cuda_backend(info: ModelInfo, cfg: DetectorConfig) -> OnnxRuntimeBackend:
    """onnxruntime on the GPU: its TensorRT EP when present, else its CUDA EP."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chain: list = []
    if "TensorrtExecutionProvider" in available:
        chain.append(("TensorrtExecutionProvider", {"device_id": cfg.device, "trt_fp16_enable": cfg.precision == "fp16"}))
    if "CUDAExecutionProvider" in available:
        chain.append(("CUDAExecutionProvider", {"device_id": cfg.device}))
    if not chain:
        raise RuntimeError(f"onnxruntime has no GPU execution provider here (available: {available})")
    return OnnxRuntimeBackend(info, cfg, chain + ["CPUExecutionProvider"])


def tensorrt_backend(info: ModelInfo, cfg: DetectorConfig, cache_dir) -> Backend:
    from services.detector.trt import TensorRTBackend  # lazy: imports tensorrt and cuda-python

    return TensorRTBackend(info, cfg, cache_dir)


def plugin_backend(spec: str, info: ModelInfo, cfg: DetectorConfig) -> Backend:
    """`plugin:package.module:Class` - a backend class taking (info, cfg), e.g. for other accelerators."""
    _, module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)(info, cfg)


def gpu_factory(cfg: DetectorConfig, info: ModelInfo, cache_dir) -> Callable[[], Backend] | None:
    """What to try on the accelerator for this config, or None for CPU only."""
    if cfg.backend == "cpu":
        return None
    if cfg.backend == "tensorrt":
        return lambda: tensorrt_backend(info, cfg, cache_dir)
    if cfg.backend == "cuda":
        return lambda: cuda_backend(info, cfg)
    if cfg.backend.startswith("plugin:"):
        return lambda: plugin_backend(cfg.backend, info, cfg)
    # auto: a machine with no accelerator stack at all is a CPU machine, not a degraded GPU one
    if not gpu_stack_present():
        return None
    return lambda: _best_gpu(info, cfg, cache_dir)


def gpu_stack_present() -> bool:
    import onnxruntime as ort

    return importlib.util.find_spec("tensorrt") is not None or "CUDAExecutionProvider" in ort.get_available_providers()


def _best_gpu(info: ModelInfo, cfg: DetectorConfig, cache_dir) -> Backend:
    errors = []
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            return tensorrt_backend(info, cfg, cache_dir)
        except Exception as exc:  # noqa: BLE001 - reported with the next candidate's error
            errors.append(f"tensorrt: {exc}")
    try:
        return cuda_backend(info, cfg)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"onnxruntime-gpu: {exc}")
    raise RuntimeError("; ".join(errors))
