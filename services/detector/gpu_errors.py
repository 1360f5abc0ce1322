"""CUDA errors as the GPU backends see them, and which of them poison the process for good.

No CUDA import here: the rules are plain data, so the fallback logic and its tests run anywhere.
"""

from __future__ import annotations

import re

# The CUDA runtime documents these as leaving "the process in an inconsistent state": every later CUDA
# call returns the same error, and "to continue using CUDA, the process must be terminated and
# relaunched". Retrying the GPU in the same process can never work; a restart can.
STICKY = {
    700: "cudaErrorIllegalAddress",
    702: "cudaErrorLaunchTimeout",
    710: "cudaErrorAssert",
    714: "cudaErrorHardwareStackError",
    715: "cudaErrorIllegalInstruction",
    716: "cudaErrorMisalignedAddress",
    717: "cudaErrorInvalidAddressSpace",
    718: "cudaErrorInvalidPc",
    719: "cudaErrorLaunchFailure",
}
# What cudaGetErrorString says for them: onnxruntime's CUDA EP and TensorRT report errors as text
# ("CUDA failure 700: an illegal memory access was encountered ; GPU=0 ..."), not as codes.
_STICKY_TEXT = (
    "an illegal memory access was encountered",
    "the launch timed out and was terminated",
    "device-side assert triggered",
    "hardware stack error",
    "an illegal instruction was encountered",
    "misaligned address",
    "operation not supported on global/shared address space",
    "invalid program counter",
    "unspecified launch failure",
)
_CODE = re.compile(r"CUDA (?:failure|error)[ :]*(\d{3})\b", re.IGNORECASE)


class CudaError(RuntimeError):
    """A CUDA runtime call that returned an error code (cuda-python returns codes, it does not raise)."""

    def __init__(self, code: int, name: str, message: str, call: str = "") -> None:
        self.code, self.name, self.call = code, name, call
        super().__init__(f"{call + ': ' if call else ''}{name} ({code}): {message}")


class EngineNotBuilt(RuntimeError):
    """No cached engine for this model and GPU: engines are built only at start, before READY (the
    retry path never builds: a build there would run for minutes without watchdog pings)."""


def is_sticky(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is one of the errors after which this process can never use
    CUDA again."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CudaError) and e.code in STICKY:
            return True
        text = str(e)
        lowered = text.lower()
        if any(name in text for name in STICKY.values()) or any(t in lowered for t in _STICKY_TEXT):
            return True
        if any(int(m) in STICKY for m in _CODE.findall(text)):
            return True
        e = e.__cause__ or e.__context__
    return False
