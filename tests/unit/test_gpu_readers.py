"""nvidia-smi CSV parsing on recorded output, and the process -> unit mapping."""

import os

from services.gpu_stats.readers import parse_nvidia_smi, unit_of

# Recorded from `nvidia-smi --query-gpu=<SMI_FIELDS> --format=csv,noheader,nounits` on a two-GPU box,
# the second GPU reporting what consumer cards report for unsupported fields.
RECORDED = """\
0, NVIDIA H200, GPU-6c0f6c8e-1b9a-4f1e-9d55-2c1d1a7f0e11, 37, 1024, 143771, 41, 121.50, 700.00, 1980, 2619
1, NVIDIA GeForce RTX 3050, GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9, 0, 5, 8192, 35, [N/A], [Not Supported], 210, 405
"""


def test_parse_recorded_nvidia_smi_output():
    a, b = parse_nvidia_smi(RECORDED, "box", 123.0)
    assert (a.index, a.name, a.util_pct, a.mem_used_mb, a.mem_total_mb, a.temp_c, a.power_w, a.power_limit_w) == (
        0,
        "NVIDIA H200",
        37.0,
        1024.0,
        143771.0,
        41.0,
        121.5,
        700.0,
    )
    assert a.source == "nvidia-smi" and a.host == "box" and a.sampled_at == 123.0 and a.uuid.startswith("GPU-6c0f")
    assert b.power_w is None and b.power_limit_w is None and b.sm_clock_mhz == 210.0


def test_garbage_lines_are_skipped():
    assert parse_nvidia_smi("No devices were found\n", "box", 0.0) == []


def test_unit_of_this_process_is_read_from_its_cgroup():
    unit = unit_of(os.getpid())
    assert unit is None or unit.endswith(".service")
    assert unit_of(2**22 + 7) is None  # no such process


class Driver:
    """An older driver's libnvidia-ml as nvidia-ml-py meets it, answering through the real module's
    error classes: no _v3 process query (the unversioned call raises NVMLLibraryMismatchError, which is
    not an NVMLError), no ClocksEventReasons yet, and one unsupported reading."""

    def __init__(self, pynvml):
        self.real = pynvml

    def __getattr__(self, name):
        return getattr(self.real, name)

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"gpu{i}"

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        raise self.real.NVMLLibraryMismatchError(
            "Unversioned function called and the pyNVML version does not match the NVML lib version"
        )

    def nvmlDeviceGetComputeRunningProcesses_v2(self, h):
        from types import SimpleNamespace

        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=512 * 2**20)]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        raise self.real.NVMLError(self.real.NVML_ERROR_FUNCTION_NOT_FOUND)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return self.real.nvmlClocksThrottleReasonSwPowerCap | self.real.nvmlClocksThrottleReasonGpuIdle

    def nvmlDeviceGetPowerUsage(self, h):
        raise self.real.NVMLError(self.real.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetMemoryInfo(self, h):
        from types import SimpleNamespace

        return SimpleNamespace(used=2**30, total=8 * 2**30)

    def nvmlDeviceGetName(self, h):
        return "NVIDIA T4"

    def nvmlDeviceGetUUID(self, h):
        return "GPU-1"

    def nvmlDeviceGetUtilizationRates(self, h):
        from types import SimpleNamespace

        return SimpleNamespace(gpu=40)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 70_000

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 50

    def nvmlDeviceGetClockInfo(self, h, clock):
        return 1500


def test_nvml_reader_survives_an_older_driver():
    """A driver without the _v3 process query must not lose every sample (NVMLLibraryMismatchError
    escaped the NVMLError handler); throttle reasons come from whichever name the driver has."""
    import pytest

    pynvml = pytest.importorskip("pynvml")
    from services.gpu_stats.readers import NvmlReader

    reader = object.__new__(NvmlReader)  # no libnvidia-ml here: nvmlInit would fail
    reader.nvml, reader.count = Driver(pynvml), 1
    (s,) = reader.read("box")
    assert s.name == "NVIDIA T4" and s.util_pct == 40 and s.power_w is None and s.power_limit_w == 70.0
    assert [(p.pid, p.used_mb) for p in s.processes] == [(os.getpid(), 512)]
    assert sorted(s.throttle_reasons) == ["gpu_idle", "sw_power_cap"]
