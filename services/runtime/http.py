"""What every vigil HTTP server shares (health's status page and the web UI)."""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def host_name(header: str) -> str:
    """The name part of a Host header: "[::1]:9470" -> "::1", "Box:80" -> "box"."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def host_allowed(header: str | None, extra: list[str] | tuple[str, ...] = ()) -> bool:
    """A Host header naming this machine over loopback (or one of `extra`, the names an operator
    configured for a LAN). DNS rebinding points a hostile name at 127.0.0.1: the browser then sends
    that name, and a page on the internet could read camera names, errors and events."""
    if not header:
        return False
    name = host_name(header)
    if name in LOOPBACK_NAMES or name in {e.lower() for e in extra}:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_guard(extra: list[str] | tuple[str, ...] = ()):
    """aiohttp middleware: 421 Misdirected Request for any other Host."""
    from aiohttp import web

    @web.middleware
    async def guard(request, handler):
        if not host_allowed(request.headers.get("Host"), extra):
            return web.Response(status=421, text="this host name is not served here (see health.allowed_hosts)\n")
        return await handler(request)

    return guard


async def bind(app, host: str, port: int, field: str, **runner_options):
    """Serve `app` on host:port, before the service connects to anything: a port in use stops it at
    start with the config field named (exit 78, no crash loop). Returns the runner (`cleanup()` stops it)."""
    from aiohttp import web

    from services.runtime.config import ConfigError

    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"config error: {field}.http_host/http_port {host}:{port}: {exc.strerror}") from None
    return runner
