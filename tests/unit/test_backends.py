"""Choosing onnxruntime's GPU providers (issue 14), against the real onnxruntime of this machine
(the CPU wheel: it behaves as onnxruntime-gpu does where a provider cannot load - warns, skips it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.detector import backends
from services.detector.backends import OnnxRuntimeBackend, gpu_providers
from services.detector.model import inspect_model
from services.runtime.config import DetectorConfig
from tests.unit.test_decoders import constant_model

# what onnxruntime-gpu's get_available_providers() lists on every machine: what it was built with
GPU_WHEEL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def names(chain):
    return [p[0] for p in chain]


def test_the_tensorrt_ep_is_asked_for_only_where_tensorrt_loads(tmp_path, info):
    cfg = DetectorConfig(device=1, batch_size=8)
    assert names(gpu_providers(cfg, info, GPU_WHEEL, False, tmp_path)) == ["CUDAExecutionProvider"]
    chain = gpu_providers(cfg, info, GPU_WHEEL, True, tmp_path)
    assert names(chain) == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    trt, cuda = (options for _, options in chain)
    assert trt["device_id"] == cuda["device_id"] == 1
    # its engines and timing data in the state directory, or it rebuilds them at every start
    assert trt["trt_engine_cache_enable"] and trt["trt_timing_cache_enable"]
    assert Path(trt["trt_engine_cache_path"]) == Path(trt["trt_timing_cache_path"]) == tmp_path / "onnxruntime-trt"
    # one profile over every batch the detector runs: built once (at the warm-up), not per new shape
    assert (trt["trt_profile_min_shapes"], trt["trt_profile_opt_shapes"], trt["trt_profile_max_shapes"]) == (
        "images:1x3x64x64",
        "images:4x3x64x64",
        "images:8x3x64x64",
    )
    assert gpu_providers(cfg, info, ["CPUExecutionProvider"], True, tmp_path) == []


def test_tensorrt_library_is_not_found_here():
    assert backends.tensorrt_library() is None  # no libnvinfer on this machine: the EP would not load


@pytest.fixture
def info(tmp_path):
    path = constant_model(tmp_path / "m.onnx", np.array([[10, 10, 30, 30, 0.9, 0]], np.float32))
    return inspect_model(path, DetectorConfig(threads=1))


def test_a_gpu_session_that_lands_on_the_cpu_is_refused_with_what_ran(info):
    """The real onnxruntime, asked for providers it cannot load, warns and runs the CPU: for a GPU
    backend that must be an error (naming what ran), never a silent CPU backend called a GPU."""
    cfg = DetectorConfig(threads=1)
    chain = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    with pytest.raises(
        RuntimeError,
        match=r"could load none of the GPU providers asked for \(CUDAExecutionProvider\).*CPUExecutionProvider",
    ):
        OnnxRuntimeBackend(info, cfg, chain, gpu=True)
    assert OnnxRuntimeBackend(info, cfg, ["CPUExecutionProvider"]).name == "onnxruntime:cpu"


class Session:
    """What onnxruntime-gpu returns on a box without libnvinfer: it skipped TensorRT, runs CUDA."""

    def __init__(self, providers):
        self.providers = providers

    def get_providers(self):
        return self.providers


def test_the_gpu_provider_onnxruntime_chose_is_accepted_and_named(info):
    cfg = DetectorConfig(device=2)
    asked = [("TensorrtExecutionProvider", {}), ("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
    b = OnnxRuntimeBackend(
        info, cfg, asked, session=Session(["CUDAExecutionProvider", "CPUExecutionProvider"]), gpu=True
    )
    assert b.name == "onnxruntime:cuda:2"  # what STATUS and the heartbeat show
    b = OnnxRuntimeBackend(info, cfg, asked, session=Session(GPU_WHEEL), gpu=True)
    assert b.name == "onnxruntime:tensorrt:2"


def test_sessions_are_made_without_onnxruntimes_own_fallback(info, monkeypatch):
    """onnxruntime's Python wrapper retries a failed session with its own provider list and no options
    (device_id dropped) unless enable_fallback=0; a failure must reach the fallback wrapper instead."""
    import onnxruntime as ort

    seen = {}
    real = ort.InferenceSession

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    OnnxRuntimeBackend(info, DetectorConfig(threads=1), ["CPUExecutionProvider"])
    assert seen.get("enable_fallback") == 0
    session = real(str(info.path), providers=["CPUExecutionProvider"], enable_fallback=0)
    assert session._enable_fallback is False  # the real wrapper took it


def test_the_retry_path_builds_nothing(tmp_path, info, monkeypatch):
    """After a fallback the GPU is retried in the inference thread, without watchdog beats: there the
    factory leaves onnxruntime's TensorRT EP out (it would build), and in `auto` a TensorRT engine whose
    build failed before READY means the CPU, not an onnxruntime EP build instead."""
    from services.detector.gpu_errors import EngineNotBuilt

    asked = []
    monkeypatch.setattr(
        backends, "cuda_backend", lambda info, cfg, cache_dir, tensorrt_ep=True: asked.append(tensorrt_ep)
    )
    make = backends.gpu_factory(DetectorConfig(backend="cuda"), info, tmp_path)
    make(True), make(False)
    assert asked == [True, False]

    def no_engine(*args):
        raise EngineNotBuilt("engine build stopped after 1800 s")

    monkeypatch.setattr(backends, "tensorrt_backend", no_engine)
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object() if name == "tensorrt" else None)
    asked.clear()
    with pytest.raises(EngineNotBuilt):
        backends._best_gpu(info, DetectorConfig(), tmp_path, True)
    assert asked == []
