"""`vigil up`: the whole pipeline on one machine with nothing but Python installed.

Starts the embedded nats-server and PostgreSQL with their state under --home, writes a config file,
starts every service as its own process (restarting one that dies, as systemd would), prints where
to drop images and how to look at results. Ctrl-C drains the services, then stops the servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from proto.topology import SERVICES
from services.cli.stack import NatsServer, Postgres, die_with_parent
from services.runtime.service import EX_CONFIG

DEMO_CAMERAS = ("front_door", "backyard")


def write_config(
    home: Path,
    nats: NatsServer,
    pg: Postgres,
    models_dir: Path,
    model: str,
    web_port: int = 8470,
    health_port: int = 9470,
) -> Path:
    path = home / "vigil.toml"
    path.write_text(
        "# Written by `vigil up`; every option is described in services/runtime/config.py\n"
        f'media_root = "{home / "media"}"\n'
        f'state_dir = "{home / "state"}"\n'
        'log_format = "json"\n'
        "drain_seconds = 10.0\n\n"
        f'[nats]\nservers = ["{nats.url}"]\n\n'
        f'[database]\ndsn = "{pg.dsn()}"\n\n'
        f'[detector]\nmodel = "{model}"\nmodels_dir = "{models_dir}"\n\n'
        "[aggregator]\nidle_seconds = 30.0\nmax_seconds = 90.0\n\n"
        f"[health]\nhttp_port = {health_port}\n\n"
        f"[web]\nhttp_port = {web_port}\n"
        f'[notify]\nweb_url = "http://127.0.0.1:{web_port}"\n'
    )
    return path


def find_or_pull_model(models_dir: Path, home: Path) -> tuple[Path, str, str | None]:
    """(models dir, model, what to tell the user). The model where it was asked for, else in
    <home>/models, else pulled there once - hash-checked by `vigil models pull`'s own code - so a fresh
    clone detects things on its first run; offline, model "none", said so."""
    from services.detector.catalog import CATALOG, PullError, pull

    entry = CATALOG["yolox-nano"]
    for folder in (models_dir, (home / "models").resolve()):
        if (folder / entry.file).is_file():
            return folder, entry.name, None
    target = (home / "models").resolve()
    print(f"vigil: no {entry.file} found; pulling it into {target} (once, sha256 checked)...", flush=True)
    try:
        pull(entry, target, url=os.environ.get("VIGIL_MODEL_URL"), timeout=30)
    except PullError as exc:
        return (
            models_dir,
            "none",
            f"NOTE: could not pull the model ({exc}); offline? `vigil models pull yolox-nano` later",
        )
    return target, entry.name, f"pulled {entry.file} ({entry.size:,} bytes, sha256 checked) into {target}"


def web_login(home: Path) -> str:
    """The web UI's password: made once, kept in <home>/web-password.txt (0600) for the person who ran
    `vigil up`; the services get only its bcrypt hash, as credential web-password."""
    from services.runtime.files import write_secret
    from services.web.auth import hash_password

    creds = home / "credentials"
    creds.mkdir(mode=0o700, exist_ok=True)
    clear = home / "web-password.txt"
    if not clear.is_file() or not (creds / "web-password").is_file():
        password = secrets.token_urlsafe(12)
        write_secret(clear, password)
        write_secret(creds / "web-password", hash_password(password))
    return clear.read_text().strip()


class Control:
    """`vigil up`'s control socket (<state>/up.sock): the web UI's Services page asks it to start, stop
    or restart a service, one JSON line each way. The socket is made 0600 (umask 0177 around bind):
    only the user who ran `vigil up` (and so its services) can reach it. Requests are queued and carried out by the
    supervisor's own loop, so the supervisor is only ever touched from one thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: queue.Queue[tuple[str, str, queue.Queue[str]]] = queue.Queue()
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        self.sock.listen(8)
        threading.Thread(target=self.serve, daemon=True, name="up-control").start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(90)
            try:
                line = conn.makefile("rb").readline(4096)
                req = json.loads(line)
                action, service = str(req["action"]), str(req["service"])
            except (OSError, ValueError, KeyError, TypeError):
                return
            reply: queue.Queue[str] = queue.Queue()
            self.requests.put((action, service, reply))
            try:
                result = reply.get(timeout=80)
            except queue.Empty:
                result = "the supervisor did not answer in time"
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"result": result}).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Supervisor:
    """Runs each service as a child process and restarts it if it dies (not while stopping)."""

    def __init__(self, config: Path, logs: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.logs = config, logs
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
        self.held: set[str] = set()  # stopped by an operator: not restarted until started again

    def act(self, action: str, name: str) -> str:
        """An operator's start, stop or restart (from the web UI through the control socket)."""
        if name not in SERVICES or action not in ("start", "stop", "restart"):
            return f"refused: {action} {name}"
        proc = self.procs.get(name)
        if action in ("stop", "restart"):
            self.held.add(name)  # a crash-looping service is what one stops: check() must not revive it
        if action in ("stop", "restart") and proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if action in ("start", "restart"):
            self.held.discard(name)
            if self.procs.get(name) is None or self.procs[name].poll() is not None:
                self.spawn(name)
        print(f"  [{time.strftime('%H:%M:%S')}] {name}: {action} (asked through the web UI)", flush=True)
        return "ok"

    def spawn(self, name: str) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
            # Own session: Ctrl-C reaches only us, and we send each service exactly one SIGTERM, so it
            # drains instead of taking the terminal's SIGINT as a second "stop now" signal.
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "run", name, str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
                env=self.env,
            )

    def check(self) -> None:
        for name, proc in self.procs.items():
            if name in self.held:
                continue
            if proc.poll() == EX_CONFIG:
                log = (self.logs / f"{name}.log").read_text().strip().splitlines()
                raise SystemExit(f"{name} refused its configuration: {log[-1] if log else '?'}")
            if proc.poll() is not None:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                print(
                    f"  {name} exited with {proc.returncode}; restarting (see {self.logs / (name + '.log')})",
                    flush=True,
                )
                time.sleep(min(self.restarts[name], 5))
                self.spawn(name)

    def stop(self, timeout: float) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"  {name} did not drain in time: killed", flush=True)
                proc.kill()
                proc.wait()


def summary(dsn: str) -> str:
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            det, boxes = conn.execute("SELECT count(*), coalesce(sum(box_count), 0) FROM detections").fetchone()
            events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            last = conn.execute(
                "SELECT camera, path, labels FROM detections ORDER BY recorded_at DESC LIMIT 1"
            ).fetchone()
    except psycopg.Error:
        return "waiting for the database schema..."
    tail = f"; latest {last[0]}/{Path(last[1]).name}: {', '.join(last[2]) or 'nothing'}" if last else ""
    return f"{det} files detected ({boxes} boxes), {events} events{tail}"


def up(args) -> int:
    home = Path(args.home).resolve()
    for sub in ("media", "state", "logs", "nats", "pg"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    for cam in DEMO_CAMERAS:
        (home / "media" / cam).mkdir(exist_ok=True)
    models_dir = Path(args.models_dir or os.environ.get("VIGIL_MODELS_DIR") or home / "models").resolve()
    models_dir, model, model_note = find_or_pull_model(models_dir, home)

    # Ctrl-C goes to the whole foreground process group; we want the servers to outlive the services,
    # so they run in their own sessions and we stop everything in order ourselves.
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    print(f"vigil: starting NATS and PostgreSQL in {home}", flush=True)
    nats = NatsServer(home / "nats", port=args.nats_port, log_file=home / "logs" / "nats-server.log").start()
    pg = Postgres(home / "pg", port=args.pg_port, log_file=home / "logs" / "postgres.log").start()
    config = write_config(home, nats, pg, models_dir, model, args.web_port, args.health_port)
    password = web_login(home)
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(home / "credentials")}
    sup = Supervisor(config, home / "logs", env)
    control = Control(home / "state" / "up.sock")
    try:
        for name in SERVICES:
            sup.spawn(name)
        print(
            f"""
vigil is running ({", ".join(SERVICES)}), model: {model}
  drop images into   {home / "media" / DEMO_CAMERAS[0]}/   or   {home / "media" / DEMO_CAMERAS[1]}/
                     (any new folder under {home / "media"} is a new camera)
  results            {pg.bindir() / "psql"} {pg.dsn()} -c 'SELECT camera, path, labels FROM detections'
  the bus            nats --server {nats.url} stream ls   |   nats --server {nats.url} sub 'vigil.>'
  logs               {home / "logs"}/<service>.log
  web UI             http://127.0.0.1:{args.web_port}/   user admin, password {password}
                     (kept in {home / "web-password.txt"}; status page http://127.0.0.1:{args.health_port}/)
  config             {config}
Ctrl-C stops everything (services drain first, then the servers).""",
            flush=True,
        )
        if model_note:
            print(f"\n  {model_note}", flush=True)
        if model == "none":
            print(
                f"\n  NOTE: no yolox_nano.onnx in {models_dir}: the detector runs with model 'none' (zero boxes).\n"
                "  Put the model there or pass --models-dir / set VIGIL_MODELS_DIR (see README).",
                flush=True,
            )
        last = ""
        next_summary = time.monotonic() + 5
        while not stopping:
            time.sleep(0.5)
            if stopping:
                break
            sup.check()
            while not control.requests.empty():
                action, name, reply = control.requests.get()
                reply.put(sup.act(action, name))
            if time.monotonic() >= next_summary:
                line = summary(pg.dsn())
                if line != last:
                    print(f"  [{time.strftime('%H:%M:%S')}] {line}", flush=True)
                    last = line
                next_summary = time.monotonic() + 5
    finally:
        control.close()
        print("\nvigil: stopping services (draining)...", flush=True)
        sup.stop(timeout=15)
        print("vigil: stopping PostgreSQL and NATS...", flush=True)
        pg.stop()
        nats.stop()
        print("vigil: stopped.", flush=True)
    return 0
