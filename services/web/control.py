"""Start, stop and restart a vigil service, and read its logs, from the Services page.

Under systemd: `systemctl start|stop|restart vigil-<service>[@instance].service`, which systemd allows
the web's own user (vigil-web) for exactly the vigil service units and those verbs through the polkit
rule the installer writes (ops/polkit/50-vigil-web.rules); its logs come from `journalctl -u UNIT -o json`
(the unit is in group systemd-journal). Under `vigil up`: its supervisor's control socket
(<state_dir>/up.sock, services/cli/up.py) and its log files (<logs>/<service>.log).

Only names from proto's SERVICES list are ever passed on, checked before anything runs; the web
service never stops itself (it would end the page that asked)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

from proto import printable
from proto.topology import SERVICES
from services.health.checks import systemd_available
from services.runtime.config import Config

ACTIONS = ("start", "stop", "restart")
UNIT = re.compile(r"^vigil-(?P<service>[a-z-]+)(?:@(?P<instance>[A-Za-z0-9_-]{1,32}))?\.service$")
UP_SOCKET = "up.sock"
LEVELS = ("debug", "info", "warning", "error")
# journald's PRIORITY as the level names our services log with
PRIORITY_LEVEL = {"0": "error", "1": "error", "2": "error", "3": "error", "4": "warning", "5": "info", "6": "info"}


class NotAllowed(Exception):
    """str() says why (shown to the operator, recorded in the audit trail)."""


def check(unit: str, action: str) -> str:
    """The service a unit name belongs to, or NotAllowed."""
    m = UNIT.match(unit)
    if action not in ACTIONS:
        raise NotAllowed(f"unknown action {action!r}")
    if m is None or m["service"] not in SERVICES:
        raise NotAllowed(f"{printable(unit)!r} is not a vigil service unit")
    if m["service"] == "web" and action == "stop":
        raise NotAllowed("the web UI does not stop itself (restart it, or `systemctl stop vigil-web` on the box)")
    return m["service"]


def unit_of(service: str, instance: str | None = None) -> str:
    return f"vigil-{service}@{instance}.service" if instance else f"vigil-{service}.service"


def supervisor(config: Config) -> str:
    """ "systemd", "up" (a `vigil up` supervisor's socket), or "none"."""
    if (Path(config.state_dir) / UP_SOCKET).is_socket():
        return "up"
    if systemd_available():
        return "systemd"
    return "none"


async def act(config: Config, unit: str, action: str, timeout: float = 60.0, no_block: bool = False) -> str:
    """Do it; "ok" or NotAllowed / RuntimeError with what went wrong. `no_block`: ask and return (the
    web UI restarting itself would not live to hear the answer)."""
    service = check(unit, action)
    mode = supervisor(config)
    if mode == "up":
        return await _up(config, service, action, timeout, no_block)
    if mode == "systemd":
        argv = ["systemctl", *(["--no-block"] if no_block else []), action, unit]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            raise RuntimeError(f"systemctl {action} {unit} did not finish within {timeout:g} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"systemctl {action} {unit}: {printable(err.decode(errors='replace')).strip()[:300]}")
        return "ok"
    raise NotAllowed("no supervisor to ask: not under systemd and no `vigil up` running")


async def _up(config: Config, service: str, action: str, timeout: float, no_block: bool = False) -> str:
    path = Path(config.state_dir) / UP_SOCKET
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
    except (OSError, TimeoutError) as exc:
        raise RuntimeError(f"`vigil up` does not answer on {path}: {exc}") from None
    try:
        writer.write(json.dumps({"action": action, "service": service}).encode() + b"\n")
        await writer.drain()
        if no_block:
            return "ok"
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        raise RuntimeError(f"`vigil up` did not {action} {service} within {timeout:g} s") from None
    finally:
        writer.close()
    try:
        answer = json.loads(line)
    except ValueError:
        raise RuntimeError("`vigil up` gave no answer") from None
    if answer.get("result") != "ok":
        raise RuntimeError(str(answer.get("result", "?"))[:300])
    return "ok"


# ---- logs ---------------------------------------------------------------------------------------
def log_file(config: Config, service: str) -> Path | None:
    """Under `vigil up`: <home>/logs/<service>.log (the state dir is <home>/state)."""
    path = Path(config.state_dir).parent / "logs" / f"{service}.log"
    return path if path.is_file() else None


def parse_line(raw: bytes, source: str) -> dict:
    """One log line as {time, level, service, event, fields}: a journald JSON entry, or one of our
    structlog JSON lines (`vigil up`), or plain text."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return {"time": None, "level": "info", "event": printable(text)[:2000], "fields": {}}
    if not isinstance(obj, dict):
        return {"time": None, "level": "info", "event": printable(text)[:2000], "fields": {}}
    if source == "journal":
        fields = {k.lower(): v for k, v in obj.items() if not k.startswith("_") and k.isupper()}
        level = str(fields.pop("level", "") or PRIORITY_LEVEL.get(str(obj.get("PRIORITY")), "info"))
        ts = obj.get("__REALTIME_TIMESTAMP")
        message = fields.pop("message", "")
        for k in ("priority", "syslog_identifier", "syslog_facility", "code_file", "code_line", "code_func"):
            fields.pop(k, None)
        return {
            "time": int(ts) / 1e6 if isinstance(ts, str) and ts.isdigit() else None,
            "level": level.lower(),
            "event": printable(str(message))[:2000],
            "fields": {k: printable(str(v))[:500] for k, v in fields.items()},
        }
    level = str(obj.pop("level", "info")).lower()
    event = str(obj.pop("event", ""))
    ts = obj.pop("timestamp", None)
    return {
        "time": ts,
        "level": level,
        "event": printable(event)[:2000],
        "fields": {k: printable(str(v))[:500] for k, v in obj.items()},
    }


def level_ok(line: dict, minimum: str) -> bool:
    rank = {name: i for i, name in enumerate(LEVELS)}
    return rank.get(line["level"], 1) >= rank.get(minimum, 0)


def follow(config: Config, unit: str, lines: int = 200) -> AsyncIterator[dict]:
    """The unit's last `lines` log lines, then each new one as it comes (until the caller stops).
    NotAllowed at once (not at the first line) for a unit that is not ours or no log to read."""
    return _stream(*_argv(config, unit, lines, follow=True))


def recent(config: Config, unit: str, lines: int) -> AsyncIterator[dict]:
    """The unit's last `lines` log lines."""
    return _stream(*_argv(config, unit, lines, follow=False))


def _argv(config: Config, unit: str, lines: int, follow: bool) -> tuple[list[str], str]:
    service = check(unit, "start")
    path = log_file(config, service) if supervisor(config) != "systemd" else None
    if path is not None:
        return ["tail", "-n", str(lines), *(["-F"] if follow else []), str(path)], "file"
    if systemd_available():
        return ["journalctl", "-u", unit, "-o", "json", "-n", str(lines), "--no-pager", *(["-f"] if follow else [])], (
            "journal"
        )
    raise NotAllowed("no logs to read: not under systemd and no `vigil up` log file")


async def _stream(argv: list[str], source: str) -> AsyncIterator[dict]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, limit=1 << 20
    )
    assert proc.stdout is not None
    try:
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                return
            yield parse_line(raw, source)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
