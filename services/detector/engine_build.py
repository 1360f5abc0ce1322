"""The detector's work before READY: build a missing accelerator engine, then open the backends.

An engine build (TensorRT: minutes) runs as a child process while the event loop keeps systemd
informed: `EXTEND_TIMEOUT_USEC` every few seconds (so `TimeoutStartSec` never kills a healthy build and
no restart loop rebuilds from scratch), STATUS with the elapsed time, and SIGTERM/SIGINT stop the build
and the detector at once (the child is killed, its temporary file removed). A build that runs past
`detector.engine_build_timeout_seconds` is stopped the same way and the detector starts on the CPU,
degraded, with that reason. Temporaries left by builds that were SIGKILLed are removed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import threading
import time
from pathlib import Path

from services.runtime.notify import Notifier

EXTEND_EVERY = 5.0  # seconds between EXTEND_TIMEOUT_USEC notifications
EXTEND_BY = 30.0  # each one gives this much more time from now
_TMP = re.compile(r"\.(\d+)\.tmp$")


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def remove_stale_temporaries(cache_dir: Path) -> list[Path]:
    """`*.<pid>.tmp` files whose writer is gone (a build killed mid-write): removed, returned."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for path in cache_dir.iterdir():
            m = _TMP.search(path.name)
            if m and not _alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


class PreReady:
    """Signal handling and systemd notifications for the time before Runtime.start (which installs its
    own): a stop request only sets `stopping`."""

    def __init__(self, log) -> None:
        self.log = log
        self.notifier = Notifier()
        self.stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> PreReady:
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop, sig)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._loop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.remove_signal_handler(sig)
        self.notifier.close()

    def _stop(self, sig: int) -> None:
        self.log.info("stopping before ready", signal=signal.Signals(sig).name)
        self.notifier.stopping()
        self.stopping.set()

    def remove_stale_temporaries(self, cache_dir: Path) -> None:
        for path in remove_stale_temporaries(cache_dir):
            self.log.info("removed the temporary file of a build that was killed", path=str(path))

    def run_in_thread(self, fn, *args) -> asyncio.Future:
        """`fn(*args)` in a daemon thread: asyncio's default executor is joined when the loop closes, so a
        stop while a backend is still opening would wait for it (past systemd's stop timeout)."""
        assert self._loop is not None
        loop, future = self._loop, self._loop.create_future()

        def settle(exc: BaseException | None, result: object = None) -> None:
            if future.done():
                return
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)

        def target() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                loop.call_soon_threadsafe(settle, exc)
            else:
                loop.call_soon_threadsafe(settle, None, result)

        threading.Thread(target=target, name="pre-ready", daemon=True).start()
        return future

    def extend(self, status: str) -> None:
        self.notifier.send(f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY * 1e6)}", f"STATUS={status}")

    async def wait(self, task: asyncio.Future, what: str, timeout: float | None = None) -> bool:
        """Await `task`, extending the start timeout meanwhile. False if a stop was asked for or the
        timeout passed first (the task is left to the caller)."""
        started = time.monotonic()
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            while not task.done():
                elapsed = time.monotonic() - started
                if self.stopping.is_set() or (timeout is not None and elapsed >= timeout):
                    return False
                self.extend(f"{what} ({int(elapsed)} s)")
                step = EXTEND_EVERY if timeout is None else max(0.05, min(EXTEND_EVERY, timeout - elapsed))
                await asyncio.wait([task, stop], timeout=step, return_when=asyncio.FIRST_COMPLETED)
            return True
        finally:
            stop.cancel()


async def build_engine(pre: PreReady, command: list[str], what: str, target: Path, timeout: float) -> str | None:
    """Run one engine build as a child process. None when `target` was written; else why not."""
    target.parent.mkdir(parents=True, exist_ok=True)
    pre.log.info("building engine before ready", what=what, engine=str(target), timeout_seconds=timeout)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL)
    pre.log.info("engine build started", pid=proc.pid)
    waiter = asyncio.ensure_future(proc.wait())
    try:
        finished = await pre.wait(waiter, f"building {what}", timeout)
    finally:
        if not waiter.done():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await waiter
        # whatever ended it (done, killed here, or killed with the whole unit by systemd's stop), a child
        # that is gone leaves no half-written file behind
        remove_stale_temporaries(target.parent)
    seconds = round(time.monotonic() - started, 1)
    if not finished:
        if pre.stopping.is_set():
            return "stopped"
        pre.log.error("engine build took too long: stopped, starting on the CPU", what=what, seconds=seconds)
        return f"engine build stopped after {timeout:g} s (detector.engine_build_timeout_seconds); it is tried again at the next start"
    if proc.returncode != 0 or not target.exists():
        pre.log.error("engine build failed", what=what, exit_code=proc.returncode, seconds=seconds)
        return f"engine build failed (exit {proc.returncode}; its messages are in this unit's journal)"
    pre.log.info("engine built", what=what, engine=str(target), seconds=seconds)
    return None
