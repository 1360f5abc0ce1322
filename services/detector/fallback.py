"""GPU first, CPU when the GPU fails: the detector keeps detecting instead of crash-looping.

Runs inside the inference thread. A GPU backend that fails to initialise, or raises on
`max_errors` consecutive batches, is dropped (and closed: its device memory freed) for the CPU
backend; every failed batch is re-run on the CPU, so no frame is lost. The GPU is tried again after
`retry` seconds, doubling up to `retry_max`.

A sticky CUDA error (services/detector/gpu_errors.py: an illegal address, a launch failure...) is
different: this process can never use CUDA again, so the GPU is dropped at once and never retried
here; `restart_reason` is set, and the detector finishes the batch on the CPU, acks it, and exits for
systemd to start it again with a fresh CUDA context.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import numpy as np

from services.detector.backends import Backend
from services.detector.gpu_errors import is_sticky


class FallbackBackend:
    def __init__(
        self,
        make_gpu: Callable[[], Backend],
        make_cpu: Callable[[], Backend],
        *,
        max_errors: int = 3,
        retry: float = 60.0,
        retry_max: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str | None], None] = lambda state, reason: None,
    ) -> None:
        self.make_gpu, self.make_cpu = make_gpu, make_cpu
        self.max_errors, self.retry, self.retry_max = max_errors, retry, retry_max
        self.clock, self.on_change = clock, on_change
        self.gpu: Backend | None = None
        self.cpu: Backend | None = None
        self.reason: str | None = None
        self.errors = 0
        self.backoff = retry
        self.next_retry = 0.0
        self.restart_reason: str | None = None  # a sticky CUDA error: only a new process can use the GPU
        self._try_gpu()

    @property
    def name(self) -> str:
        if self.gpu is not None:
            return self.gpu.name
        return f"degraded: cpu fallback ({self.reason})"

    @property
    def degraded(self) -> bool:
        return self.gpu is None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.gpu is None and self.restart_reason is None and self.clock() >= self.next_retry:
            self._try_gpu()
        if self.gpu is not None:
            try:
                out = self.gpu.infer(batch)
                self.errors = 0
                return out
            except Exception as exc:  # noqa: BLE001 - any device error counts; the batch is re-run below
                self.errors += 1
                if is_sticky(exc):
                    self.restart_reason = f"{type(exc).__name__}: {exc}"[:300]
                    self._fall_back(
                        f"sticky CUDA error, the detector restarts for a fresh CUDA context: {self.restart_reason}"
                    )
                elif self.errors >= self.max_errors:
                    self._fall_back(f"{self.errors} consecutive errors, last: {type(exc).__name__}: {exc}")
        return self._cpu().infer(batch)

    def _cpu(self) -> Backend:
        if self.cpu is None:
            self.cpu = self.make_cpu()
        return self.cpu

    def _try_gpu(self) -> None:
        was_degraded = self.reason is not None
        try:
            self.gpu = self.make_gpu()
        except Exception as exc:  # noqa: BLE001 - an init failure of any kind means "not now"
            if is_sticky(exc):  # the context was poisoned before (an error that named no code): restart
                self.restart_reason = f"{type(exc).__name__}: {exc}"[:300]
            self._fall_back(f"init failed: {type(exc).__name__}: {exc}", retrying=was_degraded)
            return
        self.errors = 0
        self.backoff = self.retry
        if was_degraded:
            self.reason = None
            self.on_change("restored", None)

    def _fall_back(self, reason: str, retrying: bool = False) -> None:
        gpu, self.gpu = self.gpu, None
        close = getattr(gpu, "close", None)
        if close is not None:
            # its device memory: a GPU dropped and restored every hour must not leak (a broken device may
            # fail to free: the process goes on)
            with contextlib.suppress(Exception):
                close()
        if retrying:  # still broken: wait longer before the next try, keep the first reason visible
            self.backoff = min(self.backoff * 2, self.retry_max)
        else:
            self.reason = reason[:300]
            self.backoff = self.retry
            self.on_change("degraded", self.reason)
        self.next_retry = self.clock() + self.backoff
