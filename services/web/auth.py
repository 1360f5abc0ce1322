"""Who may use the web UI: one operator account whose bcrypt hash is a credential, server-side sessions,
CSRF tokens, a limit on failed logins, and per-camera upload tokens.

- The password is never stored: credential `web.password_credential` holds its bcrypt hash
  (`vigil web password` writes it; the installer and `vigil up` make one and print the password once).
- A session is a random 256-bit token in an HttpOnly, SameSite=Strict cookie; PostgreSQL keeps only its
  SHA-256, the user and the session's CSRF token, so a database dump opens no session.
- Every write needs the session's CSRF token (form field `csrf` or header X-CSRF-Token) and, when the
  browser sends one, an Origin that is this very host: a page elsewhere cannot act with the cookie.
- Failed logins: `web.login_attempts` per client address in WINDOW seconds, then 429 with Retry-After
  (a try counts before bcrypt runs, so parallel guesses do not outrun it); past GLOBAL_FAILURES from
  everyone together every login is slowed, never refused (no one can lock the operator out).
- Upload tokens: credential `upload_<camera>` (a file <camera> in the credential folder `upload`),
  compared in constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass

import bcrypt

from services.runtime.config import Config, ConfigError, credential

SESSION_COOKIE = "vigil_session"
LOGIN_COOKIE = "vigil_login"  # the login form's own CSRF token (double submit: there is no session yet)
WINDOW = 15 * 60.0
GLOBAL_FAILURES = 100
UPLOAD_PREFIX = "upload_"


def password_hash(config: Config) -> bytes:
    """The login's bcrypt hash, or ConfigError naming the field (checked at start, not at first login)."""
    name = config.web.password_credential
    value = credential(name)
    if value is None:
        raise ConfigError(
            f"config error: web.password_credential: credential {name!r} not found"
            " (ops/install.sh writes it; `vigil web password` sets a new one)"
        )
    if not value.startswith(("$2a$", "$2b$", "$2y$")):
        raise ConfigError(
            f"config error: web.password_credential: credential {name!r} is not a bcrypt hash"
            " (store the hash, never the password: `vigil web password`)"
        )
    return value.encode()


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(12)).decode()


async def password_ok(hashed: bytes, password: str) -> bool:
    """bcrypt takes ~0.2 s on purpose: in a thread, so the event loop serves everyone else meanwhile."""
    try:
        return await asyncio.to_thread(bcrypt.checkpw, password.encode("utf-8", "surrogateescape")[:72], hashed)
    except ValueError:
        return False


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


@dataclass(frozen=True)
class Session:
    username: str
    csrf: str
    token: str


class Sessions:
    """Login sessions in table web_sessions (only the token's hash), expired ones swept on the way."""

    def __init__(self, pool, hours: float) -> None:
        self.pool, self.hours = pool, hours

    async def create(self, username: str) -> Session:
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        async with self.pool.connection() as conn:
            await conn.execute("DELETE FROM web_sessions WHERE expires_at < now()")
            await conn.execute(
                "INSERT INTO web_sessions (token_hash, username, csrf, expires_at)"
                " VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
                (token_hash(token), username, csrf, self.hours * 3600),
            )
        return Session(username, csrf, token)

    async def get(self, token: str | None) -> Session | None:
        if not token or len(token) > 100:
            return None
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT username, csrf FROM web_sessions WHERE token_hash = %s AND expires_at > now()",
                    (token_hash(token),),
                )
            ).fetchone()
        return Session(row[0], row[1], token) if row else None

    async def end(self, token: str) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("DELETE FROM web_sessions WHERE token_hash = %s", (token_hash(token),))


class LoginLimiter:
    """Failed logins per client address and overall, in a sliding window (in memory: a restart forgets,
    which costs a guesser nothing it could not get by waiting)."""

    def __init__(self, per_client: int, window: float = WINDOW, overall: int = GLOBAL_FAILURES) -> None:
        self.per_client, self.window, self.overall = per_client, window, overall
        self.failures: dict[str, deque[float]] = {}
        self.everyone: deque[float] = deque()

    def _trim(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.window:
            q.popleft()

    def wait_for(self, client: str, now: float | None = None) -> float:
        """Seconds this client must wait before its next try; 0 when it may try now."""
        now = time.monotonic() if now is None else now
        q = self.failures.get(client, deque())
        self._trim(q, now)
        self._trim(self.everyone, now)
        return q[0] + self.window - now if len(q) >= self.per_client else 0.0

    def slowdown(self, now: float | None = None) -> float:
        """Seconds every login waits while failures from everyone together are many (a guesser with
        many addresses): slower for all, refused for none, so nobody can lock the operator out."""
        self._trim(self.everyone, time.monotonic() if now is None else now)
        return 2.0 if len(self.everyone) >= self.overall else 0.0

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.failures.setdefault(client, deque()).append(now)
        self.everyone.append(now)
        if len(self.failures) > 10_000:  # bounded memory, whatever a flood of addresses does
            self.failures.pop(next(iter(self.failures)))

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)


def upload_token_ok(camera: str, presented: str | None) -> bool:
    """systemd's LoadCredential=upload:<folder> names the folder's file CAMERA `upload_CAMERA`; without
    systemd (`vigil up`, tests) the folder is there as it is: `upload/CAMERA`. `camera` is a checked
    camera id (letters, digits, '-', '_'), so it cannot lead out of the credential folder."""
    expected = credential(UPLOAD_PREFIX + camera) or credential(f"upload/{camera}")
    return expected is not None and same(presented, expected)
