"""GPU readings: NVML through nvidia-ml-py (the maintained pynvml), else `nvidia-smi` CSV, else none."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from proto import GpuProcess, GpuSample

SMI_FIELDS = (
    "index,name,uuid,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw,power.limit,"
    "clocks.sm,clocks.mem"
)


def unit_of(pid: int) -> str | None:
    """The systemd unit a process belongs to, from its cgroup path, e.g. vigil-detector@0.service."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    m = re.search(r"/([^/]+\.service)(?:/|$)", text)
    return m.group(1) if m else None


def _num(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def parse_nvidia_smi(csv: str, host: str, now: float) -> list[GpuSample]:
    """Parse `nvidia-smi --query-gpu=<SMI_FIELDS> --format=csv,noheader,nounits` output."""
    samples = []
    for line in csv.strip().splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != len(SMI_FIELDS.split(",")):
            continue
        samples.append(
            GpuSample(
                host=host,
                index=int(cols[0]),
                name=cols[1],
                uuid=cols[2] or None,
                source="nvidia-smi",
                sampled_at=now,
                util_pct=_num(cols[3]),
                mem_used_mb=_num(cols[4]),
                mem_total_mb=_num(cols[5]),
                temp_c=_num(cols[6]),
                power_w=_num(cols[7]),
                power_limit_w=_num(cols[8]),
                sm_clock_mhz=_num(cols[9]),
                mem_clock_mhz=_num(cols[10]),
            )
        )
    return samples


class NvmlReader:
    source = "nvml"

    def __init__(self) -> None:
        import pynvml  # lazy: nvidia-ml-py is the gpu extra

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.count = pynvml.nvmlDeviceGetCount()

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        # NVMLLibraryMismatchError (an unversioned call the driver's NVML lacks) is not an NVMLError
        n = self.nvml
        return (n.NVMLError, getattr(n, "NVMLLibraryMismatchError", n.NVMLError))

    def first(self, handle, *names: str):
        """The first of these NVML calls that this nvidia-ml-py has and this driver answers, else None."""
        for name in names:
            fn = getattr(self.nvml, name, None)
            if fn is None:
                continue
            try:
                return fn(handle)
            except self.errors:
                continue
        return None

    def read(self, host: str) -> list[GpuSample]:
        n, now, out = self.nvml, time.time(), []
        for i in range(self.count):
            h = n.nvmlDeviceGetHandleByIndex(i)

            def get(fn, *args, _h=h):
                try:
                    return fn(_h, *args)
                except self.errors:
                    return None

            mem = get(n.nvmlDeviceGetMemoryInfo)
            util = get(n.nvmlDeviceGetUtilizationRates)
            power = get(n.nvmlDeviceGetPowerUsage)
            limit = get(n.nvmlDeviceGetEnforcedPowerLimit)
            reasons = (
                self.first(h, "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
                or 0
            )
            # the unversioned name is _v3 (driver >= 510); an older driver lacks it: _v2
            procs = (
                self.first(h, "nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2") or []
            )
            out.append(
                GpuSample(
                    host=host,
                    index=i,
                    name=str(get(n.nvmlDeviceGetName)),
                    uuid=str(get(n.nvmlDeviceGetUUID)),
                    source="nvml",
                    sampled_at=now,
                    util_pct=util.gpu if util else None,
                    mem_used_mb=mem.used / 2**20 if mem else None,
                    mem_total_mb=mem.total / 2**20 if mem else None,
                    temp_c=get(n.nvmlDeviceGetTemperature, n.NVML_TEMPERATURE_GPU),
                    power_w=power / 1000 if power is not None else None,
                    power_limit_w=limit / 1000 if limit is not None else None,
                    sm_clock_mhz=get(n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_SM),
                    mem_clock_mhz=get(n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_MEM),
                    throttle_reasons=[
                        name
                        for name, bits in _THROTTLE.items()
                        if reasons & next((getattr(n, b) for b in bits if hasattr(n, b)), 0)
                    ],
                    processes=[
                        GpuProcess(pid=p.pid, used_mb=int((p.usedGpuMemory or 0) / 2**20), unit=unit_of(p.pid))
                        for p in procs
                    ],
                )
            )
        return out


# Throttle reasons by our name: NVML's current constant (...ClocksEventReason..., driver 535+), then
# the deprecated one older nvidia-ml-py releases have.
_THROTTLE = {
    name: (f"nvmlClocksEventReason{suffix}", f"nvmlClocksThrottleReason{suffix}")
    for name, suffix in (
        ("gpu_idle", "GpuIdle"),
        ("applications_clocks", "ApplicationsClocksSetting"),
        ("sw_power_cap", "SwPowerCap"),
        ("hw_slowdown", "HwSlowdown"),
        ("sw_thermal", "SwThermalSlowdown"),
        ("hw_thermal", "HwThermalSlowdown"),
        ("hw_power_brake", "HwPowerBrakeSlowdown"),
    )
}


class SmiReader:
    source = "nvidia-smi"

    def __init__(self, binary: str) -> None:
        path = shutil.which(binary)
        if path is None:
            raise FileNotFoundError(f"{binary} not found")
        self.cmd = [path, f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits"]
        self.read(socket.gethostname())  # fails now rather than on every tick when there is no GPU

    def read(self, host: str) -> list[GpuSample]:
        out = subprocess.run(self.cmd, capture_output=True, text=True, timeout=10, check=True).stdout
        return parse_nvidia_smi(out, host, time.time())


def open_reader(nvidia_smi: str):
    """NVML, else nvidia-smi, else (None, why)."""
    reasons = []
    try:
        return NvmlReader(), None
    except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, driver errors...
        reasons.append(f"NVML: {exc}")
    try:
        return SmiReader(nvidia_smi), None
    except Exception as exc:  # noqa: BLE001
        reasons.append(f"nvidia-smi: {exc}")
    return None, "; ".join(reasons)
