"""structlog setup: journald with structured fields under systemd, readable lines on a terminal,
JSON lines otherwise (files, CI, `vigil up`).

Under systemd (`JOURNAL_STREAM` names our stderr) every key of a log call becomes a journal field, so
`journalctl -u vigil-detector CAMERA=front_door` works. The native journal protocol is written by hand
(one datagram of KEY=value lines to /run/systemd/journal/socket): `systemd-python` needs libsystemd-dev
to build and `cysystemd` ships only manylinux_2_34 wheels, too new for older appliances.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_FIELD_UNSAFE = re.compile(r"[^A-Z0-9_]")
_SKIP = {"event", "level", "timestamp", "exc_info"}


def journal_field(key: str) -> str:
    name = _FIELD_UNSAFE.sub("_", key.upper()).lstrip("_")
    return name if name not in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER") else f"VIGIL_{name}"


def encode_journal(event_dict: dict, identifier: str) -> bytes:
    """One journal entry in the native protocol (values with newlines use the length-prefixed form)."""
    level = event_dict.get("level", "info")
    extras = {k: v for k, v in event_dict.items() if k not in _SKIP}
    message = str(event_dict.get("event", ""))
    if extras:
        message += " " + " ".join(f"{k}={v}" for k, v in extras.items() if k != "exception")
    if "exception" in event_dict:
        message += "\n" + str(event_dict["exception"])
    fields = {"MESSAGE": message, "PRIORITY": str(_PRIORITY.get(level, 6)), "SYSLOG_IDENTIFIER": identifier}
    for key, value in extras.items():
        if value is not None:
            fields[journal_field(key)] = str(value)
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalLogger:
    """structlog logger that sends each event dict to journald (falls back to stderr on failure)."""

    def __init__(self, identifier: str) -> None:
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def msg(self, *args, **event_dict) -> None:
        """structlog passes the final event dict as keyword arguments (the last processor returns it)."""
        if args:
            event_dict.setdefault("event", " ".join(map(str, args)))
        try:
            self.sock.sendto(encode_journal(event_dict, self.identifier), JOURNAL_SOCKET)
        except OSError:
            print(event_dict, file=sys.stderr, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = failure = err = log = msg


def on_journal_stream(environ=None) -> bool:
    """True when stderr is the journal stream systemd set up for us (not a redirect of it)."""
    env = os.environ if environ is None else environ
    stream = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure_logging(service: str, fmt: str = "auto", level: str = "info") -> structlog.stdlib.BoundLogger:
    if fmt == "auto":
        fmt = "journal" if on_journal_stream() else "console" if sys.stderr.isatty() else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    factory: Callable[..., Any]
    if fmt == "journal":

        def factory(*args: Any) -> JournalLogger:
            return JournalLogger(f"vigil-{service}")
    else:
        processors.append(structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer())
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger(service=service)
