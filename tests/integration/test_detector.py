"""The detector for real: the YOLOX-Nano model, clips, GPU->CPU fallback, `vigil models pull`."""

from __future__ import annotations

import functools
import hashlib
import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from services.detector.catalog import CatalogEntry, pull
from services.detector.engine import Engine
from services.detector.media import decode_image
from services.runtime.config import DetectorConfig
from tests.integration.test_pipeline import ALL, drained
from tests.support import REPO, drop, photo_bytes, query, wait_until


@pytest.mark.parametrize(
    "photo, label", [("astronaut", "person"), ("camera", "person"), ("chelsea", "cat"), ("coffee", "cup")]
)
def test_real_model_on_the_photos(models_dir, tmp_path, photo, label):
    """YOLOX-Nano on ONNX Runtime (CPU) finds what each scikit-image photo shows."""
    engine = Engine(
        DetectorConfig(model="yolox-nano", models_dir=str(models_dir), backend="cpu"), tmp_path, lambda *a: None
    )
    image, w, h = decode_image(photo_bytes(photo), engine.size)
    ((boxes, _ms),) = engine.run([engine.prepare(image)])
    assert engine.name == "onnxruntime:cpu" and engine.info.family == "yolox"
    best = max((b for b in boxes if b.label == label), key=lambda b: b.score)
    assert best.score > 0.5 and 0 <= best.x1 < best.x2 <= w and 0 <= best.y1 < best.y2 <= h


def make_clip(path: Path, fps: int = 10) -> float:
    """2 s of the astronaut, then 2 s of the cat, as an MJPG AVI; returns the duration."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (512, 512))
    assert writer.isOpened()
    for name in ("astronaut", "chelsea"):
        photo = decode_image(photo_bytes(name))[0]
        scale = 512 / max(photo.shape[:2])
        photo = cv2.resize(photo, None, fx=scale, fy=scale)
        frame = np.zeros((512, 512, 3), np.uint8)  # undistorted, padded: the cat stays recognisable
        frame[: photo.shape[0], : photo.shape[1]] = photo
        for _ in range(2 * fps):
            writer.write(frame)
    writer.release()
    return 4.0


def test_clip_frames_are_sampled_with_their_offsets(make_stack, media, database, nats_server, models_dir, tmp_path):
    """A clip yields one Detections per sampled frame (2 fps), timed clip start + offset."""
    stack = make_stack(
        model="yolox-nano", models=models_dir, detector={"clip_fps": 2.0, "backend": "cpu", "batch_wait_ms": 50.0}
    )
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    clip = tmp_path / "drive.avi"
    duration = make_clip(clip)
    mtime = time.time() - 50
    drop(media / "backyard" / "drive.avi", clip.read_bytes(), mtime)
    rows = wait_until(
        lambda: (
            (
                r := query(
                    database,
                    "SELECT frame, offset_s, labels, extract(epoch from captured_at) FROM detections ORDER BY frame",
                )
            )
            and len(r) == 8
            and r
        ),
        what="8 sampled frames",
    )
    assert [r[0] for r in rows] == [0, 5, 10, 15, 20, 25, 30, 35]
    assert [r[1] for r in rows] == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5])
    assert all("person" in r[2] for r in rows[:4]) and all("cat" in r[2] for r in rows[4:])
    assert [float(r[3]) for r in rows] == pytest.approx([mtime - duration + r[1] for r in rows], abs=0.01)
    wait_until(lambda: drained(nats_server.url), what="clip acked once all frames were published")


def test_broken_clip_is_dead_lettered(make_stack, media, database, nats_server):
    stack = make_stack(model="none")
    stack.start("watcher", "detector", "recorder", "aggregator")
    stack.wait_ready("watcher", "detector", "recorder", "aggregator")
    # whole by its boxes (ftyp, then a moov of zeros), so past the watcher's check; nothing a demuxer can play
    moov = b"\x00" * 5000
    drop(
        media / "backyard" / "broken.mp4",
        b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 12 + (len(moov) + 8).to_bytes(4, "big") + b"moov" + moov,
    )
    from tests.support import stream_messages

    letters = wait_until(lambda: stream_messages(nats_server.url, "DLQ"), what="dead letter")
    assert letters[0].stage == "detector" and "clip" in letters[0].reason


@pytest.mark.parametrize("plugin, degraded_after", [("BrokenAtInit", 0), ("FailsAfterBatches", 2)])
def test_gpu_failure_falls_back_to_cpu_without_losing_files(
    make_stack, media, database, nats_server, models_dir, plugin, degraded_after
):
    """A GPU that fails at init or mid-run: CPU results keep flowing, degraded STATUS, an Alert, no loss."""
    stack = make_stack(
        model="yolox-nano",
        models=models_dir,
        detector={
            "backend": f"plugin:tests.fake_accelerators:{plugin}",
            "batch_size": 2,
            "batch_wait_ms": 0.0,
            "gpu_max_errors": 1,
            "gpu_retry_seconds": 3600.0,
        },
    )
    stack.env["VIGIL_TEST_FAIL_AFTER"] = str(degraded_after)
    stack.start(*ALL)
    stack.wait_ready(*ALL)
    n = 12
    for i in range(n):
        drop(media / "front_door" / f"p{i}.jpg", photo_bytes("astronaut", quality=70 + i))
        time.sleep(0.05)
    wait_until(lambda: len(query(database, "SELECT 1 FROM detections")) == n, timeout=90, what="every file detected")
    assert all("person" in r[0] for r in query(database, "SELECT labels FROM detections"))
    alerts = wait_until(
        lambda: query(database, "SELECT kind, severity, message FROM alerts WHERE camera = 'system'"),
        what="fallback alert",
    )
    assert alerts[0][0] == "detector_cpu_fallback" and alerts[0][1] == "critical"
    assert ("libcuda" if plugin == "BrokenAtInit" else "out of memory") in alerts[0][2]
    log = stack.log("detector")
    assert "GPU backend failed: running on the CPU" in log
    assert stack.procs["detector"].poll() is None  # no restart, no crash loop
    wait_until(lambda: drained(nats_server.url), what="nothing unacked")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def model_server(models_dir):
    """A real HTTP server on loopback serving the models folder (a local mirror)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(models_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_models_pull_installs_a_verified_file(model_server, models_dir, tmp_path):
    data = (models_dir / "yolox_nano.onnx").read_bytes()
    entry = CatalogEntry(
        "test",
        "yolox_nano.onnx",
        f"{model_server}/yolox_nano.onnx",
        len(data),
        hashlib.sha256(data).hexdigest(),
        "yolox",
        "test",
    )
    path = pull(entry, tmp_path / "models")
    assert path.read_bytes() == data and sorted(p.name for p in (tmp_path / "models").iterdir()) == ["yolox_nano.onnx"]


def test_models_pull_refuses_a_file_with_the_wrong_hash(model_server, tmp_path):
    """The mirror serves a different export than the catalog names: refused, nothing left behind."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "models",
            "pull",
            "yolox-nano",
            "--models-dir",
            str(tmp_path / "m"),
            "--url",
            f"{model_server}/yolox_nano.onnx",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 1
    assert "nothing was installed" in result.stderr and ("sha256" in result.stderr or "bytes" in result.stderr)
    assert list((tmp_path / "m").iterdir()) == []
