"""What the web UI's handlers share: the `Web` state (config, database pool, bus, sessions, the login
limiter, templates, signed flash messages), template filters and small response helpers."""

from __future__ import annotations

import datetime as dt
import hmac
import re
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import msgspec
from aiohttp import web

from proto import SNAPSHOTS_DIR
from services.health.checks import fmt_age
from services.runtime import audit
from services.runtime.config import Config
from services.web import auth

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


def same_origin(request: web.Request) -> bool:
    """A browser names the page a write comes from (Origin, else Referer): it must be this host."""
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin or origin == "null":
        return origin is None  # no header: not a browser's cross-site form (those always send Origin)
    m = re.match(r"^https?://([^/]+)", origin)
    return bool(m) and m.group(1).lower() == (request.headers.get("Host") or "").lower()
