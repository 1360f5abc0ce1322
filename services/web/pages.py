"""The web UI's pages about what the cameras saw, and the login: events (list, filters, live rows,
mark all reviewed), one event (snapshot, detections, analysis, reviewed / keep / notes), the images
and the original media, cameras, the audit trail. Each answers HTML, or JSON under /api/v1/."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import secrets
import stat
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from proto import printable
from proto.messages import RISK_LEVELS
from services.runtime.files import open_beneath
from services.web import auth, queries
from services.web.core import (
    FILE_CHUNK,
    MAX_NOTES,
    SNAPSHOT_NAME,
    Web,
    back,
    same_origin,
    to_json,
)

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
