"""The detector's GPU paths through the running service, with accelerators that fail the way real ones
do (tests/fake_accelerators.py): a sticky CUDA error, an engine build that never finishes, a stop
during that build. Real nats-server, PostgreSQL, model and processes; only the accelerator is a stand-in.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from tests.integration.test_pipeline import ALL
from tests.integration.test_service_lifecycle import NotifyReader
from tests.support import consumer_states, drop, photo_bytes, query, wait_until

EX_TEMPFAIL = 75


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_sticky_cuda_error_finishes_the_batch_on_the_cpu_then_exits_for_a_restart(
    make_stack, media, database, nats_server, models_dir
):
    """cudaErrorIllegalAddress poisons the process's CUDA context for good: the batch it hit is
    detected on the CPU and acked, then the detector exits 75 (not 78: systemd restarts it); the next
    process starts clean and goes on. Nothing is lost or left unacked."""
    stack = make_stack(
        model="yolox-nano",
        models=models_dir,
        detector={
            "backend": "plugin:tests.fake_accelerators:StickyAfterBatches",
            "batch_size": 2,
            "batch_wait_ms": 0.0,
            "gpu_max_errors": 3,
            "gpu_retry_seconds": 3600.0,
        },
    )
    stack.env["VIGIL_TEST_FAIL_AFTER"] = "2"  # the warm-up before READY, then the first file's batch
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    drop(media / "front_door" / "p0.jpg", photo_bytes("astronaut", quality=71))
    wait_until(
        lambda: len(query(database, "SELECT 1 FROM detections")) == 1, timeout=60, what="the first file, on the 'GPU'"
    )
    drop(media / "front_door" / "p1.jpg", photo_bytes("astronaut", quality=72))
    proc = stack.procs["detector"]
    wait_until(lambda: proc.poll() is not None, timeout=60, what="the detector to exit")
    assert proc.returncode == EX_TEMPFAIL
    log = stack.log("detector")
    assert "sticky CUDA error" in log and "cudaErrorIllegalAddress" in log and "exiting for a restart" in log
    wait_until(
        lambda: len(query(database, "SELECT 1 FROM detections")) == 2,
        timeout=60,
        what="the poisoned batch, detected on the CPU",
    )
    assert all("person" in r[0] for r in query(database, "SELECT labels FROM detections"))
    assert consumer_states(nats_server.url)["detector"] == (0, 0)  # acked before the exit: nothing to redeliver
    recorded = (make_stack_state(stack) / "engines" / "sticky-cuda-errors").read_text().split()
    assert len(recorded) == 1  # remembered: past three in an hour the GPU stays off (unit-tested)
    stack.env["VIGIL_TEST_FAIL_AFTER"] = "1000"  # what a restart is for: a fresh context that works
    stack.procs.pop("detector")
    stack.start("detector")
    stack.wait_ready("detector", timeout=60)
    drop(media / "front_door" / "p2.jpg", photo_bytes("astronaut", quality=73))
    wait_until(
        lambda: len(query(database, "SELECT 1 FROM detections")) == 3, timeout=60, what="the restarted detector at work"
    )
    assert stack.procs["detector"].poll() is None


def make_stack_state(stack) -> Path:
    return stack.config.parent / "state"


def build_pid(log: str) -> int:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return next(e["pid"] for e in lines if e.get("event") == "engine build started")


def test_an_engine_build_past_its_timeout_is_stopped_and_the_detector_starts_on_the_cpu(
    make_stack, tmp_path, models_dir
):
    """Before READY the start timeout is extended while the build runs (EXTEND_TIMEOUT_USEC), so systemd
    never kills a healthy build and rebuilds from scratch forever; a build past
    engine_build_timeout_seconds is killed, its temporary file removed, and the detector comes up on
    the CPU, degraded, saying why. A temporary file left by an earlier killed build is removed too."""
    engines = tmp_path / "state" / "engines"
    engines.mkdir(parents=True)
    (engines / "slow-test.engine.4194999.tmp").write_bytes(b"from a build killed with the machine")  # no such pid
    reader = NotifyReader(tmp_path / "notify.sock")
    stack = make_stack(
        model="yolox-nano",
        models=models_dir,
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")},
        detector={"backend": "plugin:tests.fake_accelerators:SlowBuild", "engine_build_timeout_seconds": 8.0},
    )
    try:
        stack.start("detector")
        stack.wait_ready("detector", timeout=90)
        log = stack.log("detector")
        child = build_pid(log)
        assert "engine build took too long" in log and not alive(child)
        assert not list(engines.glob("*.tmp"))  # the killed build's and the stale one
        extends = [s for s in reader.seen if s.startswith("EXTEND_TIMEOUT_USEC=")]
        assert len(extends) >= 2 and all(int(s.split("=")[1]) >= 10_000_000 for s in extends)
        assert reader.seen.index(extends[-1]) < reader.seen.index("READY=1")
        wait_until(
            lambda: any("degraded: cpu fallback" in s and "engine build stopped after 8 s" in s for s in reader.seen),
            timeout=10,
            what="STATUS naming the CPU fallback and why",
        )
    finally:
        reader.close()


def test_sigterm_during_the_engine_build_stops_it_and_the_detector_at_once(make_stack, tmp_path, models_dir):
    """A stop before READY (systemctl stop during a long first build) ends the build and the detector
    within seconds, exit 0, STOPPING=1 sent, no temporary file left."""
    engines = tmp_path / "state" / "engines"
    reader = NotifyReader(tmp_path / "notify.sock")
    stack = make_stack(
        model="yolox-nano",
        models=models_dir,
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")},
        detector={"backend": "plugin:tests.fake_accelerators:SlowBuild", "engine_build_timeout_seconds": 600.0},
    )
    try:
        stack.start("detector")
        wait_until(
            lambda: '"engine build started"' in stack.log("detector") and list(engines.glob("*.tmp")),
            timeout=60,
            what="the build running",
        )
        child = build_pid(stack.log("detector"))
        assert alive(child)
        proc = stack.procs["detector"]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        print(f"stopped {time.monotonic() - started:.2f} s after SIGTERM")
        assert not alive(child) and not list(engines.glob("*.tmp"))
        assert "STOPPING=1" in reader.seen and "READY=1" not in reader.seen
        assert '"event": "ready"' not in stack.log("detector")
    finally:
        reader.close()
