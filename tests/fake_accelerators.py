"""Accelerator backends that fail the way real ones do, loaded by the detector through its
`plugin:module:Class` backend setting. Real inference underneath (onnxruntime on the CPU)."""

from __future__ import annotations

import os
import sys

from services.detector.backends import OnnxRuntimeBackend


class BrokenAtInit:
    """A GPU whose driver cannot be loaded."""

    def __init__(self, info, cfg):
        raise OSError("libcuda.so.1: cannot open shared object file: No such file or directory")


class FailsAfterBatches:
    """A GPU that works for FAIL_AFTER batches (env VIGIL_TEST_FAIL_AFTER, default 2), then faults."""

    def __init__(self, info, cfg):
        self.inner = OnnxRuntimeBackend(info, cfg, ["CPUExecutionProvider"])
        self.name = "fake-gpu:0"
        self.left = int(os.environ.get("VIGIL_TEST_FAIL_AFTER", "2"))

    def infer(self, batch):
        if self.left <= 0:
            raise RuntimeError("CUDA error: out of memory")  # recoverable (not sticky): the GPU is retried later
        self.left -= 1
        return self.inner.infer(batch)


def illegal_address():
    """cudaErrorIllegalAddress as services/detector/trt.check raises it: the real cuda.bindings enum and
    text where cuda-python is installed (the dev extra), the same numbers otherwise."""
    from services.detector.gpu_errors import CudaError

    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return CudaError(
            700, "cudaErrorIllegalAddress", "an illegal memory access was encountered", "cudaStreamSynchronize"
        )
    err = cudart.cudaError_t.cudaErrorIllegalAddress
    return CudaError(int(err), err.name, cudart.cudaGetErrorString(err)[1].decode(), "cudaStreamSynchronize")


class StickyAfterBatches(FailsAfterBatches):
    """A GPU that works for FAIL_AFTER batches, then hits an illegal address: the context is poisoned."""

    def infer(self, batch):
        if self.left <= 0:
            raise illegal_address()
        self.left -= 1
        return self.inner.infer(batch)


class SlowBuild:
    """An accelerator whose engine build never finishes: the build writes its temporary file, then
    hangs (what a stuck TensorRT builder looks like from outside). Its pid goes to the log line."""

    @staticmethod
    def build_job(info, cfg, cache_dir):
        from services.detector.backends import BuildJob

        target = cache_dir / "slow-test.engine"
        script = (
            f"import os, pathlib, time; p = pathlib.Path({str(target)!r}); "
            "p.with_name(f'{p.name}.{os.getpid()}.tmp').write_bytes(b'half an engine'); time.sleep(3600)"
        )
        return BuildJob([sys.executable, "-c", script], "slow test engine", target)

    def __init__(self, info, cfg):
        from services.detector.gpu_errors import EngineNotBuilt

        raise EngineNotBuilt("no slow-test.engine")
