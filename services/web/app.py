"""The web UI's HTTP side (aiohttp): pages rendered on the server with Jinja2 (autoescaped), htmx for
the live parts (vendored in static/, 0BSD licence), plain forms for every write, and the JSON API.

Every request passes, in order: the Host check (DNS rebinding), the security headers (a CSP that allows
only this origin's scripts, styles and images), the login check (pages redirect to /login, the API
answers 401) and, for writes, the CSRF check. Only /login, /static/ and the upload API (which has its
own per-camera bearer tokens) are open without a session.

API (JSON, same session cookie as the pages, or `Authorization: Bearer <credential web-api-token>` for
reads): GET /api/v1/events[?camera=&label=&level=&reviewed=&from=&to=&page=], /api/v1/events/<id>,
/api/v1/cameras, /api/v1/services, /api/v1/dead-letters, /api/v1/audit; POST /api/v1/uploads/<camera>.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import msgspec
from aiohttp import web

from proto import SNAPSHOTS_DIR, printable
from proto.messages import RISK_LEVELS
from services.health.checks import fmt_age, snapshot
from services.runtime import audit, dlq_ops
from services.runtime.config import Config, credential
from services.runtime.files import open_beneath
from services.runtime.http import host_guard
from services.web import auth, control, queries, uploads

HERE = Path(__file__).parent
SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}\.[0-9a-f]{32}-r[0-9]{1,9}(\.thumb)?\.jpg$")
OPEN = ("/login", "/static/", "/api/v1/uploads/")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
MAX_NOTES = 4000
MAX_FORM_BYTES = 1024 * 1024  # every form; uploads stream past this limit (request.content)
FILE_CHUNK = 256 * 1024


def _nats_errors() -> tuple[type[BaseException], ...]:
    import nats.errors
    import nats.js.errors

    return (nats.errors.Error, nats.js.errors.Error, TimeoutError)


NATS_ERRORS = _nats_errors()


class Web:
    """What every handler shares: config, database pool, the bus, sessions, the login limiter."""

    def __init__(self, config: Config, pool, js, nc, password_hash: bytes) -> None:
        self.config, self.cfg = config, config.web
        self.pool, self.js, self.nc = pool, js, nc
        self.rt: Any = None  # the Runtime, once started (services/web/service.py)
        self.schema_ready = False  # the recorder's schema is migrated: pages may query
        self.password_hash = password_hash
        self.sessions = auth.Sessions(pool, self.cfg.session_hours)
        self.limiter = auth.LoginLimiter(self.cfg.login_attempts)
        self.snapshots = Path(config.state_dir) / SNAPSHOTS_DIR
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters.update(when=when, age=lambda s: fmt_age(s) if s is not None else "", labels=labels)
        h = config.health
        self.health_url = f"http://{h.http_host}:{h.http_port}/" if h.http_port else None
        self.flash_key = secrets.token_bytes(32)  # flash messages in redirects are ours, never a link's
        self.quiet_audit: dict[tuple[str, str], float] = {}

    def sign(self, text: str) -> str:
        return hmac.new(self.flash_key, text.encode(), "sha256").hexdigest()[:24]

    def flash(self, request: web.Request, name: str) -> str | None:
        text = request.query.get(name)
        return text if text and auth.same(request.query.get(f"{name}_sig"), self.sign(f"{name}:{text}")) else None

    def client(self, request: web.Request) -> str:
        """The browser's address: the peer, or X-Forwarded-For's last hop when the peer is a proxy
        named in web.trusted_proxies (anyone else could write that header)."""
        peer = request.remote or "?"
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded and peer in self.cfg.trusted_proxies:
            return forwarded.split(",")[-1].strip()[:64] or peer
        return peer

    def audit_once(self, key: tuple[str, str], every: float = 60.0) -> bool:
        """For what anyone can cause (a refused upload, a rate-limited login): one row per source a
        minute, so a flood cannot push the operators' own entries out of view."""
        now = time.monotonic()
        if now - self.quiet_audit.get(key, -every) < every:
            return False
        if len(self.quiet_audit) > 10_000:
            self.quiet_audit.clear()
        self.quiet_audit[key] = now
        return True

    async def audit(self, request: web.Request, action: str, target: str | None, result: str) -> None:
        session = request.get("session")
        actor = session.username if session else request.get("actor", "?")
        via = "api" if request.path.startswith("/api/") else "web"
        await audit.record(self.pool, actor, via, action, target, result, self.client(request))

    def render(self, request: web.Request, name: str, status: int = 200, **ctx) -> web.Response:
        ctx.setdefault("message", self.flash(request, "msg"))
        ctx.setdefault("error", self.flash(request, "err"))
        html = self.templates.get_template(name).render(
            session=request.get("session"), health_url=self.health_url, **ctx
        )
        return web.Response(text=html, content_type="text/html", status=status)


# ---- filters ----------------------------------------------------------------------------------------
def when(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        value = dt.datetime.fromtimestamp(value, dt.UTC)
    if isinstance(value, dt.datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def labels(value) -> str:
    if not isinstance(value, dict):
        return ""
    return ", ".join(f"{k} ×{v.get('count', 0)}" for k, v in sorted(value.items()))


def to_json(value) -> web.Response:
    return web.Response(body=msgspec.json.encode(value, enc_hook=_enc), content_type="application/json")


def _enc(obj):
    if isinstance(obj, dt.datetime):
        return obj.isoformat()
    raise NotImplementedError(type(obj).__name__)


def json_error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


def back(request: web.Request, path: str, **query) -> web.HTTPSeeOther:
    """A redirect after a write (PRG), its message signed so that only this server's can be shown."""
    state: Web = request.app["web"]
    parts = []
    for k, v in query.items():
        if v:
            parts += [f"{k}={quote(str(v))}", f"{k}_sig={state.sign(f'{k}:{v}')}"]
    q = "&".join(parts)
    return web.HTTPSeeOther(path + (("&" if "?" in path else "?") + q if q else ""))


# ---- middlewares --------------------------------------------------------------------------------------
@web.middleware
async def headers(request: web.Request, handler):
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        resp = exc
    resp.headers.setdefault("Content-Security-Policy", CSP)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "same-origin")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    if isinstance(resp, web.HTTPException):
        raise resp
    return resp


def same_origin(request: web.Request) -> bool:
    """A browser names the page a write comes from (Origin, else Referer): it must be this host."""
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin or origin == "null":
        return origin is None  # no header: not a browser's cross-site form (those always send Origin)
    m = re.match(r"^https?://([^/]+)", origin)
    return bool(m) and m.group(1).lower() == (request.headers.get("Host") or "").lower()


def make_auth(state: Web):
    @web.middleware
    async def guard(request: web.Request, handler):
        path = request.path
        if path.startswith(OPEN) or path == "/favicon.ico":
            return await handler(request)
        session = await state.sessions.get(request.cookies.get(auth.SESSION_COOKIE))
        if session is None:
            api_token = credential("web-api-token")
            bearer = request.headers.get("Authorization", "")
            if (
                path.startswith("/api/")
                and request.method == "GET"
                and api_token
                and auth.same(bearer.removeprefix("Bearer "), api_token)
            ):
                request["actor"] = "api-token"
                return await handler(request)
            if path.startswith("/api/"):
                return json_error(401, "unauthorized", "log in (session cookie) or send the API token")
            if request.headers.get("HX-Request"):  # a live part of a page whose session ended: the page goes
                return web.Response(status=401, headers={"HX-Redirect": "/login"})
            nxt = request.path_qs if request.method == "GET" else "/"
            raise web.HTTPSeeOther("/login?next=" + quote(nxt, safe=""))
        request["session"] = session
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            form = (
                await request.post()
                if request.content_type.startswith(("application/x-www-form", "multipart/"))
                else {}
            )
            presented = request.headers.get("X-CSRF-Token") or form.get("csrf")
            if not same_origin(request) or not auth.same(str(presented or ""), session.csrf):
                return web.Response(status=403, text="CSRF check failed: reload the page and try again\n")
        return await handler(request)

    return guard


# ---- login ---------------------------------------------------------------------------------------
SAFE_NEXT = re.compile(r"^/(?![/\\])[A-Za-z0-9/_.~%?=&+-]*$")


def local_next(value: str | None) -> str:
    """Only a path on this site: no scheme, no //host, no backslash, tab or other character a browser
    or URL library might drop or read as a host separator (no open redirect)."""
    return value if value and len(value) < 500 and SAFE_NEXT.match(value) else "/events"


async def login_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    token = request.cookies.get(auth.LOGIN_COOKIE) or secrets.token_urlsafe(24)
    resp = state.render(request, "login.html", login_csrf=token, next=local_next(request.query.get("next")))
    resp.set_cookie(auth.LOGIN_COOKIE, token, httponly=True, samesite="Strict", secure=state.cfg.secure_cookies)
    return resp


async def login(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    form = await request.post()
    client = state.client(request)
    if not same_origin(request) or not auth.same(
        str(form.get("login_csrf", "")), request.cookies.get(auth.LOGIN_COOKIE)
    ):
        return web.Response(status=403, text="CSRF check failed: reload the login page\n")
    wait = state.limiter.wait_for(client)
    if wait > 0:
        if state.audit_once(("login_refused", client)):
            await state.audit(request, "login_refused", None, f"rate limited for {wait:.0f} s")
        return web.Response(
            status=429,
            text=f"too many failed logins: try again in {wait:.0f} s\n",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    # counted as a failure before bcrypt runs (undone on success): parallel guesses cannot outrun the limit
    state.limiter.failed(client)
    await asyncio.sleep(state.limiter.slowdown())  # many failures from everyone: every try slows, none is refused
    username, password = str(form.get("username", "")), str(form.get("password", ""))
    ok = await auth.password_ok(state.password_hash, password)  # always run: the answer takes as long either way
    ok = auth.same(username, state.cfg.username) and ok
    if not ok:
        request["actor"] = printable(username)[:100] or "?"
        await state.audit(request, "login_failed", None, "wrong user name or password")
        token = request.cookies.get(auth.LOGIN_COOKIE, "")
        return state.render(
            request, "login.html", status=401, login_csrf=token, next=local_next(str(form.get("next", ""))),
            error="Wrong user name or password.",
        )  # fmt: skip
    state.limiter.succeeded(client)
    session = await state.sessions.create(username)
    request["session"] = session
    await state.audit(request, "login", None, "ok")
    resp = web.HTTPSeeOther(local_next(str(form.get("next", ""))))
    resp.set_cookie(
        auth.SESSION_COOKIE,
        session.token,
        httponly=True,
        # Lax: a notification's link into the UI opens with the session; every write still needs the CSRF token
        samesite="Lax",
        secure=state.cfg.secure_cookies,
        max_age=int(state.cfg.session_hours * 3600),
    )
    resp.del_cookie(auth.LOGIN_COOKIE)
    raise resp


async def logout(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    await state.sessions.end(request["session"].token)
    await state.audit(request, "logout", None, "ok")
    resp = web.HTTPSeeOther("/login")
    resp.del_cookie(auth.SESSION_COOKIE)
    raise resp


# ---- events ----------------------------------------------------------------------------------------
async def events_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    f = queries.EventFilter.of(request.query)
    async with state.pool.connection() as conn:
        rows, more = await queries.events(conn, f, state.cfg.page_size)
        cams = await queries.camera_names(conn)
    return state.render(
        request, "events.html", nav="events", events=rows, more=more, f=f, cameras=cams, levels=RISK_LEVELS,
        seen_at=dt.datetime.now(dt.UTC).isoformat(),
    )  # fmt: skip


async def event_rows(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    f = queries.EventFilter.of(request.query)
    async with state.pool.connection() as conn:
        rows, _ = await queries.events(conn, f, state.cfg.page_size)
    return state.render(request, "event_rows.html", events=rows, f=f)


async def events_api(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    f = queries.EventFilter.of(request.query)
    async with state.pool.connection() as conn:
        rows, more = await queries.events(conn, f, state.cfg.page_size)
    return to_json({"events": rows, "page": f.page, "more": more})


async def mark_all_reviewed(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    f = queries.EventFilter.of(request.query)
    try:
        seen_at = dt.datetime.fromisoformat(str((await request.post()).get("seen_at", "")))
    except ValueError:
        seen_at = None
    async with state.pool.connection() as conn:
        n = await queries.mark_reviewed(conn, f, seen_at)
    await state.audit(request, "reviewed", f"events?{f.query_string()}", f"ok: {n} marked reviewed")
    raise back(request, "/events?" + f.query_string(), msg=f"{n} events marked reviewed")


async def event_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    event_id = request.match_info["event_id"]
    async with state.pool.connection() as conn:
        e = await queries.event(conn, event_id)
        if e is None:
            raise web.HTTPNotFound(text="no such event\n")
        dets = await queries.detections(conn, event_id)
    if request.path.startswith("/api/"):
        return to_json({**e, "detections": dets})
    return state.render(request, "event.html", nav="events", e=e, detections=dets)


async def event_flag(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    event_id, column = request.match_info["event_id"], request.match_info["flag"]
    form = await request.post()
    value = str(form.get("value", "1")) in ("1", "true", "yes", "on")
    async with state.pool.connection() as conn:
        found = await queries.set_flag(conn, event_id, column, value)
    await state.audit(request, column if value else f"un{column}", event_id, "ok" if found else "no such event")
    if not found:
        raise web.HTTPNotFound(text="no such event\n")
    raise back(request, f"/events/{quote(event_id)}")


async def event_notes(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    event_id = request.match_info["event_id"]
    form = await request.post()
    notes = str(form.get("notes", ""))
    if len(notes) > MAX_NOTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_NOTES, actual_size=len(notes))
    async with state.pool.connection() as conn:
        found = await queries.set_notes(conn, event_id, notes.replace("\x00", ""))
    await state.audit(request, "notes", event_id, "ok" if found else "no such event")
    if not found:
        raise web.HTTPNotFound(text="no such event\n")
    raise back(request, f"/events/{quote(event_id)}", msg="notes saved")


async def _stream(request: web.Request, fd: int, content_type: str, headers: dict[str, str]) -> web.StreamResponse:
    """A file already opened (and checked) by descriptor, sent in chunks read in a thread: a clip of
    gigabytes neither blocks the event loop nor sits in memory."""
    f = open(fd, "rb")  # noqa: SIM115 - closed below, after the last chunk
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise web.HTTPNotFound()
        resp = web.StreamResponse(headers={**headers, "Content-Type": content_type})
        resp.content_length = st.st_size
        await resp.prepare(request)
        while chunk := await asyncio.to_thread(f.read, FILE_CHUNK):
            await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        f.close()


async def _send_file(request: web.Request, path: Path, content_type: str) -> web.StreamResponse:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        raise web.HTTPNotFound(text="gone (retention, or not made)\n") from None
    return await _stream(request, fd, content_type, {"Cache-Control": "private, max-age=86400"})


async def event_image(request: web.Request) -> web.StreamResponse:
    """The snapshot or thumbnail the analyzer made (a file read, never a decode)."""
    state: Web = request.app["web"]
    event_id, which = request.match_info["event_id"], request.match_info["which"]
    async with state.pool.connection() as conn:
        e = await queries.event(conn, event_id)
    rel = (e or {}).get("snapshot" if which == "snapshot" else "thumbnail")
    if not rel or not SNAPSHOT_NAME.match(rel):
        raise web.HTTPNotFound(text="no snapshot\n")
    return await _send_file(request, state.snapshots / rel, "image/jpeg")


async def media(request: web.Request) -> web.StreamResponse:
    """The original upload of one detection, as a download (beneath the media root, no symlink)."""
    state: Web = request.app["web"]
    async with state.pool.connection() as conn:
        rel = await queries.detection_path(conn, request.match_info["detection_id"])
    if rel is None:
        raise web.HTTPNotFound(text="no such detection\n")
    try:
        fd = open_beneath(state.config.media_root, rel)
    except (ValueError, OSError):
        raise web.HTTPNotFound(text="the file is gone (retention?)\n") from None
    name = printable(Path(rel).name)
    disposition = {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}"}
    return await _stream(request, fd, "application/octet-stream", disposition)


# ---- cameras, audit -------------------------------------------------------------------------------
async def cameras_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    from services.health.service import camera_folders

    folders = await asyncio.to_thread(camera_folders, state.config.media_root, state.config.watcher.camera_prefix)
    async with state.pool.connection() as conn:
        cams = await queries.cameras(conn, folders)
        alerts = await queries.camera_alerts(conn)
    if request.path.startswith("/api/"):
        return to_json({"cameras": cams, "alerts": alerts})
    return state.render(request, "cameras.html", nav="cameras", cameras=cams, alerts=alerts)


async def audit_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    target = request.query.get("target") or None
    async with state.pool.connection() as conn:
        entries = await queries.audit(conn, target)
    if request.path.startswith("/api/"):
        return to_json({"entries": entries})
    return state.render(request, "audit.html", nav="audit", entries=entries, target=target)


# ---- services ---------------------------------------------------------------------------------------
def bus(state: Web):
    if state.js is None:
        raise web.HTTPServiceUnavailable(text="still connecting to NATS; try again in a moment\n")
    return state.js


async def service_rows(state: Web) -> list[dict]:
    bus(state)
    snap = await snapshot(state.nc, state.config)
    rows = []
    for s in snap.services:
        row = msgspec.structs.asdict(s)
        row["unit_name"] = s.unit or control.unit_of(
            s.service, s.instance if s.service == "detector" and s.unit else None
        )
        rows.append(row)
    return rows


async def services_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    rows = await service_rows(state)
    if request.path.startswith("/api/"):
        return to_json({"services": rows, "supervisor": control.supervisor(state.config)})
    name = "service_rows.html" if request.path.endswith("/rows") else "services.html"
    return state.render(request, name, nav="services", services=rows, supervisor=control.supervisor(state.config))


async def service_action(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    unit, action = request.match_info["unit"], request.match_info["action"]
    try:
        if control.check(unit, action) == "web":  # it ends this very process: say so first, then ask
            await state.audit(request, action, unit, "ok: the web UI restarts itself")
            await control.act(state.config, unit, action, no_block=True)
            raise back(request, "/services", msg=f"{action} {unit}: restarting; reload in a few seconds")
        result = await control.act(state.config, unit, action)
    except (control.NotAllowed, RuntimeError) as exc:
        await state.audit(request, action, unit, f"refused: {exc}")
        raise back(request, "/services", err=f"{action} {unit}: {exc}") from None
    await state.audit(request, action, unit, result)
    raise back(request, "/services", msg=f"{action} {unit}: {result}")


async def logs_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    unit = request.match_info["unit"]
    try:
        control.check(unit, "start")
    except control.NotAllowed as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    return state.render(request, "logs.html", nav="services", unit=unit, levels=control.LEVELS, level="info")


async def logs_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the last lines, then each new one (journald, or `vigil up`'s log file)."""
    state: Web = request.app["web"]
    unit = request.match_info["unit"]
    minimum = request.query.get("level", "info")
    try:
        lines = control.follow(state.config, unit)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        async for line in lines:
            if control.level_ok(line, minimum):
                await resp.write(f"data: {json.dumps(line, default=str)}\n\n".encode())
    except control.NotAllowed as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    except (ConnectionResetError, RuntimeError):
        pass  # the browser went away
    return resp


async def logs_download(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    unit = request.match_info["unit"]
    try:
        lines = [x async for x in control.recent(state.config, unit, 5000)]
        text = "\n".join(
            f"{when(x['time']) if isinstance(x['time'], (int, float)) else x['time'] or ''} {x['level']:7} {x['event']}"
            + "".join(f" {k}={v}" for k, v in x["fields"].items())
            for x in lines
        )
    except control.NotAllowed as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    return web.Response(
        text=text + "\n", headers={"Content-Disposition": f"attachment; filename={unit}-{int(time.time())}.log"}
    )


# ---- dead letters -----------------------------------------------------------------------------------
async def dead_letters_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    letters = await dlq_ops.operate(bus(state), state.config, "list", None)
    if request.path.startswith("/api/"):
        return to_json({"dead_letters": letters})
    return state.render(request, "dead_letters.html", nav="dlq", letters=letters)


async def dead_letter_page(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    try:
        seq = int(request.match_info["seq"])
        letter = await dlq_ops.operate(bus(state), state.config, "show", seq)
    except (ValueError, LookupError) as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    return state.render(
        request, "dead_letter.html", nav="dlq", seq=seq, letter=json.dumps(letter, indent=2, default=str)
    )


async def dead_letter_retry(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    seq_text = request.match_info["seq"]
    try:
        result = await dlq_ops.operate(bus(state), state.config, "retry", int(seq_text))
    except (ValueError, LookupError, *NATS_ERRORS) as exc:
        await state.audit(request, "retry", f"dlq:{seq_text}", f"refused: {exc}")
        raise back(request, "/dead-letters", err=str(exc)) from None
    await state.audit(request, "retry", f"dlq:{seq_text}", f"ok: back on {result['subject']}")
    raise back(request, "/dead-letters", msg=f"dead letter {seq_text} is back on {result['subject']}")


async def dead_letters_purge(request: web.Request) -> web.StreamResponse:
    state: Web = request.app["web"]
    form = await request.post()
    if form.get("confirm") != "yes":
        raise back(request, "/dead-letters", err="tick the box to purge every letter")
    try:
        result = await dlq_ops.operate(bus(state), state.config, "purge", None)
    except NATS_ERRORS as exc:
        await state.audit(request, "purge", "dlq", f"failed: {exc!r}"[:200])
        raise back(request, "/dead-letters", err=f"purge failed: {exc!r}"[:200]) from None
    await state.audit(request, "purge", "dlq", f"ok: {result['purged']} purged")
    raise back(request, "/dead-letters", msg=f"{result['purged']} dead letters purged")


# ---- uploads ----------------------------------------------------------------------------------------
async def upload(request: web.Request) -> web.Response:
    state: Web = request.app["web"]
    camera = request.match_info["camera"]
    request["actor"] = f"camera:{printable(camera)[:64]}"
    bearer = request.headers.get("Authorization", "")
    if not bearer.startswith("Bearer "):
        return json_error(401, "unauthorized", "send the camera's token: Authorization: Bearer <token>")
    try:
        # the token first: without it nobody learns which camera names exist
        if not uploads.valid_camera(camera) or not auth.upload_token_ok(camera, bearer.removeprefix("Bearer ")):
            raise uploads.Refused(401, "bad_token", "this token is not the camera's")
        folder = uploads.camera_folder(state.config.media_root, camera)
        w = state.config.watcher
        answer = await uploads.receive(
            request.content,
            folder,
            w.camera_prefix + camera,
            state.cfg.upload_max_bytes,
            request.content_length,
            {e.lower() for e in (*w.image_extensions, *w.clip_extensions)},
        )
    except uploads.Refused as exc:
        if exc.status == 401 and state.audit_once(("upload", state.client(request))):
            await state.audit(request, "upload", printable(camera)[:128], f"refused: {exc.detail}")
        return json_error(exc.status, exc.error, exc.detail)
    return web.json_response(answer, status=202)


async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/events")


# ---- the app ---------------------------------------------------------------------------------------
def make_app(state: Web) -> web.Application:
    app = web.Application(
        middlewares=[host_guard(state.cfg.allowed_hosts), headers, make_auth(state)],
        client_max_size=MAX_FORM_BYTES,
    )
    app["web"] = state
    ev = r"{event_id:[^/]{1,200}}"
    app.add_routes(
        [
            web.get("/", home),
            web.get("/login", login_page),
            web.post("/login", login),
            web.post("/logout", logout),
            web.get("/events", events_page),
            web.get("/events/rows", event_rows),
            web.post("/events/mark-reviewed", mark_all_reviewed),
            web.get(f"/events/{ev}", event_page),
            web.get(f"/events/{ev}/{{which:snapshot|thumb}}.jpg", event_image),
            web.post(f"/events/{ev}/{{flag:reviewed|keep}}", event_flag),
            web.post(f"/events/{ev}/notes", event_notes),
            web.get("/media/{detection_id}", media),
            web.get("/cameras", cameras_page),
            web.get("/services", services_page),
            web.get("/services/rows", services_page),
            web.post("/services/{unit}/{action}", service_action),
            web.get("/services/{unit}/logs", logs_page),
            web.get("/services/{unit}/logs/stream", logs_stream),
            web.get("/services/{unit}/logs/download", logs_download),
            web.get("/dead-letters", dead_letters_page),
            web.get("/dead-letters/{seq}", dead_letter_page),
            web.post("/dead-letters/purge", dead_letters_purge),
            web.post("/dead-letters/{seq}/retry", dead_letter_retry),
            web.get("/audit", audit_page),
            web.get("/api/v1/events", events_api),
            web.get(f"/api/v1/events/{ev}", event_page),
            web.get("/api/v1/cameras", cameras_page),
            web.get("/api/v1/services", services_page),
            web.get("/api/v1/dead-letters", dead_letters_page),
            web.get("/api/v1/audit", audit_page),
            web.post("/api/v1/uploads/{camera}", upload),
            web.static("/static", HERE / "static"),
        ]
    )
    return app
