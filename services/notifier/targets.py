"""Notification targets: Apprise URLs with their secrets filled in from credentials, and one send.

A rule's URL names its secrets as {secret:NAME}; the unit loads /etc/vigil/credentials/notify/ as
LoadCredential=notify:..., so each file NAME there is the credential notify_NAME. A missing secret or a
URL Apprise does not know stops the notifier at start, the rule and URL named (exit 78). What leaves
this module - a target's name, a failure's reason - never holds a secret: names are Apprise's masked
form, and every secret's text is scrubbed from a reason.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import NamedTuple

import apprise

from proto import Notification, printable
from services.runtime.config import SECRET_PLACEHOLDER, Config, ConfigError, credential

SECRET_PREFIX = "notify_"
_TYPES = {
    "info": apprise.NotifyType.INFO,
    "warning": apprise.NotifyType.WARNING,
    "critical": apprise.NotifyType.FAILURE,
}


def outline(template: str) -> str:
    """A URL as the operator wrote it, reduced to its scheme (for `vigil notify list`, which does not read
    the secrets): many schemes carry a token where a host would be (pover://user@TOKEN, tgram://BOT/CHAT)."""
    scheme = template.split("://", 1)[0] if "://" in template else ""
    return f"{scheme}://..." if re.fullmatch(r"[a-z0-9+]{1,20}", scheme) else "(unparsable URL)"


# what a target may echo back of the request: its credentials, in any form
_AUTH = re.compile(r"\b(Basic|Bearer|Token)\s+[A-Za-z0-9+/=._~-]{4,}", re.I)


class Target(NamedTuple):
    rule: str
    index: int
    name: str  # Apprise's privacy form of the URL
    secrets: tuple[str, ...]
    server: apprise.Apprise

    def scrub(self, text: str) -> str:
        text = _AUTH.sub(r"\1 ***", text)
        for s in self.secrets:
            if s:
                text = text.replace(s, "***")
                text = text.replace(urllib.parse.quote(s, safe=""), "***")
        return printable(text)

    async def send(self, n: Notification, timeout: float, attach: str | None = None) -> str | None:
        """None once the target accepted `n` (with the file `attach` where its kind takes attachments:
        email, ntfy, Pushover, Telegram, Discord, Slack, Matrix, JSON webhooks), else why not (secrets
        scrubbed)."""
        body = n.body + (f"\n{n.link}" if n.link else "")
        try:
            result = await self.server.async_notify(
                body=body,
                title=n.title,
                notify_type=_TYPES.get(n.severity, apprise.NotifyType.INFO),
                timeout=timeout,
                attach=attach,
            )
        except Exception as exc:  # noqa: BLE001 - a plugin's own bug must not take the delivery loop down
            return self.scrub(f"{type(exc).__name__}: {exc}")[:300]
        if result:
            return None
        lines = [e.message for r in result for e in r.logs() if e.level in ("WARNING", "ERROR", "CRITICAL")]
        return self.scrub("; ".join(dict.fromkeys(lines)) or f"Apprise status {result.status.name}")[:300]


def resolve(config: Config, environ=None) -> dict[tuple[str, int], Target]:
    """Every rule's targets, secrets filled in; ConfigError naming the rule and URL when one cannot be."""
    out: dict[tuple[str, int], Target] = {}
    for i, rule in enumerate(config.notify.rules):
        for j, template in enumerate(rule.urls):
            where = f"notify.rules[{i}] ({rule.name}).urls[{j}]"
            secrets: list[str] = []

            def fill(m, where=where, secrets=secrets) -> str:
                value = credential(SECRET_PREFIX + m.group(1), environ)
                if value is None:
                    raise ConfigError(
                        f"config error: {where}: secret {m.group(1)!r} not found (credential {SECRET_PREFIX}{m.group(1)},"
                        f" the file /etc/vigil/credentials/notify/{m.group(1)})"
                    )
                secrets.append(value)
                return urllib.parse.quote(value, safe="")

            url = SECRET_PLACEHOLDER.sub(fill, template)
            plugin = apprise.Apprise.instantiate(url)
            if plugin is None:
                raise ConfigError(
                    f"config error: {where}: Apprise cannot use {outline(template)!r} (unknown scheme or bad form)"
                )
            # Apprise's own socket timeouts (4 s) would cut a slow target short of notify.timeout_seconds
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
            if "rto" not in query:
                plugin.socket_read_timeout = config.notify.timeout_seconds
            if "cto" not in query:
                plugin.socket_connect_timeout = min(config.notify.timeout_seconds, 10.0)
            server = apprise.Apprise()
            server.add(plugin)
            # masked by Apprise; its query (defaults it spells out: retry=0&wait=0.5...) only adds noise
            name = printable(plugin.url(privacy=True).split("?", 1)[0])
            out[(rule.name, j)] = Target(rule.name, j, name, tuple(secrets), server)
    return out
