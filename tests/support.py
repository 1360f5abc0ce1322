"""Helpers shared by integration tests and benchmarks: real servers, real service processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import psycopg

from services.cli.stack import die_with_parent

REPO = Path(__file__).resolve().parent.parent


def find_models_dir() -> Path | None:
    for candidate in (os.environ.get("VIGIL_MODELS_DIR"), REPO.parent / "shared" / "models"):
        if candidate and (Path(candidate) / "yolox_nano.onnx").is_file():
            return Path(candidate).resolve()
    return None


def photo_bytes(name: str, quality: int = 92, scale: float = 1.0) -> bytes:
    """One of scikit-image's bundled photos (astronaut, camera, chelsea, coffee) as JPEG bytes."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if scale != 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def tagged(jpeg: bytes, *tag: int) -> bytes:
    """The same JPEG with a comment segment (COM) holding `tag` after its SOI: distinct bytes, so a
    distinct file id, and still a whole JPEG (its end marker kept: the watcher holds a file without one)."""
    body = bytes(tag)
    return jpeg[:2] + b"\xff\xfe" + (len(body) + 2).to_bytes(2, "big") + body + jpeg[2:]


def drop(path: Path, data: bytes, mtime: float | None = None) -> Path:
    """Place a file the way a careful uploader does: write hidden, set mtime, rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")  # hidden while being written: the watcher ignores it
    tmp.write_bytes(data)
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    os.replace(tmp, path)
    return path


def write_config(
    path: Path,
    *,
    media: Path,
    state: Path,
    nats_url: str | list[str],
    dsn: str,
    model: str,
    models_dir: Path | None,
    **sections,
) -> Path:
    """A TOML config for test services; `sections` override per-section values, e.g. aggregator={...}."""
    base = {
        "watcher": {"settle_seconds": 0.5, "rescan_seconds": 30.0, "incomplete_seconds": 3.0},
        "detector": {
            "model": model,
            "models_dir": str(models_dir or "/nonexistent"),
            "batch_size": 8,
            "fetch_timeout": 0.5,
        },
        "aggregator": {"idle_seconds": 3.0, "max_seconds": 20.0},
        "recorder": {"fetch_timeout": 0.2},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = [
        f'media_root = "{media}"',
        f'state_dir = "{state}"',
        'log_format = "json"',
        'log_level = "debug"',
        "drain_seconds = 5.0",
        f"[nats]\nservers = {toml_value(nats_url if isinstance(nats_url, list) else [nats_url])}\nreconnect_wait = 0.2",
        f'[database]\ndsn = "{dsn}"',
    ]
    for name, values in base.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"{k} = {toml_value(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def toml_value(v) -> str:
    """Enough TOML for test configs: JSON's strings, numbers and arrays are valid TOML; booleans are
    lower case; tables are written inline."""
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):  # an inline table; quoted keys are valid TOML
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


class Services:
    """Starts vigil services as real subprocesses (`vigil run NAME CONFIG`), as systemd would."""

    def __init__(self, config: Path, logs: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.logs = config, logs
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, *names: str) -> None:
        for name in names:
            with open(self.logs / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "services.cli.main", "run", name, str(self.config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=REPO,
                    preexec_fn=die_with_parent,
                )

    def wait_ready(self, *names: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            while '"event": "ready"' not in self.log(name):
                if self.procs[name].poll() is not None:
                    raise AssertionError(f"{name} exited with {self.procs[name].returncode}:\n{self.log(name)[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} not ready within {timeout}s:\n{self.log(name)[-3000:]}")
                time.sleep(0.05)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str, timeout: float = 20.0) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop_all(self, timeout: float = 20.0) -> dict[str, int]:
        """SIGTERM to every service at once, then wait for each: they drain side by side (one after
        another, each waiting out its last fetch, cost the suite minutes)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        deadline = time.monotonic() + timeout
        for name in list(self.procs):
            proc = self.procs.pop(name)
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[name] = -9
        return codes


def vigil_json(config, *args: str, timeout: float = 60, env: dict[str, str] | None = None):
    """`vigil ARGS --config CONFIG --json` as a real subprocess: its parsed output (it must succeed)."""
    out = subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args, "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "VIGIL_CONFIG": "", **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


async def wait_until_async(probe, what: str = "condition", timeout: float = 60.0, interval: float = 0.2):
    """wait_until for async tests: await `probe()` until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


def query(dsn: str, sql: str, *params):
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            return conn.execute(sql, params).fetchall()
    except psycopg.errors.UndefinedTable:
        return []


def count_rows(dsn: str, table: str = "detections") -> int:
    """Rows in `table`; 0 while the recorder has not created it yet."""
    return (query(dsn, f"SELECT count(*) FROM {table}") or [(0,)])[0][0]


def consumer_states(nats_url: str) -> dict[str, tuple[int, int]]:
    """{durable: (num_pending, num_ack_pending)} for every vigil consumer."""
    import nats

    from proto.topology import CONSUMERS

    async def go():
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        out = {}
        for c in CONSUMERS:
            info = await js.consumer_info(c.stream, c.durable)
            out[c.durable] = (info.num_pending, info.num_ack_pending)
        await nc.close()
        return out

    return asyncio.run(go())


def stream_messages(nats_url: str, stream: str) -> list:
    """Every message currently stored in `stream`, decoded (for DLQ assertions)."""
    import nats

    import proto
    from services.runtime.jetstream import stored_messages

    async def go():
        nc = await nats.connect(nats_url)
        out = [proto.decode(raw.data, raw.headers) async for _, raw in stored_messages(nc.jetstream(), stream)]
        await nc.close()
        return out

    return asyncio.run(go())


def recorded_detections(dsn: str) -> list:
    """The detections with boxes as PostgreSQL holds them (what the event contract is computed from)."""
    import msgspec

    from proto import Box, Detections

    rows = query(
        dsn, "SELECT detection_id, camera, extract(epoch from captured_at), boxes FROM detections WHERE box_count > 0"
    )
    return [
        Detections(file_id=r[0], camera=r[1], path="", captured_at=float(r[2]), width=1, height=1, model="", inference_ms=0.0,
                   boxes=[Box(*b) for b in msgspec.json.decode(json.dumps(r[3]).encode())])
        for r in rows
    ]  # fmt: skip


class LoopbackHTTP:
    """A real HTTP server on 127.0.0.1 (aiohttp, in its own thread and loop) whose answers a test sets:
    `handler` is an async function (request, n) -> aiohttp.web.Response, n counting from 1. Every request
    is kept in `requests` as (path, headers, body); `accepted` counts the answers that reached a client
    still connected (what "the target accepted it" means to the sender)."""

    def __init__(self, handler=None, port: int = 0) -> None:
        import threading

        from aiohttp import web

        self.handler = handler or (lambda request, n: _ok())
        self.requests: list[tuple[str, dict, bytes]] = []
        self.accepted: list[bytes] = []
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def handle(request):
            body = await request.read()
            self.requests.append((request.path, dict(request.headers), body))
            response = await self.handler(request, len(self.requests))
            transport = request.transport
            if response.status < 300 and transport is not None and not transport.is_closing():
                self.accepted.append(body)
            return response

        async def start():
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            self._runner = web.AppRunner(app, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()

        def serve():
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(start())
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        async def stop():
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _ok(status: int = 200, body: str = "ok"):
    from aiohttp import web

    return web.Response(status=status, text=body)
