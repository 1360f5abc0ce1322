"""gpu-stats as a process: no GPU here (it says so and stays up), and the nvidia-smi path end to end."""

from __future__ import annotations

import stat

from tests.integration.test_service_lifecycle import read_heartbeats
from tests.support import query, wait_until
from tests.unit.test_gpu_readers import RECORDED


def test_without_a_gpu_it_says_so_and_keeps_heartbeating(make_stack, nats_server):
    stack = make_stack(model="none", gpu_stats={"nvidia_smi": "/nonexistent/nvidia-smi", "interval_seconds": 0.5})
    stack.start("gpu-stats")
    stack.wait_ready("gpu-stats")
    beat = wait_until(
        lambda: next((v for k, v in read_heartbeats(nats_server.url).items() if k.startswith("gpu-stats.")), None),
        what="gpu-stats heartbeat",
    )
    assert beat.state == "ready" and beat.backend == "no GPU"
    assert stack.log("gpu-stats").count('"no GPU: nothing to sample"') == 1
    assert stack.procs["gpu-stats"].poll() is None
    assert stack.stop("gpu-stats") == 0


def test_samples_from_nvidia_smi_are_published_and_recorded_once_a_minute(make_stack, nats_server, database, tmp_path):
    """With the NVML library absent, gpu-stats reads nvidia-smi; the recorder keeps one row per GPU per minute."""
    fake = tmp_path / "nvidia-smi"  # stands in for the driver's tool, printing recorded output
    fake.write_text(f"#!/bin/sh\ncat <<'CSV'\n{RECORDED}CSV\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    stack = make_stack(model="none", gpu_stats={"nvidia_smi": str(fake), "interval_seconds": 0.2})
    stack.start("gpu-stats", "recorder")
    stack.wait_ready("gpu-stats", "recorder")
    rows = wait_until(
        lambda: query(database, "SELECT gpu_index, name, power_w, source FROM gpu_samples ORDER BY gpu_index"),
        what="gpu rows",
    )
    assert rows == [(0, "NVIDIA H200", 121.5, "nvidia-smi"), (1, "NVIDIA GeForce RTX 3050", None, "nvidia-smi")]
    assert query(database, "SELECT count(*) FROM gpu_samples")[0][0] <= 4  # many samples, at most 2 minutes x 2 GPUs
