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
    """A loop that stops beating (a hung inference) makes the runtime report not-alive."""
    import structlog

    rt = Runtime("t", load_config(environ={}), structlog.get_logger())
    rt.beat("fetch")
    rt.beat("timer")
    assert rt.alive(now=rt._beats["fetch"] + 1, window=2)
    rt._beats["fetch"] -= 10
    assert not rt.alive(now=rt._beats["timer"] + 1, window=2)
    rt.keepalive()  # waiting out a server outage counts as alive
    assert rt.alive(now=rt._beats["timer"], window=2)
    await asyncio.sleep(0)
