"""A service as systemd sees it: config errors at start, sd_notify, graceful SIGTERM, poison messages."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import nats

from tests.support import REPO, stream_messages, wait_until


def run_service(name, config, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "services.cli", "run", name, str(config)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=60, **kw)


def test_bad_config_stops_at_start_naming_the_field(tmp_path):
    """A bad value exits with EX_CONFIG (78, which the units exclude from restarts) and names the field."""
    config = tmp_path / "bad.toml"
    config.write_text('[aggregator]\nidle_seconds = "thirty"\n')
    result = run_service("aggregator", config)
    assert result.returncode == 78
    assert "$.aggregator.idle_seconds" in result.stderr


def test_detector_without_model_says_how_to_get_one(tmp_path, nats_server):
    config = tmp_path / "vigil.toml"
    config.write_text(f'[nats]\nservers = ["{nats_server.url}"]\n[detector]\nmodel = "yolox-nano"\nmodels_dir = "{tmp_path}"\n')
    result = run_service("detector", config)
    assert result.returncode == 78
    assert "yolox_nano.onnx" in result.stderr and "models_dir" in result.stderr


def test_sd_notify_lifecycle_and_graceful_stop(tmp_path, nats_server, media):
    """READY=1 after connect+provision, WATCHDOG=1 while alive, STATUS= counters, STOPPING=1, exit 0."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    config = tmp_path / "vigil.toml"
    config.write_text(f'media_root = "{media}"\nstate_dir = "{tmp_path}/state"\n[nats]\nservers = ["{nats_server.url}"]\n'
                      '[detector]\nmodel = "none"\n')
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "detector", str(config)], cwd=REPO,
                            env={**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1500000"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.pop("WATCHDOG_PID", None)
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 20
        def status_seen():
            return any(s.startswith("STATUS=") and "backend none" in s for s in seen)

        while not ({"READY=1", "WATCHDOG=1"} <= set(seen) and status_seen()) and time.monotonic() < deadline:
            seen += sock.recv(4096).decode().split("\n")
        assert "READY=1" in seen and "WATCHDOG=1" in seen
        assert status_seen(), seen
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen:
            seen += sock.recv(4096).decode().split("\n")
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        sock.close()


def test_undecodable_message_is_dead_lettered_not_crash_looped(make_stack, nats_server, database):
    """Garbage published straight onto an upload subject is dead-lettered; the detector keeps going."""
    stack = make_stack(model="none")
    stack.start("detector", "recorder", "aggregator")
    stack.wait_ready("detector", "recorder", "aggregator")

    async def publish():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.publish("vigil.uploads.front_door", b"\x00\xffnot json")
        await js.publish("vigil.uploads.front_door", b'{"type": "FileUploaded", "camera": 1}')
        await js.publish("vigil.detections.front_door", b"[]")
        await nc.close()

    asyncio.run(publish())
    # two bad uploads (detector) and one bad detection, which both of its consumers refuse
    letters = wait_until(lambda: (m := stream_messages(nats_server.url, "DLQ")) and len(m) >= 4 and m, what="4 dead letters")
    assert sorted(letter.stage for letter in letters) == ["aggregator", "detector", "detector", "recorder"]
    assert all("not a valid" in letter.reason for letter in letters)
    assert {letter.original_subject for letter in letters} == {"vigil.uploads.front_door", "vigil.detections.front_door"}
    for name in ("detector", "recorder", "aggregator"):
        assert stack.procs[name].poll() is None, f"{name} died"


def read_heartbeats(url: str) -> dict:
    import proto

    async def go():
        nc = await nats.connect(url)
        kv = await nc.jetstream().key_value("vigil_heartbeats")
        out = {}
        try:
            for key in await kv.keys():
                out[key] = proto.decode((await kv.get(key)).value)
        except nats.js.errors.NoKeysError:
            pass
        await nc.close()
        return out

    return asyncio.run(go())


def test_heartbeats_in_kv_and_a_clean_stop_says_stopped(make_stack, nats_server):
    """Every service puts a Heartbeat into the vigil_heartbeats bucket; SIGTERM leaves state "stopped"."""
    import nats.js.errors  # noqa: F401

    stack = make_stack(model="none")
    stack.config.write_text(stack.config.read_text().replace("drain_seconds = 5.0", "drain_seconds = 5.0\nheartbeat_seconds = 0.5"))
    stack.start("aggregator", "detector")
    stack.wait_ready("aggregator", "detector")
    beats = wait_until(lambda: (h := read_heartbeats(nats_server.url)) and len(h) == 2 and h, what="two heartbeats")
    agg = next(v for k, v in beats.items() if k.startswith("aggregator."))
    det = next(v for k, v in beats.items() if k.startswith("detector."))
    assert agg.state == "ready" and agg.pid == stack.procs["aggregator"].pid and time.time() - agg.sent_at < 5
    assert det.backend and "backend none" in det.backend and det.last_progress and time.time() - det.last_progress < 5
    assert stack.stop("aggregator") == 0
    after = read_heartbeats(nats_server.url)
    assert next(v for k, v in after.items() if k.startswith("aggregator.")).state == "stopped"


def test_world_readable_secret_stops_the_service_naming_the_file(make_stack, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "nats-password").write_text("s3cret\n")
    (creds / "nats-password").chmod(0o644)
    stack = make_stack(model="none", env={"CREDENTIALS_DIRECTORY": str(creds)})
    stack.start("watcher")
    assert stack.procs["watcher"].wait(30) == 78
    assert f"credential file {creds / 'nats-password'} is readable by other users" in stack.log("watcher")
