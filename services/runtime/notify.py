"""sd_notify: READY/WATCHDOG/STATUS/STOPPING to systemd.

Written by hand on purpose: the protocol is one datagram to $NOTIFY_SOCKET; `cysystemd` only ships
manylinux_2_34 wheels (fails on older appliances), `systemd-python` needs libsystemd-dev to build,
and `sdnotify` is unmaintained since 2017. Without $NOTIFY_SOCKET every call is a no-op.

The socket is non-blocking: these calls run on the event loop, and a manager that does not read (busy,
frozen, or a test that stopped reading) fills the datagram queue (net.unix.max_dgram_qlen, 10 by
default). A blocking sendto would then freeze the whole service, SIGTERM included. A datagram that
does not fit is dropped: every tick sends fresh WATCHDOG/STATUS, so nothing of value is lost.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self._address = address or None
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        wanted = usec is not None and (pid is None or pid == str(os.getpid()))
        # The systemd watchdog period in seconds, or None when no watchdog is configured.
        self.watchdog_period: float | None = int(usec) / 1e6 if wanted and usec else None
        self.dropped = 0  # datagrams the receiver's full queue refused

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except BlockingIOError:
            self.dropped += 1  # the receiver is not reading: drop, never wait (see the module docstring)
        except OSError:
            pass  # systemd gone (e.g. during shutdown): nothing useful to do

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
