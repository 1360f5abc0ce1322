"""The lifecycle every service shares: signals, bus, READY, progress-gated watchdog, bounded drain.

    async def run(config: Config) -> None:
        async with Runtime.start("detector", config) as rt:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(detect_loop(rt, config))

Loops check `rt.stopping` between batches and finish or nak what they hold. If they have not
returned `drain_seconds` after the first SIGTERM/SIGINT, the service task is cancelled (unacked
messages are redelivered after their ack_wait); a second signal cancels at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Literal

import nats
import structlog
import uvloop
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

import proto
from proto import Heartbeat, printable
from proto.topology import HEARTBEAT_BUCKET, token
from services import VERSION
from services.runtime import jetstream, provision
from services.runtime.bus import Bus
from services.runtime.config import Config, ConfigError, load_config
from services.runtime.logs import configure_logging
from services.runtime.notify import Notifier

_current_loop: contextvars.ContextVar[str | None] = contextvars.ContextVar("vigil_loop", default=None)

EX_CONFIG = 78  # sysexits.h; the systemd units set RestartPreventExitStatus=78 so a bad config does not crash-loop


EX_TEMPFAIL = 75  # sysexits.h: "try again later"; Restart=on-failure starts the service again


# Provisioning checks that time out this many times in a row are retried on a new connection.
PROVISION_TIMEOUTS_BEFORE_RECONNECT = 3


class StoppedBeforeReady(Exception):
    """A stop signal arrived before READY (waiting for NATS, building an engine): nothing to drain, exit 0."""


class RestartRequested(Exception):
    """Only a new process can go on (e.g. a sticky CUDA error poisoned this one's context): after a
    clean stop, exit EX_TEMPFAIL so systemd starts the service again. Not 78, which prevents restarts."""


class Runtime:
    """Per-process context handed to a service's loops: bus handles, stop event, counters, liveness."""

    def __init__(self, service: str, config: Config, log: structlog.stdlib.BoundLogger) -> None:
        self.service = service
        self.config = config
        self.log = log
        self.stopping = asyncio.Event()
        self.counters: dict[str, int] = {}
        self.bus = Bus(self)  # publishing, the fetch loop, dead letters, and their bookkeeping
        self.status_extra = ""
        self.unreadable: dict[str, str] = {}  # camera -> an unreadable file and why (the watcher fills it)
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self.notifier = Notifier()
        self._beats: dict[str, float] = {}
        self._main_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started_at = time.time()
        self.instance = token(os.environ.get("VIGIL_INSTANCE") or socket.gethostname())
        self.last_error: str | None = None
        self._heartbeat: asyncio.Task | None = None
        self._heartbeat_kv: KeyValue | None = None
        self._force_handle: asyncio.TimerHandle | None = None

    # The bus handles, set once connected: a service's loops only run after that.
    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise RuntimeError("not connected to NATS yet")
        return self._nc

    @nc.setter
    def nc(self, value: NATS) -> None:
        self._nc = value

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("not connected to NATS yet")
        return self._js

    @js.setter
    def js(self, value: JetStreamContext) -> None:
        self._js = value

    # ---- lifecycle -------------------------------------------------------------------------
    async def _until_provisioned(self) -> None:
        """Declare (or wait for) the streams, consumers and buckets; a NATS that is up but not ready
        (JetStream still recovering after a restart or a power cut: timeouts, 503) is waited for, not
        a crash: under systemd, crashes at boot would use up StartLimitBurst and leave the unit failed."""
        import nats.errors
        import nats.js.errors

        retryable = (
            TimeoutError,
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.StaleConnectionError,
            nats.js.errors.ServiceUnavailableError,
            ConnectionError,
        )
        delay, timeouts = 0.5, 0
        while True:
            try:
                if self.config.nats.provision:
                    await provision.provision(self.js, self.log, self.config.nats.replicas)
                else:
                    await provision.wait_provisioned(self)
                return
            except retryable as exc:
                if self.stopping.is_set():
                    raise StoppedBeforeReady from None
                self.log.warning("NATS not ready to provision yet, retrying", error=repr(exc)[:200], in_s=delay)
                self.notifier.status(f"waiting for NATS to provision: {exc!r}"[:200])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=delay)
                delay = min(delay * 2, 5.0)
                timeouts = timeouts + 1 if isinstance(exc, TimeoutError | nats.errors.TimeoutError) else 0
                if timeouts >= PROVISION_TIMEOUTS_BEFORE_RECONNECT:
                    await self._connect_anew()
                    timeouts = 0

    async def _connect_anew(self) -> None:
        """Seen when every unit starts at once on a loaded box (an upgrade's restart, a boot): one
        connection's requests stayed unanswered for minutes while a new process's were answered at
        once; so after a few timeouts in a row, this connection is dropped for a new one."""
        self.log.warning("NATS requests keep timing out on this connection: connecting anew")
        with contextlib.suppress(Exception):
            await self.nc.close()
        await self._connect()

    async def _connect(self) -> None:
        """The bus handles (a stop while NATS is unreachable ends the start: nothing to drain)."""
        nc = await jetstream.connect(self)
        if nc is None:
            raise StoppedBeforeReady
        self.nc, self.js = nc, nc.jetstream(timeout=self.config.nats.publish_timeout)
        self._heartbeat_kv = None

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, service: str, config: Config) -> AsyncIterator[Runtime]:
        log = structlog.get_logger(service=service)
        rt = cls(service, config, log)
        rt._main_task = asyncio.current_task()
        loop = rt.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, rt.request_stop, sig)
        try:
            await rt._connect()
            await rt._until_provisioned()
            async with asyncio.TaskGroup() as tg:
                watchdog = tg.create_task(rt._watchdog_loop())
                rt.notifier.ready(rt.status_line())
                log.info("ready", pid=os.getpid())
                try:
                    yield rt
                finally:
                    watchdog.cancel()
        finally:
            rt.notifier.stopping()
            if rt._force_handle:
                rt._force_handle.cancel()
            await rt._send_heartbeat("stopped")  # a clean stop, as opposed to an entry that just expires
            await rt._close_bus()
            for sig in (signal.SIGTERM, signal.SIGINT):  # only now: a second signal during the drain still counts
                loop.remove_signal_handler(sig)
            rt.notifier.close()
            log.info("stopped", **rt.counters)

    def request_stop(self, sig: int | None = None) -> None:
        """Signal handler: the first signal starts a bounded drain, the second cuts it short."""
        if self.stopping.is_set():
            self.log.warning("second signal: stopping now")
            self._force_stop()
            return
        self.log.info(
            "stopping", signal=signal.Signals(sig).name if sig else None, drain_seconds=self.config.drain_seconds
        )
        self.notifier.stopping()
        self.stopping.set()
        self._force_handle = asyncio.get_running_loop().call_later(self.config.drain_seconds, self._force_stop)

    def _force_stop(self) -> None:
        if self._main_task and not self._main_task.done():
            self.log.warning(
                "drain bound reached: cancelling in-flight work (it will be redelivered)",
                in_flight=sum(self.bus.in_flight.values()),
            )
            self._main_task.cancel()

    async def _close_bus(self) -> None:
        if self._nc is None or self._nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        except (TimeoutError, nats.errors.Error, asyncio.CancelledError):
            await self.nc.close()

    def spawn(self, coro) -> asyncio.Task:
        """Run a fire-and-forget coroutine (e.g. an alert from another thread); errors are logged."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.log.error("background task failed", error=repr(t.exception()))

        task.add_done_callback(done)
        return task

    # ---- liveness and status ---------------------------------------------------------------
    def beat(self, loop_name: str) -> None:
        """Called by a work loop after each iteration (a batch handled, or an idle fetch timeout)."""
        _current_loop.set(loop_name)
        self._beats[loop_name] = time.monotonic()

    def keepalive(self) -> None:
        """The calling loop is legitimately waiting (server away, database down): that is not a hang.
        Refreshes only that loop, so a hung sibling still stops the watchdog."""
        name = _current_loop.get()
        if name is not None:
            self._beats[name] = time.monotonic()

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def status_line(self) -> str:
        parts = [f"{k.replace('_', ' ')} {v}" for k, v in self.counters.items()]
        if self.bus.in_flight:
            parts.append(f"in flight {sum(self.bus.in_flight.values())}")
        if self.status_extra:
            parts.append(self.status_extra)
        return ", ".join(parts) or "running"

    def alive(self, now: float, window: float) -> bool:
        """True when every registered work loop has beaten within `window` seconds."""
        return all(now - t <= window for t in self._beats.values())

    def note_error(self, error: str) -> None:
        """Remember the latest error for the heartbeat (what `vigil status` shows as last error)."""
        # printable: an error can quote a file name or a message field (control characters, bad UTF-8)
        self.last_error = printable(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {error}")[:500]

    async def _send_heartbeat(self, state: Literal["ready", "degraded", "stopping", "stopped"] | None = None) -> None:
        if self._js is None or self._nc is None or not self._nc.is_connected:
            return
        beats = list(self._beats.values())
        oldest = min(beats) if beats else None
        hb = Heartbeat(
            service=self.service,
            instance=self.instance,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=VERSION,
            started_at=self.started_at,
            sent_at=time.time(),
            state=state
            or ("stopping" if self.stopping.is_set() else "degraded" if "degraded" in self.status_extra else "ready"),
            counters=dict(self.counters),
            in_flight=sum(self.bus.in_flight.values()),
            last_progress=time.time() - (time.monotonic() - oldest) if oldest is not None else None,
            backend=self.status_extra or None,
            last_error=self.last_error,
            unreadable=dict(self.unreadable),
        )
        try:
            if self._heartbeat_kv is None:  # looked up once, not on every beat
                self._heartbeat_kv = await self.js.key_value(HEARTBEAT_BUCKET)
            await asyncio.wait_for(
                self._heartbeat_kv.put(f"{self.service}.{self.instance}", proto.encode(hb)), timeout=2.0
            )
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            self.log.debug("heartbeat not sent", error=repr(exc))

    async def _watchdog_loop(self) -> None:
        # WATCHDOG=1 only while every work loop makes progress: a hung inference or a wedged
        # fetch stops the pings and systemd restarts the service. STATUS is refreshed alongside,
        # and every heartbeat_seconds the Heartbeat goes to KV (off this loop, so a slow server
        # never delays the watchdog).
        period = self.notifier.watchdog_period
        tick = (
            min(period / 3, 2.0, self.config.heartbeat_seconds) if period else min(2.0, self.config.heartbeat_seconds)
        )
        next_heartbeat = 0.0
        while True:
            if period is not None and self.alive(time.monotonic(), period / 2):
                self.notifier.watchdog()
            self.notifier.status(self.status_line())
            now = time.monotonic()
            if now >= next_heartbeat and (self._heartbeat is None or self._heartbeat.done()):
                self._heartbeat = self.spawn(self._send_heartbeat())
                # on a fixed cadence, not "tick after the last one": health calls an entry stale after
                # 1.5 intervals, so heartbeats must not drift late by a tick each time
                next_heartbeat = max(next_heartbeat + self.config.heartbeat_seconds, now)
            await asyncio.sleep(max(0.01, min(tick, next_heartbeat - time.monotonic())))


def main(
    service: str,
    run: Callable[[Config], Coroutine[Any, Any, None]],
    config_path: str | None = None,
    instance: str | None = None,
) -> int:
    """Process entry point shared by every service: load config once, log, run on uvloop."""
    try:
        config = load_config(config_path, instance=instance)
    except ConfigError as exc:
        print(f"vigil-{service}: {exc}", file=sys.stderr)
        return EX_CONFIG
    log = configure_logging(service, config.log_format, config.log_level)
    try:
        uvloop.run(run(config))
    except asyncio.CancelledError:
        # Forced after the drain bound (already logged). A worker thread may still be stuck (a hung
        # inference, a dead network mount); the interpreter would wait for it at exit, so do not.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except StoppedBeforeReady:
        if threading.active_count() > 1:  # a worker still busy (a backend still opening): do not wait for it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    except (RestartRequested, BaseExceptionGroup) as exc:
        # raised in a service's body, it arrives wrapped in the TaskGroups it passed through
        found = exc if isinstance(exc, RestartRequested) else exc.subgroup(RestartRequested)
        if found is None:
            raise
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        log.error("exiting for a restart", reason=str(found), exit_code=EX_TEMPFAIL)
        return EX_TEMPFAIL
    except ConfigError as exc:  # a service may validate more at start (e.g. the models dir)
        log.error("config error", error=str(exc))
        return EX_CONFIG
    return 0
