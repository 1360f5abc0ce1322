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

from urllib.parse import quote

from aiohttp import web

from services.runtime.config import credential
from services.runtime.http import host_guard
from services.web import auth, operate, pages
from services.web.core import CSP, HERE, MAX_FORM_BYTES, OPEN, Web, json_error, same_origin


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
            web.get("/login", pages.login_page),
            web.post("/login", pages.login),
            web.post("/logout", pages.logout),
            web.get("/events", pages.events_page),
            web.get("/events/rows", pages.event_rows),
            web.post("/events/mark-reviewed", pages.mark_all_reviewed),
            web.get(f"/events/{ev}", pages.event_page),
            web.get(f"/events/{ev}/{{which:snapshot|thumb}}.jpg", pages.event_image),
            web.post(f"/events/{ev}/{{flag:reviewed|keep}}", pages.event_flag),
            web.post(f"/events/{ev}/notes", pages.event_notes),
            web.get("/media/{detection_id}", pages.media),
            web.get("/cameras", pages.cameras_page),
            web.get("/services", operate.services_page),
            web.get("/services/rows", operate.services_page),
            web.post("/services/{unit}/{action}", operate.service_action),
            web.get("/services/{unit}/logs", operate.logs_page),
            web.get("/services/{unit}/logs/stream", operate.logs_stream),
            web.get("/services/{unit}/logs/download", operate.logs_download),
            web.get("/dead-letters", operate.dead_letters_page),
            web.get("/dead-letters/{seq}", operate.dead_letter_page),
            web.post("/dead-letters/purge", operate.dead_letters_purge),
            web.post("/dead-letters/{seq}/retry", operate.dead_letter_retry),
            web.get("/audit", pages.audit_page),
            web.get("/api/v1/events", pages.events_api),
            web.get(f"/api/v1/events/{ev}", pages.event_page),
            web.get("/api/v1/cameras", pages.cameras_page),
            web.get("/api/v1/services", operate.services_page),
            web.get("/api/v1/dead-letters", operate.dead_letters_page),
            web.get("/api/v1/audit", pages.audit_page),
            web.post("/api/v1/uploads/{camera}", operate.upload),
            web.static("/static", HERE / "static"),
        ]
    )
    return app
