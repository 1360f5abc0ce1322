"""Command A: `vigil up` starts the embedded servers and every service, and Ctrl-C stops it all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from services.cli.stack import free_port
from tests.support import REPO, drop, photo_bytes, wait_until


def test_vigil_up_runs_the_pipeline_and_stops_cleanly_on_ctrl_c(tmp_path):
    home = tmp_path / "home"
    out = tmp_path / "up.log"
    # model "none": fast and model-free; the first-run pull finds nothing to download from (offline)
    env = {**os.environ, "VIGIL_MODELS_DIR": str(tmp_path / "no-models"), "VIGIL_MODEL_URL": "http://127.0.0.1:9/"}
    with open(out, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli.main",
                "up",
                "--home",
                str(home),
                "--nats-port",
                str(free_port()),
                "--pg-port",
                str(free_port()),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    try:
        wait_until(lambda: "Ctrl-C stops everything" in out.read_text(), timeout=60, what="the banner")
        text = out.read_text()
        assert (
            f"{home / 'media' / 'front_door'}/" in text
            and "model: none" in text
            and "NOTE: no yolox_nano.onnx" in text
            and "NOTE: could not pull the model" in text
        )
        drop(home / "media" / "front_door" / "a.jpg", photo_bytes("coffee", scale=0.2))
        wait_until(lambda: "1 files detected" in out.read_text(), timeout=60, what="the summary line")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert "vigil: stopped." in text
    for name in ("watcher", "detector", "aggregator", "recorder"):
        assert '"event": "stopped"' in (home / "logs" / f"{name}.log").read_text(), name
    assert "database system is shut down" in (home / "logs" / "postgres.log").read_text()
    assert "Server Exiting" in (home / "logs" / "nats-server.log").read_text()
    time.sleep(0.2)
    leftovers = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True).stdout.split()
    assert leftovers == []
