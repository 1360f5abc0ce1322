"""sd_notify over a real unix datagram socket, and the progress-gated watchdog."""

import asyncio
import os
import socket

import pytest

from services.runtime.config import load_config
from services.runtime.notify import Notifier
from services.runtime.service import Runtime


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(1)
    yield path, sock
    sock.close()


def test_ready_status_watchdog_stopping_are_sent(notify_socket):
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_period == 4.0
    n.ready("detected 0")
    assert sock.recv(4096).decode().split("\n")[:2] == ["READY=1", "STATUS=detected 0"]
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.stopping()
    assert sock.recv(4096).startswith(b"STOPPING=1")


def test_watchdog_for_another_pid_is_ignored():
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_period is None


def test_without_socket_everything_is_a_noop():
    n = Notifier({})
    assert not n.enabled
    n.ready("x")  # must not raise


async def test_alive_only_while_every_loop_beats():
    """A loop that stops beating (a hung inference) makes the runtime report not-alive; a loop that
    waits out a server outage keeps itself alive, but never a hung sibling."""
    import time

    import structlog

    rt = Runtime("t", load_config(environ={}), structlog.get_logger())

    async def fetch_loop(stall: float):
        rt.beat("fetch")
        rt._beats["fetch"] -= stall
        rt.keepalive()  # e.g. retrying a publish while NATS is away

    async def timer_loop():
        rt.beat("timer")

    await asyncio.gather(asyncio.create_task(fetch_loop(10)), asyncio.create_task(timer_loop()))
    assert rt.alive(now=time.monotonic(), window=2)  # fetch refreshed itself while waiting
    rt._beats["timer"] -= 10  # the timer loop hangs
    await asyncio.create_task(fetch_loop(0))
    assert not rt.alive(now=time.monotonic(), window=2)  # the fetch loop's keepalive does not hide it
