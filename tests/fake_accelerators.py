"""Accelerator backends that fail the way real ones do, loaded by the detector through its
`plugin:module:Class` backend setting. Real inference underneath (onnxruntime on the CPU)."""

from __future__ import annotations

import os

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
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.left -= 1
        return self.inner.infer(batch)
