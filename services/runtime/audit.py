"""The audit trail: every operator action, from the web UI or the CLI (start, stop, restart, retry,
purge, keep, reviewed, notes, login and failed login, uploads), with who, when, through what and how
it went, in PostgreSQL (table audit_log). Shown by the web UI's Audit page and per service.

An action is recorded after it ran, with its result; a failure to record never hides the action's own
result from the operator (it is logged instead)."""

from __future__ import annotations

import getpass
import os

import structlog

from proto import printable

log = structlog.get_logger()

INSERT = "INSERT INTO audit_log (actor, via, action, target, result, remote) VALUES (%s, %s, %s, %s, %s, %s)"


def cli_actor() -> str:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = str(os.getuid())
    sudo = os.environ.get("SUDO_USER")
    return f"cli:{who}" + (f" (sudo by {sudo})" if sudo and sudo != who else "")


def row(actor: str, via: str, action: str, target: str | None, result: str, remote: str | None) -> tuple:
    clip = lambda v, n: None if v is None else printable(str(v))[:n]  # noqa: E731 - what a client sent is hostile
    return (clip(actor, 200), via, action, clip(target, 300), clip(result, 500), clip(remote, 100))


def record_sync(conn, actor: str, via: str, action: str, target: str | None, result: str, remote=None) -> None:
    """From the CLI (a psycopg connection)."""
    try:
        conn.execute(INSERT, row(actor, via, action, target, result, remote))
        if not conn.autocommit:
            conn.commit()
    except Exception as exc:  # noqa: BLE001 - the action itself already happened: say so, do not hide it
        log.warning("audit trail not written", action=action, target=target, error=str(exc))


async def record(pool, actor: str, via: str, action: str, target: str | None, result: str, remote=None) -> None:
    """From the web service (a psycopg_pool.AsyncConnectionPool)."""
    try:
        async with pool.connection() as conn:
            await conn.execute(INSERT, row(actor, via, action, target, result, remote))
    except Exception as exc:  # noqa: BLE001
        log.warning("audit trail not written", action=action, target=target, error=str(exc))
