"""The GPU-free logic of the TensorRT backend: engine cache keys, batch profiles, output shapes."""

import pytest

from services.detector.trt import batch_profile, engine_cache_key, output_shape

BASE = dict(
    model_sha256="a" * 64,
    gpu_name="NVIDIA H200",
    compute_capability=(9, 0),
    trt_version="10.9.0",
    precision="fp16",
    profile=(1, 8, 16),
    size=416,
)


@pytest.mark.parametrize(
    "change",
    [
        {"model_sha256": "b" * 64},
        {"gpu_name": "NVIDIA L4"},
        {"compute_capability": (8, 9)},
        {"trt_version": "10.10.0"},
        {"precision": "fp32"},
        {"profile": (1, 16, 32)},
        {"size": 640},
    ],
)
def test_any_change_that_invalidates_an_engine_misses_the_cache(change):
    assert engine_cache_key(**{**BASE, **change}) != engine_cache_key(**BASE)


def test_same_inputs_hit_the_cache():
    assert engine_cache_key(**BASE) == engine_cache_key(**dict(BASE))


def test_batch_profile():
    assert batch_profile(None, 16) == (1, 8, 16)
    assert batch_profile(None, 1) == (1, 1, 1)
    assert batch_profile(1, 16) == (1, 1, 1)  # a batch-1 export allows only batch 1


def test_output_shape_resolves_dynamic_batch():
    assert output_shape((-1, 3549, 85), 8) == (8, 3549, 85)
    assert output_shape((1, 300, 6), 1) == (1, 300, 6)
    with pytest.raises(ValueError):
        output_shape((-1, -1, 6), 2)


# ---- against the real cuda-python (dev extra): its enums, its answers on a machine without a driver --
cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (dev extra) not installed")


class Cudart:
    """cuda-python's runtime module with chosen answers: real cudaError_t values, real error strings,
    pointers from a counter; every malloc and free recorded."""

    def __init__(self, fail_malloc_at: int | None = None, driver: int = 12040, runtime: int = 12090) -> None:
        self.cudaError_t, self.cudaGetErrorString = cudart.cudaError_t, cudart.cudaGetErrorString
        self.next, self.live, self.frees = 0x1000, set(), []
        self.mallocs = 0
        self.fail_malloc_at, self.driver, self.runtime = fail_malloc_at, driver, runtime

    ok = property(lambda self: cudart.cudaError_t.cudaSuccess)

    def _alloc(self, nbytes):
        self.mallocs += 1
        if self.mallocs == self.fail_malloc_at:
            return cudart.cudaError_t.cudaErrorMemoryAllocation, 0
        self.next += 0x1000
        self.live.add(self.next)
        return self.ok, self.next

    def _free(self, ptr):
        self.frees.append(ptr)
        if ptr not in self.live:  # what the real driver would do with a double free, at best
            return (cudart.cudaError_t.cudaErrorInvalidValue,)
        self.live.remove(ptr)
        return (self.ok,)

    cudaMalloc = cudaMallocHost = _alloc
    cudaFree = cudaFreeHost = _free

    def cudaStreamDestroy(self, stream):
        self.frees.append(("stream", stream))
        return (self.ok,)

    def cudaDriverGetVersion(self):
        return self.ok, self.driver

    def cudaRuntimeGetVersion(self):
        return self.ok, self.runtime


def backend_with(fake: Cudart):
    from services.detector.trt import TensorRTBackend

    b = object.__new__(TensorRTBackend)  # no tensorrt here: the buffer and close logic alone
    b.cudart, b.buffers, b.hosts, b.stream, b.engine, b.context = fake, {}, {}, "stream-1", object(), object()
    return b


def test_check_raises_the_cuda_error_with_its_name_and_text():
    from services.detector.gpu_errors import CudaError, is_sticky
    from services.detector.trt import check

    assert check(cudart, (cudart.cudaError_t.cudaSuccess, 7)) == 7
    with pytest.raises(CudaError) as e:
        check(cudart, (cudart.cudaError_t.cudaErrorIllegalAddress,), "cudaStreamSynchronize")
    assert e.value.code == 700 and "cudaErrorIllegalAddress" in str(e.value) and "illegal memory access" in str(e.value)
    assert is_sticky(e.value)


def test_a_failed_malloc_never_leaves_a_freed_pointer_to_be_used_or_freed_again():
    """Growing a buffer frees the old one, then the malloc fails: the table must not keep the freed
    pointer (the next batch would hand it to TensorRT; close() would free it twice)."""
    from services.detector.gpu_errors import CudaError

    fake = Cudart(fail_malloc_at=2)
    b = backend_with(fake)
    first = b._buffer("images", 100)
    with pytest.raises(CudaError, match="cudaErrorMemoryAllocation"):
        b._buffer("images", 200)
    assert "images" not in b.buffers and first not in fake.live
    b.close()
    assert fake.frees.count(first) == 1  # freed exactly once
    assert b._buffer("images", 200) in fake.live  # and the next batch gets a fresh one


def test_close_frees_every_device_and_pinned_buffer_and_the_stream():
    fake = Cudart()
    b = backend_with(fake)
    b._buffer("images", 64)
    b._buffer("output", 128)
    b._buffer("output", 256)  # grown: the smaller one already freed
    b.hosts["images"] = fake._alloc(24)[1], 24  # a pinned host buffer (not touched: the pointers are made up)
    b.close()
    assert not fake.live and ("stream", "stream-1") in fake.frees
    assert b.buffers == {} and b.hosts == {} and b.stream is None and b.engine is None
    b.close()  # twice is harmless
    assert len([f for f in fake.frees if f == ("stream", "stream-1")]) == 1


def test_the_driver_check_names_the_fix():
    from services.detector.trt import DriverMismatch, check_driver

    assert (
        check_driver(Cudart(driver=12040, runtime=12090)) == "driver CUDA 12.4, runtime CUDA 12.9"
    )  # minor versions mix
    with pytest.raises(DriverMismatch, match=r"supports CUDA 12\.4.*CUDA 13\.0.*cuda-python>=12,<13"):
        check_driver(Cudart(driver=12040, runtime=13000))
    # the real cuda-python on this machine, which has no NVIDIA driver: it reports version 0
    with pytest.raises(DriverMismatch, match="no NVIDIA driver is loaded"):
        check_driver(cudart)


def test_precision_follows_the_tensorrt_version():
    from services.detector.trt import precision_plan

    assert precision_plan("fp16", True, (8, 9)) == "fp16"  # TensorRT 10: fp16 is a builder flag
    assert precision_plan("fp16", True, (5, 0)) == "fp32"  # no fast fp16 on that GPU
    assert precision_plan("fp32", True, (9, 0)) == "fp32"
    assert precision_plan("fp16", False, (9, 0)) == "as-exported"  # TensorRT 11: no flag, strongly typed


class FakeTensorRT:
    """The parts of the tensorrt module the backend touches when an engine is cached; a Builder must
    never be made then (TensorRT 11 has no platform_has_fast_fp16 to ask it, and it costs a context)."""

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class TensorIOMode:
        INPUT, OUTPUT = 0, 1

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 5

    class Builder:
        def __init__(self, logger):
            raise AssertionError("a Builder was made although the engine is cached")

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ("images", "output")[i]

        def get_tensor_mode(self, name):
            return FakeTensorRT.TensorIOMode.OUTPUT if name == "output" else FakeTensorRT.TensorIOMode.INPUT

        def create_execution_context(self):
            return object()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return FakeTensorRT.Engine() if data == b"engine" else None

    def __init__(self, version: str, fp16_flag: bool) -> None:
        self.__version__ = version
        self.BuilderFlag = type("BuilderFlag", (), {"FP16": 1} if fp16_flag else {})


class DeviceCudart(Cudart):
    """A GPU as cuda-python reports it: an H200, a stream."""

    def cudaSetDevice(self, device):
        return (self.ok,)

    def cudaGetDeviceProperties(self, device):
        from types import SimpleNamespace

        return self.ok, SimpleNamespace(name=b"NVIDIA H200", major=9, minor=0)

    def cudaStreamCreate(self):
        return self.ok, "stream-1"


@pytest.mark.parametrize("version, fp16_flag, precision", [("10.16.1", True, "fp16"), ("11.0.0", False, "as-exported")])
def test_a_cached_engine_loads_without_a_builder_and_a_missing_one_is_never_built_here(
    tmp_path, monkeypatch, version, fp16_flag, precision
):
    import sys

    from services.detector import trt
    from services.detector.gpu_errors import EngineNotBuilt
    from services.detector.model import ModelInfo
    from services.runtime.config import DetectorConfig

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(version, fp16_flag))
    monkeypatch.setattr(trt, "cuda_runtime", lambda: DeviceCudart())
    info = ModelInfo(tmp_path / "m.onnx", "a" * 64, "yolox", "images", 416, 1, ("person",))
    cfg = DetectorConfig(precision="fp16")
    plan = trt.plan_engine(info, cfg, tmp_path)
    assert plan.precision == precision and plan.profile == (1, 1, 1) and plan.trt_version == version
    assert plan.command()[1:3] == ["-m", "services.detector.trt"]  # built by a child process, not here
    with pytest.raises(EngineNotBuilt, match="built at start"):
        trt.TensorRTBackend(info, cfg, tmp_path)  # the retry path: no engine, no build
    plan.path.write_bytes(b"engine")
    backend = trt.TensorRTBackend(info, cfg, tmp_path)
    assert backend.name == f"tensorrt:cuda:0:{precision}" and backend.outputs == ["output"]
    plan.path.write_bytes(b"from another TensorRT")
    with pytest.raises(EngineNotBuilt, match="could not deserialize"):
        trt.TensorRTBackend(info, cfg, tmp_path)
    assert not plan.path.exists() and list(tmp_path.glob("*.bad-*"))  # set aside: rebuilt at the next start
    plan.path.write_bytes(b"from another TensorRT")
    with pytest.raises(EngineNotBuilt, match="could not deserialize"):
        trt.TensorRTBackend(info, cfg, tmp_path, initial=False)
    assert plan.path.exists()  # a retry keeps it: a busy or poisoned GPU fails to load good engines too
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("9.3.0", True))
    with pytest.raises(RuntimeError, match=r"TensorRT 9\.3\.0 is not supported"):
        trt.plan_engine(info, cfg, tmp_path)
