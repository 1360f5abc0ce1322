"""web: the web UI (events, cameras, services, dead letters, audit trail) and the HTTP upload API.

It binds its port before it connects to anything, so a port in use (or a missing password hash) stops
it at start with the field named (exit 78, no crash loop). PostgreSQL through a small pool (a page is
one or two queries); NATS as its own user, for the Services and Dead letters pages. A probe loop every
few seconds asks PostgreSQL `SELECT 1`: the heartbeat says `degraded` while the database does not
answer (pages then answer 503), and the watchdog is fed only while that loop runs.
"""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import psycopg_pool
from aiohttp import web

from services import database
from services.recorder.service import wait_for_database
from services.runtime.config import Config
from services.runtime.http import bind
from services.runtime.service import Runtime
from services.web import auth
from services.web.app import make_app
from services.web.core import NATS_ERRORS, Web

STAGE = "web"
PROBE_SECONDS = 5.0


@web.middleware
async def servers_away(request: web.Request, handler):
    """PostgreSQL or NATS not answering: 503 with what is away (never a 500 with a traceback)."""
    if not request.app["web"].schema_ready and not request.path.startswith("/static/"):
        return web.Response(status=503, text="waiting for the database schema (the recorder migrates it)\n")
    try:
        return await handler(request)
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        rt = request.app["web"].rt
        if rt is not None:
            rt.note_error(f"database: {exc}"[:200])
        return web.Response(status=503, text="the database does not answer; try again in a moment\n")
    except NATS_ERRORS as exc:
        return web.Response(status=503, text=f"NATS does not answer ({type(exc).__name__}); try again in a moment\n")


async def start_http(state: Web) -> web.AppRunner:
    app = make_app(state)
    app.middlewares.insert(0, servers_away)
    # handler_cancellation: a browser that goes away ends its handler (a live log's journalctl with it)
    return await bind(app, state.cfg.http_host, state.cfg.http_port, "web", handler_cancellation=True)


async def probe(rt: Runtime, pool: psycopg_pool.AsyncConnectionPool) -> None:
    while not rt.stopping.is_set():
        try:
            async with pool.connection(timeout=PROBE_SECONDS) as conn:
                await conn.execute("SELECT 1 FROM web_sessions LIMIT 1")
            rt.status_extra = ""
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            rt.status_extra = f"degraded: database: {str(exc).strip()[:150]}"
        rt.keepalive()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rt.stopping.wait(), timeout=PROBE_SECONDS)


async def run(config: Config) -> None:
    hashed = auth.password_hash(config)  # a missing or clear-text password stops it here, field named
    info = database.conninfo(config, STAGE)
    pool = psycopg_pool.AsyncConnectionPool(
        info.pop("conninfo"),
        kwargs={**info, "autocommit": True, "connect_timeout": 5},
        min_size=1,
        max_size=4,
        timeout=10,
        open=False,
    )
    state = Web(config, pool, None, None, hashed)
    runner = await start_http(state)
    try:
        await pool.open(wait=False)
        async with Runtime.start(STAGE, config) as rt:
            state.rt, state.nc, state.js = rt, rt.nc, rt.js
            # a first start beside the recorder: its tables exist once the schema is migrated (the
            # recorder or vigil-postgres does it; this role may not); pages answer 503 until then
            await wait_for_database(rt, database.conninfo(config, STAGE))
            state.schema_ready = True
            rt.log.info("serving", url=f"http://{config.web.http_host}:{config.web.http_port}/")
            async with asyncio.TaskGroup() as tg:
                tg.create_task(probe(rt, pool))
    finally:
        await runner.cleanup()  # stop taking requests first, then close the pool they use
        await pool.close()
