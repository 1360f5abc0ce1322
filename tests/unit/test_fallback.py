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
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return np.full((len(batch), 1), 1.0 if self.name == "gpu" else 2.0)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def make(gpu_factory, clock, events, **kw):
    return FallbackBackend(gpu_factory, lambda: Backend("cpu"), clock=clock, on_change=lambda s, r: events.append((s, r)), **kw)


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
    assert fb.degraded and "3 consecutive errors" in fb.reason and "illegal memory access" in fb.reason
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
