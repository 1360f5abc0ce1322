"""GPU -> CPU fallback logic, with backends that fail the way a broken accelerator does."""

import numpy as np
import pytest

from services.detector.fallback import FallbackBackend


class Backend:
    def __init__(self, name, fail_after=None):
        self.name, self.fail_after, self.calls = name, fail_after, 0

    def infer(self, batch):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("CUDA error: out of memory")  # recoverable (not sticky): the GPU is retried later
        return np.full((len(batch), 1), 1.0 if self.name == "gpu" else 2.0)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(gpu_factory, clock, events, **kw):
    return FallbackBackend(
        gpu_factory, lambda: Backend("cpu"), clock=clock, on_change=lambda s, r: events.append((s, r)), **kw
    )


def test_gpu_that_fails_at_init_runs_on_cpu_and_says_why():
    events, clock = [], Clock()

    def broken():
        raise OSError("libcudart.so.12: cannot open shared object file")

    fb = make(broken, clock, events)
    assert fb.degraded and fb.name.startswith("degraded: cpu fallback (init failed: OSError: libcudart")
    assert fb.infer(np.zeros((2, 3))).tolist() == [[2.0], [2.0]]
    assert events == [("degraded", fb.reason)]


def test_repeated_device_errors_switch_to_cpu_without_losing_a_batch():
    events, clock = [], Clock()
    gpu = Backend("gpu", fail_after=2)
    fb = make(lambda: gpu, clock, events, max_errors=3)
    results = [fb.infer(np.zeros((1, 3)))[0, 0] for _ in range(6)]
    assert results == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]  # every failed GPU batch was re-run on the CPU
    assert fb.degraded and "3 consecutive errors" in fb.reason and "out of memory" in fb.reason
    assert [e[0] for e in events] == ["degraded"]


def test_gpu_is_retried_with_backoff_and_restored():
    events, clock = [], Clock()
    attempts = []

    def flaky():
        attempts.append(clock.now)
        if len(attempts) < 3:
            raise RuntimeError("no CUDA-capable device is detected")
        return Backend("gpu")

    fb = make(flaky, clock, events, retry=10, retry_max=25)
    clock.now = 5
    fb.infer(np.zeros((1, 1)))  # too early: no retry
    clock.now = 10
    fb.infer(np.zeros((1, 1)))  # retry 1 fails: backoff doubles to 20
    clock.now = 29
    fb.infer(np.zeros((1, 1)))
    assert attempts == [0, 10]
    clock.now = 30
    assert fb.infer(np.zeros((1, 1)))[0, 0] == 1.0  # retry 2 works
    assert attempts == [0, 10, 30] and not fb.degraded
    assert [e[0] for e in events] == ["degraded", "restored"]


@pytest.mark.parametrize("errors_before_success", [1, 2])
def test_isolated_errors_below_threshold_keep_the_gpu(errors_before_success):
    events, clock = [], Clock()
    calls = {"n": 0}

    class Flaky(Backend):
        def infer(self, batch):
            calls["n"] += 1
            if calls["n"] <= errors_before_success:
                raise RuntimeError("transient")
            return super().infer(batch)

    fb = make(lambda: Flaky("gpu"), clock, events, max_errors=3)
    for _ in range(4):
        fb.infer(np.zeros((1, 1)))
    assert not fb.degraded and events == []


def cuda_error(code: int):
    """The error a cuda-python call returns, as our check() raises it: the real cuda.bindings enum and
    cudaGetErrorString text where cuda-python is installed (the dev extra), else the same numbers."""
    from services.detector.gpu_errors import STICKY, CudaError

    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return CudaError(code, STICKY.get(code, f"cudaError {code}"), "")
    err = cudart.cudaError_t(code)
    return CudaError(code, err.name, cudart.cudaGetErrorString(err)[1].decode(), "cudaStreamSynchronize")


@pytest.mark.parametrize(
    "error",
    [
        lambda: cuda_error(700),
        lambda: cuda_error(719),
        # onnxruntime's CUDA EP reports it as text (cuda_call.cc: "CUDA failure <code>: <cudaGetErrorString>")
        lambda: RuntimeError(
            "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: an illegal memory access was encountered ; GPU=0 ; "
            "hostname=box ; file=cuda_call.cc ; line=123 ; expr=cudaStreamSynchronize(stream);"
        ),
        lambda: RuntimeError("TensorRT execute_async_v3 failed: unspecified launch failure"),
    ],
    ids=["cuda-700", "cuda-719", "onnxruntime-text", "tensorrt-text"],
)
def test_a_sticky_cuda_error_drops_the_gpu_for_good_and_asks_for_a_restart(error):
    """After an illegal address or a launch failure the process can never use CUDA again: the batch
    is re-run on the CPU at once (no max_errors), the GPU is closed and never retried in this process,
    and restart_reason tells the detector to exit for a fresh context."""
    events, clock, made, closed = [], Clock(), [], []

    class Poisoned(Backend):
        def infer(self, batch):
            self.calls += 1
            if self.calls > 1:
                raise error()
            return super().infer(batch)

        def close(self):
            closed.append(self)

    def factory():
        made.append(Poisoned("gpu"))
        return made[-1]

    fb = make(factory, clock, events, max_errors=3, retry=1)
    assert fb.infer(np.zeros((1, 1)))[0, 0] == 1.0 and fb.restart_reason is None
    assert fb.infer(np.zeros((1, 1)))[0, 0] == 2.0  # the failed batch, on the CPU
    assert fb.restart_reason and fb.degraded and "sticky CUDA error" in fb.reason
    assert closed == made
    clock.now = 10_000
    fb.infer(np.zeros((1, 1)))
    assert len(made) == 1  # never retried in this process


@pytest.mark.parametrize(
    "error",
    [cuda_error(2), cuda_error(35), RuntimeError("CUDA failure 2: out of memory"), RuntimeError("transient")],
    ids=["oom", "insufficient-driver", "oom-text", "other"],
)
def test_errors_a_process_recovers_from_are_not_sticky(error):
    from services.detector.gpu_errors import is_sticky

    assert not is_sticky(error)
    assert is_sticky(RuntimeError("wrapped")) is False
    try:
        raise RuntimeError("inference failed") from cuda_error(700)
    except RuntimeError as wrapped:
        assert is_sticky(wrapped)  # found through the cause


def test_a_dropped_gpu_is_closed_each_time_it_is_dropped():
    """Degrade/restore cycles: every GPU backend made is closed when dropped (device memory freed)."""
    events, clock, made = [], Clock(), []

    class Closing(Backend):
        closed = False

        def close(self):
            self.closed = True

    def factory():
        made.append(Closing("gpu", fail_after=0))
        return made[-1]

    fb = make(factory, clock, events, max_errors=1, retry=1, retry_max=1)
    for t in range(4):
        clock.now = t * 2
        fb.infer(np.zeros((1, 1)))
    assert len(made) == 4 and all(b.closed for b in made)


def test_repeated_sticky_restarts_keep_the_gpu_off_for_a_while(tmp_path):
    """Each exit for a fresh CUDA context is recorded; past three in an hour the next starts refuse
    the GPU (the CPU, degraded, saying why) instead of restarting until systemd's start limit."""
    from services.detector.engine import StickyRestarts

    sticky = StickyRestarts(tmp_path / "engines" / "sticky-cuda-errors")
    assert sticky.refusal() is None
    for t in (1000.0, 2000.0):
        sticky.record(t)
    assert sticky.refusal(2100.0) is None
    sticky.record(3000.0)
    assert "3 sticky CUDA errors within 1 h" in (sticky.refusal(3100.0) or "")
    assert sticky.refusal(1000.0 + 3601) is None  # the oldest has left the window
    (tmp_path / "engines" / "sticky-cuda-errors").write_text("garbage\n")
    assert sticky.refusal() is None  # unreadable: as if empty


def test_after_repeated_sticky_exits_the_gpu_is_not_retried_in_process_either(tmp_path):
    """Past the limit the GPU stays off for the window: not tried at start, and not by the fallback's
    retries either (each would poison the context again and exit)."""
    from services.detector.engine import Engine
    from services.runtime.config import DetectorConfig
    from tests.unit.test_decoders import constant_model

    constant_model(tmp_path / "m.onnx", np.array([[10, 10, 30, 30, 0.9, 0]], np.float32))
    cfg = DetectorConfig(
        model="m.onnx", models_dir=str(tmp_path), backend="plugin:tests.fake_accelerators:FailsAfterBatches",
        gpu_retry_seconds=0.0, gpu_retry_max_seconds=0.0, threads=1,
    )  # fmt: skip
    engine = Engine(cfg, tmp_path / "engines", lambda *a: None, start=False)
    for _ in range(3):
        engine.sticky.record()
    engine.start_backend()
    assert engine.backend.degraded and "3 sticky CUDA errors" in engine.backend.reason
    engine.backend.infer(np.zeros((1, 3, 64, 64), np.float32))  # retry due at once: still refused
    assert engine.backend.degraded and engine.backend.gpu is None
    (tmp_path / "engines" / "sticky-cuda-errors").unlink()  # the window passed (or the operator cleared it)
    engine.backend.infer(np.zeros((1, 3, 64, 64), np.float32))
    assert not engine.backend.degraded
