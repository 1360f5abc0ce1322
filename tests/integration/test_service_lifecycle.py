"""A service as systemd sees it: config errors at start, sd_notify, graceful SIGTERM, poison messages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import nats
import nats.js.errors

from tests.support import REPO, stream_messages, wait_until


def run_service(name, config, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "run", name, str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        timeout=60,
        **kw,
    )


def test_bad_config_stops_at_start_naming_the_field(tmp_path):
    """A bad value exits with EX_CONFIG (78, which the units exclude from restarts) and names the field."""
    config = tmp_path / "bad.toml"
    config.write_text('[aggregator]\nidle_seconds = "thirty"\n')
    result = run_service("aggregator", config)
    assert result.returncode == 78
    assert "$.aggregator.idle_seconds" in result.stderr


def test_detector_without_model_says_how_to_get_one(tmp_path, nats_server):
    config = tmp_path / "vigil.toml"
    config.write_text(
        f'[nats]\nservers = ["{nats_server.url}"]\n[detector]\nmodel = "yolox-nano"\nmodels_dir = "{tmp_path}"\n'
    )
    result = run_service("detector", config)
    assert result.returncode == 78
    assert "yolox_nano.onnx" in result.stderr and "models_dir" in result.stderr


class NotifyReader:
    """A notify socket read by a thread until closed: nothing the test does depends on when it reads."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen += self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def detector_with_notify(tmp_path, nats_server, media, sock_path, extra: str = ""):
    config = tmp_path / "vigil.toml"
    config.write_text(
        f'media_root = "{media}"\nstate_dir = "{tmp_path}/state"\ndrain_seconds = 5.0\nheartbeat_seconds = 0.5\n'
        f'{extra}[nats]\nservers = ["{nats_server.url}"]\n[detector]\nmodel = "none"\n'
    )
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "run", "detector", str(config)],
        cwd=REPO,
        env={**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1500000"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sd_notify_lifecycle_and_graceful_stop(tmp_path, nats_server, media):
    """READY=1 after connect+provision, WATCHDOG=1 while alive, STATUS= counters, STOPPING=1, exit 0."""
    os.environ.pop("WATCHDOG_PID", None)
    reader = NotifyReader(tmp_path / "notify.sock")
    proc = detector_with_notify(tmp_path, nats_server, media, tmp_path / "notify.sock")
    try:

        def status_seen():
            return any(s.startswith("STATUS=") and "backend none" in s for s in reader.seen)

        wait_until(
            lambda: {"READY=1", "WATCHDOG=1"} <= set(reader.seen) and status_seen(),
            timeout=30,
            what="READY, WATCHDOG, STATUS",
        )
        assert reader.seen.index("READY=1") < reader.seen.index("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        wait_until(lambda: "STOPPING=1" in reader.seen, timeout=5, what="STOPPING=1")
    finally:
        proc.kill()
        reader.close()


def test_unread_notify_socket_never_freezes_a_service(tmp_path, nats_server, media):
    """A manager that never reads fills the datagram queue (max_dgram_qlen 10) within seconds. A blocking
    sendto froze the whole service there; now the service keeps heartbeating and stops on SIGTERM."""
    os.environ.pop("WATCHDOG_PID", None)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))  # bound, never read
    proc = detector_with_notify(tmp_path, nats_server, media, tmp_path / "notify.sock")
    try:
        first = wait_until(
            lambda: (h := read_heartbeats(nats_server.url)) and next(iter(h.values())), timeout=30, what="a heartbeat"
        )
        # 10 datagrams fill the queue after ~2.5 s at this watchdog period; heartbeats must go on well past that
        time.sleep(6)
        later = wait_until(
            lambda: (
                (h := read_heartbeats(nats_server.url))
                and (v := next(iter(h.values()))).sent_at > first.sent_at + 5
                and v
            ),
            timeout=10,
            what="heartbeats going on with a full notify queue",
        )
        assert later.state == "ready"
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read()
        assert time.monotonic() - stopped_at < 5 + 5  # drain bound plus the bus close bound
        assert read_heartbeats(nats_server.url)[next(iter(read_heartbeats(nats_server.url)))].state == "stopped"
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
    letters = wait_until(
        lambda: (m := stream_messages(nats_server.url, "DLQ")) and len(m) >= 4 and m, what="4 dead letters"
    )
    assert sorted(letter.stage for letter in letters) == ["aggregator", "detector", "detector", "recorder"]
    assert all("not a valid" in letter.reason for letter in letters)
    assert {letter.original_subject for letter in letters} == {
        "vigil.uploads.front_door",
        "vigil.detections.front_door",
    }
    for name in ("detector", "recorder", "aggregator"):
        assert stack.procs[name].poll() is None, f"{name} died"


def read_heartbeats(url: str) -> dict:
    import proto

    async def go():
        nc = await nats.connect(url)
        out = {}
        try:
            kv = await nc.jetstream().key_value("vigil_heartbeats")
            for key in await kv.keys():
                out[key] = proto.decode((await kv.get(key)).value)
        except nats.js.errors.NoKeysError:
            pass
        finally:
            await nc.close()
        return out

    async def safe():
        try:
            return await go()
        except nats.js.errors.BucketNotFoundError:
            return {}

    return asyncio.run(safe())


def test_heartbeats_in_kv_and_a_clean_stop_says_stopped(make_stack, nats_server):
    """Every service puts a Heartbeat into the vigil_heartbeats bucket; SIGTERM leaves state "stopped"."""
    import nats.js.errors  # noqa: F401

    stack = make_stack(model="none")
    stack.config.write_text(
        stack.config.read_text().replace("drain_seconds = 5.0", "drain_seconds = 5.0\nheartbeat_seconds = 0.5")
    )
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


def test_a_connection_whose_requests_go_unanswered_is_replaced_at_start(tmp_path, nats_server, media):
    """Seen when every unit restarts at once on a loaded box: one process's NATS connection stayed up
    (pings answered) while its provisioning requests went unanswered for minutes, until systemd's start
    timeout killed it; a new process was answered at once. Played here by a proxy in front of the real
    nats-server that, on its first connection only, passes the handshake and PING/PONG but drops every
    answer. The service must connect anew and become ready; before, it retried on that connection forever."""
    from services.runtime.config import load_config
    from services.runtime.service import Runtime
    from tests.support import write_config

    host, port = nats_server.url.removeprefix("nats://").split(":")
    connections = 0

    async def proxy(reader, writer):
        nonlocal connections
        connections += 1
        black_hole = connections == 1
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pipe(src, dst, filtered):
            handshake_done = False
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if filtered and handshake_done and set(data.split(b"\r\n")) - {b"PING", b"PONG", b"+OK", b""}:
                        continue  # an answer (MSG): dropped
                    handshake_done = handshake_done or b"PONG\r\n" in data
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, black_hole))

    async def go():
        server = await asyncio.start_server(proxy, "127.0.0.1", 0)
        url = f"nats://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        path = write_config(
            tmp_path / "vigil.toml", media=media, state=tmp_path / "state", nats_url=url,
            dsn="postgresql://unused@127.0.0.1:1/x", model="none", models_dir=None,
        )  # fmt: skip
        path.write_text(path.read_text().replace("reconnect_wait = 0.2", "reconnect_wait = 0.2\npublish_timeout = 1.0"))
        async with asyncio.timeout(60), Runtime.start("watcher", load_config(path, environ={})):
            pass  # ready: provisioned
        server.close()

    asyncio.run(go())
    assert connections >= 2
