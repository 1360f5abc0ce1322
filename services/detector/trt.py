"""TensorRT backend: an engine built once per model and GPU (at start, in a child process), cached, run.

Imported by the detector only when a TensorRT backend is chosen; the rules here (cache key, batch
profile, precision, driver check, output shapes) need no GPU and are unit-tested in
tests/unit/test_trt_logic.py. Not yet run on a GPU in this repository (README: what was verified where).

- **Versions.** TensorRT 10 and 11 (`SUPPORTED_TRT`). TensorRT 11 removed `BuilderFlag.FP16` and
  `Builder.platform_has_fast_fp16`: its networks are strongly typed, so an engine runs at the
  precision the ONNX file was exported in ("as-exported"). On 10, fp16 is a builder flag, used when the
  GPU has fast fp16 (compute capability 5.3 and up). No `Builder` is made unless an engine is built.
- **Builds** run in a child process (`python -m services.detector.trt PLAN_JSON`), started by the
  detector before READY (services/detector/engine_build.py): the event loop stays free to extend
  systemd's start timeout and to take SIGTERM, a stuck or crashing builder cannot take the detector
  with it, and the retry path never builds (a missing engine is `EngineNotBuilt`). The child writes
  `<engine>.<pid>.tmp`, then renames it: a half-written engine is never loaded. A timing cache per GPU
  and TensorRT version makes the next build (another model, another batch profile) fast.
- **Memory.** Device buffers grow on demand and host buffers are pinned (`cudaMallocHost`), so copies
  are real DMA; `close()` frees all of them (the fallback wrapper calls it when it drops the GPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from services.detector.gpu_errors import CudaError, EngineNotBuilt
from services.detector.model import ModelInfo
from services.runtime.config import DetectorConfig

SUPPORTED_TRT = (10, 11)  # the majors this code was written against (pyproject's gpu extra pins them)
WORKSPACE_BYTES = 1 << 30


class DriverMismatch(RuntimeError):
    """The NVIDIA driver cannot run the CUDA runtime that cuda-python links statically."""


def batch_profile(fixed_batch: int | None, max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch for the optimisation profile; a fixed-batch export allows only its own."""
    if fixed_batch is not None:
        return fixed_batch, fixed_batch, fixed_batch
    return 1, max(1, max_batch // 2), max_batch


def engine_cache_key(
    model_sha256: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    trt_version: str,
    precision: str,
    profile: tuple[int, int, int],
    size: int,
) -> str:
    parts = [
        model_sha256,
        gpu_name,
        f"sm{compute_capability[0]}{compute_capability[1]}",
        trt_version,
        precision,
        "b{}-{}-{}".format(*profile),
        f"s{size}",
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def precision_plan(requested: str, has_fp16_flag: bool, compute_capability: tuple[int, int]) -> str:
    """ "fp16" or "fp32" on TensorRT 10 (weakly typed: fp16 is a builder flag); "as-exported" where the
    flag is gone (TensorRT 11: strongly typed networks run at the ONNX file's own precision)."""
    if not has_fp16_flag:
        return "as-exported"
    return "fp16" if requested == "fp16" and compute_capability >= (5, 3) else "fp32"


def output_shape(engine_shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    """Resolve a dynamic (-1) batch dimension of an output binding for this batch."""
    if not engine_shape:
        raise ValueError("output has no dimensions")
    if any(d < 0 for d in engine_shape[1:]):
        raise ValueError(f"only the batch dimension may be dynamic, got {engine_shape}")
    return (batch if engine_shape[0] < 0 else engine_shape[0], *engine_shape[1:])


# ---- CUDA runtime (cuda-python) ---------------------------------------------------------------
def cuda_runtime():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:  # cuda-python < 12.6 layout
        from cuda import cudart  # type: ignore[no-redef]
    return cudart


def check(cudart, result, call: str = ""):
    """cuda-python calls return (err, *values) instead of raising: raise CudaError on an error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    code = int(err)
    if code != 0:
        text = ""
        with contextlib.suppress(Exception):
            text = cudart.cudaGetErrorString(err)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
        raise CudaError(code, getattr(err, "name", f"cudaError {code}"), text, call)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _cuda(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def check_driver(cudart) -> str:
    """Refuse, with the fix, a driver older than cuda-python's statically linked runtime (cuda-python
    13 on a CUDA 12 driver returns cudaErrorInsufficientDriver from every call). Minor versions are
    compatible within a major; majors are not."""
    driver = check(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
    runtime = check(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    if not driver:
        raise DriverMismatch(
            'no NVIDIA driver is loaded (libcuda.so.1 not found): install the driver, or set detector.backend = "cpu"'
        )
    if driver // 1000 < runtime // 1000:
        major = driver // 1000
        raise DriverMismatch(
            f"the NVIDIA driver supports CUDA {_cuda(driver)}, but cuda-python's runtime is CUDA {_cuda(runtime)} and needs a "
            f"CUDA {runtime // 1000} driver: install cuda-python {major}.x (pip install 'cuda-python>={major},<{major + 1}') or a newer driver"
        )
    return f"driver CUDA {_cuda(driver)}, runtime CUDA {_cuda(runtime)}"


# ---- the engine plan and its build ------------------------------------------------------------
@dataclass(frozen=True)
class EnginePlan:
    """Everything an engine build needs, and where its result lives (JSON to the build process)."""

    onnx: str
    input_name: str
    size: int
    profile: tuple[int, int, int]
    precision: str
    device: int
    trt_version: str
    engine: str  # the cached engine's path
    timing_cache: str

    @property
    def path(self) -> Path:
        return Path(self.engine)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "services.detector.trt", json.dumps(asdict(self))]


def plan_engine(info: ModelInfo, cfg: DetectorConfig, cache_dir: Path) -> EnginePlan:
    """Which engine this model needs on this GPU (no Builder, nothing built)."""
    import tensorrt as trt

    major = int(trt.__version__.split(".")[0])
    if major not in SUPPORTED_TRT:
        raise RuntimeError(
            f"TensorRT {trt.__version__} is not supported (supported: {', '.join(map(str, SUPPORTED_TRT))}.x)"
        )
    cudart = cuda_runtime()
    check_driver(cudart)
    check(cudart, cudart.cudaSetDevice(cfg.device), "cudaSetDevice")
    props = check(cudart, cudart.cudaGetDeviceProperties(cfg.device), "cudaGetDeviceProperties")
    gpu_name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    cc = (int(props.major), int(props.minor))
    precision = precision_plan(cfg.precision, hasattr(trt.BuilderFlag, "FP16"), cc)
    profile = batch_profile(info.fixed_batch, cfg.batch_size)
    key = engine_cache_key(info.sha256, gpu_name, cc, trt.__version__, precision, profile, info.size)
    gpu_key = hashlib.sha256(f"{gpu_name}\0{cc}\0{trt.__version__}".encode()).hexdigest()[:16]
    return EnginePlan(
        onnx=str(info.path),
        input_name=info.input_name,
        size=info.size,
        profile=profile,
        precision=precision,
        device=cfg.device,
        trt_version=trt.__version__,
        engine=str(cache_dir / f"{info.path.stem}-{key}.engine"),
        timing_cache=str(cache_dir / f"timing-{gpu_key}.cache"),
    )


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two detectors may build at once
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build(plan: EnginePlan) -> None:
    """The build process: parse, build, write the engine and the updated timing cache."""
    import tensorrt as trt

    cudart = cuda_runtime()
    check(cudart, cudart.cudaSetDevice(plan.device), "cudaSetDevice")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.precision == "as-exported" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(plan.onnx).read_bytes()):
        raise RuntimeError(
            "TensorRT could not parse the model: "
            + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if plan.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    timing_path = Path(plan.timing_cache)
    try:
        cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
    except Exception:  # noqa: BLE001 - a corrupt or foreign cache only costs time: start empty
        cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    lo, opt, hi = plan.profile
    s = plan.size
    profile.set_shape(plan.input_name, (lo, 3, s, s), (opt, 3, s, s), (hi, 3, s, s))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the messages above)")
    _write_atomically(plan.path, bytes(serialized))
    with contextlib.suppress(Exception):  # the engine is what matters; a cache not saved costs time only
        _write_atomically(timing_path, bytes(config.get_timing_cache().serialize()))


def main(argv: list[str]) -> int:
    fields = json.loads(argv[0])
    plan = EnginePlan(**{**fields, "profile": tuple(fields["profile"])})
    print(
        f"building TensorRT engine {plan.path.name} ({plan.precision}, batch {plan.profile}) from {plan.onnx}",
        file=sys.stderr,
        flush=True,
    )
    build(plan)
    return 0


# ---- the backend ------------------------------------------------------------------------------
class TensorRTBackend:
    def __init__(
        self,
        info: ModelInfo,
        cfg: DetectorConfig,
        cache_dir: Path,
        plan: EnginePlan | None = None,
        initial: bool = True,
    ) -> None:
        import tensorrt as trt

        self.trt, self.cudart, self.info, self.device = trt, cuda_runtime(), info, cfg.device
        self.buffers: dict[str, tuple[int, int]] = {}  # tensor -> (device pointer, bytes)
        self.hosts: dict[str, tuple[int, int]] = {}  # tensor -> (pinned host pointer, bytes)
        self.stream = None
        self.engine = self.context = None
        self.plan = plan or plan_engine(info, cfg, cache_dir)
        path = self.plan.path
        if not path.exists():
            raise EngineNotBuilt(
                f"no TensorRT engine {path.name} in {path.parent} (engines are built at start: restart the detector)"
            )
        self.profile = self.plan.profile
        try:
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                # at start: set it aside (not deleted: kept to look at), so the next start builds it again;
                # on a retry it stays: a busy or poisoned GPU also fails to deserialize a good engine
                if initial:
                    path.rename(path.with_name(f"{path.name}.bad-{int(time.time())}"))
                raise EngineNotBuilt(
                    f"could not deserialize {path}" + (" (set aside; rebuilt at the next start)" if initial else "")
                )
            self.context = self.engine.create_execution_context()
            self.stream = check(self.cudart, self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        except BaseException:
            self.close()
            raise
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.name = f"tensorrt:cuda:{cfg.device}:{self.plan.precision}"

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least `nbytes` for a tensor, grown (never shrunk) as batches need."""
        ptr, size = self.buffers.get(name, (0, 0))
        if size >= nbytes:
            return ptr
        if ptr:
            del self.buffers[
                name
            ]  # forgotten before the free: if the malloc below fails, nothing points at freed memory
            check(self.cudart, self.cudart.cudaFree(ptr), "cudaFree")
        ptr = check(self.cudart, self.cudart.cudaMalloc(nbytes), "cudaMalloc")
        self.buffers[name] = (ptr, nbytes)
        return ptr

    def _host(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A pinned (page-locked) host array for a tensor: cudaMemcpyAsync from pageable memory is a
        synchronous staged copy, from pinned memory a DMA that overlaps the stream's work."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        nbytes = max(count * dtype.itemsize, 1)
        ptr, size = self.hosts.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                del self.hosts[name]
                check(self.cudart, self.cudart.cudaFreeHost(ptr), "cudaFreeHost")
            ptr = check(self.cudart, self.cudart.cudaMallocHost(nbytes), "cudaMallocHost")
            self.hosts[name] = (ptr, nbytes)
        return np.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype, count=count).reshape(shape)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        # cudaSetDevice is per host thread, and inference runs in the detector's own thread.
        cudart = self.cudart
        check(cudart, cudart.cudaSetDevice(self.device), "cudaSetDevice")
        lo, _, hi = self.profile
        if len(batch) > hi:  # more than the profile allows: run in pieces the engine accepts
            return np.concatenate([self.infer(batch[i : i + hi]) for i in range(0, len(batch), hi)])
        if len(batch) < lo:  # a fixed-batch engine: pad with copies of the last frame, drop their rows
            pad = np.repeat(batch[-1:], lo - len(batch), axis=0)
            return self.infer(np.concatenate([batch, pad]))[: len(batch)]
        n, name = len(batch), self.info.input_name
        staged = self._host(name, batch.shape, self.trt.nptype(self.engine.get_tensor_dtype(name)))
        staged[...] = batch
        self.context.set_input_shape(name, batch.shape)
        inp = self._buffer(name, staged.nbytes)
        self.context.set_tensor_address(name, inp)
        kind = cudart.cudaMemcpyKind
        check(
            cudart,
            cudart.cudaMemcpyAsync(inp, staged.ctypes.data, staged.nbytes, kind.cudaMemcpyHostToDevice, self.stream),
            "cudaMemcpyAsync",
        )
        hosts = {}
        for out in self.outputs:
            host = self._host(
                out,
                output_shape(tuple(self.context.get_tensor_shape(out)), n),
                self.trt.nptype(self.engine.get_tensor_dtype(out)),
            )
            self.context.set_tensor_address(out, self._buffer(out, host.nbytes))
            hosts[out] = host
        if not self.context.execute_async_v3(self.stream):
            check(cudart, cudart.cudaGetLastError(), "execute_async_v3")  # a CUDA error says which (sticky or not)
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for out, host in hosts.items():
            check(
                cudart,
                cudart.cudaMemcpyAsync(
                    host.ctypes.data, self.buffers[out][0], host.nbytes, kind.cudaMemcpyDeviceToHost, self.stream
                ),
                "cudaMemcpyAsync",
            )
        check(cudart, cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return np.array(hosts[self.outputs[0]], dtype=np.float32)  # a copy: the pinned buffer is reused next batch

    def close(self) -> None:
        """Free every device and pinned buffer and the stream (errors ignored: after a sticky CUDA
        error every call fails, and the process is about to restart anyway)."""
        cudart = self.cudart
        for table, free in ((self.buffers, cudart.cudaFree), (self.hosts, cudart.cudaFreeHost)):
            for key, (ptr, _) in list(table.items()):
                del table[key]
                with contextlib.suppress(Exception):
                    free(ptr)
        if self.stream is not None:
            stream, self.stream = self.stream, None
            with contextlib.suppress(Exception):
                cudart.cudaStreamDestroy(stream)
        self.context = self.engine = None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
