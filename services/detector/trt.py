"""TensorRT backend: build an engine from the ONNX model on the target GPU once, cache it, run it.

Imported only when the tensorrt backend is chosen. Not verified on a GPU in this repository's CI (no
GPU there, and TensorRT is not installable from PyPI on our build machines); the GPU-free parts -
cache key, batch profile, output shapes - are unit-tested in tests/unit/test_trt_logic.py.

The cache key covers everything that makes an engine invalid: model bytes, GPU name and compute
capability, TensorRT version, precision and batch profile. A stale engine is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from services.detector.model import ModelInfo
from services.runtime.config import DetectorConfig


def batch_profile(fixed_batch: int | None, max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch for the optimisation profile; a fixed-batch export allows only its own."""
    if fixed_batch is not None:
        return fixed_batch, fixed_batch, fixed_batch
    return 1, max(1, max_batch // 2), max_batch


def engine_cache_key(model_sha256: str, gpu_name: str, compute_capability: tuple[int, int], trt_version: str,
                     precision: str, profile: tuple[int, int, int], size: int) -> str:
    parts = [model_sha256, gpu_name, f"sm{compute_capability[0]}{compute_capability[1]}", trt_version, precision,
             "b{}-{}-{}".format(*profile), f"s{size}"]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def output_shape(engine_shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    """Resolve a dynamic (-1) batch dimension of an output binding for this batch."""
    if not engine_shape:
        raise ValueError("output has no dimensions")
    if any(d < 0 for d in engine_shape[1:]):
        raise ValueError(f"only the batch dimension may be dynamic, got {engine_shape}")
    return (batch if engine_shape[0] < 0 else engine_shape[0], *engine_shape[1:])


def _check(result):
    """cuda-python calls return (err, *values); raise on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


class TensorRTBackend:
    def __init__(self, info: ModelInfo, cfg: DetectorConfig, cache_dir: Path) -> None:
        import tensorrt as trt

        try:
            from cuda.bindings import runtime as cudart
        except ImportError:  # cuda-python < 12.6 layout
            from cuda import cudart

        self.trt, self.cudart, self.info = trt, cudart, info
        self.device = cfg.device
        _check(cudart.cudaSetDevice(cfg.device))
        props = _check(cudart.cudaGetDeviceProperties(cfg.device))
        gpu_name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        self.logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(self.logger)
        precision = "fp16" if cfg.precision == "fp16" and builder.platform_has_fast_fp16 else "fp32"
        self.profile = batch_profile(info.fixed_batch, cfg.batch_size)
        key = engine_cache_key(info.sha256, gpu_name, (props.major, props.minor), trt.__version__, precision, self.profile, info.size)
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / f"{info.path.stem}-{key}.engine"
        if not path.exists():
            self._build(builder, precision, path)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            path.unlink(missing_ok=True)  # corrupt cache entry: rebuilt on the next start
            raise RuntimeError(f"could not deserialize {path}")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.name = f"tensorrt:cuda:{cfg.device}:{precision}"

    def _build(self, builder, precision: str, path: Path) -> None:
        trt = self.trt
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(self.info.path.read_bytes()):
            raise RuntimeError("TensorRT could not parse the model: " + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        lo, opt, hi = self.profile
        s = self.info.size
        profile.set_shape(self.info.input_name, (lo, 3, s, s), (opt, 3, s, s), (hi, 3, s, s))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT engine build failed")
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two detectors may build at once
        tmp.write_bytes(bytes(serialized))
        os.replace(tmp, path)  # never leave a half-written engine to be loaded later

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self.cudart.cudaFree(ptr))
            ptr = _check(self.cudart.cudaMalloc(nbytes))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def infer(self, batch: np.ndarray) -> np.ndarray:
        # cudaSetDevice is per host thread, and inference runs in the detector's own thread.
        _check(self.cudart.cudaSetDevice(self.device))
        lo, _, hi = self.profile
        if len(batch) > hi:  # more than the profile allows: run in pieces the engine accepts
            return np.concatenate([self.infer(batch[i : i + hi]) for i in range(0, len(batch), hi)])
        if len(batch) < lo:  # a fixed-batch engine: pad with copies of the last frame, drop their rows
            pad = np.repeat(batch[-1:], lo - len(batch), axis=0)
            return self.infer(np.concatenate([batch, pad]))[: len(batch)]
        cudart, n = self.cudart, len(batch)
        batch = np.ascontiguousarray(batch, dtype=self.trt.nptype(self.engine.get_tensor_dtype(self.info.input_name)))
        self.context.set_input_shape(self.info.input_name, batch.shape)
        inp = self._buffer(self.info.input_name, batch.nbytes)
        self.context.set_tensor_address(self.info.input_name, inp)
        kind = cudart.cudaMemcpyKind
        _check(cudart.cudaMemcpyAsync(inp, batch.ctypes.data, batch.nbytes, kind.cudaMemcpyHostToDevice, self.stream))
        hosts = {}
        for name in self.outputs:
            shape = output_shape(tuple(self.context.get_tensor_shape(name)), n)
            host = np.empty(shape, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, self._buffer(name, host.nbytes))
            hosts[name] = host
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for name, host in hosts.items():
            _check(cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name][0], host.nbytes, kind.cudaMemcpyDeviceToHost, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return hosts[self.outputs[0]].astype(np.float32, copy=False)
