"""Per-service NATS users with least-privilege permissions, and the authorization block of nats.conf.

Each service connects as `vigil-<service>` with the password from its own credential
(`nats-<service>`), and may publish and subscribe only what its work needs - including the exact
JetStream API subjects (fetch from its own consumers, ack its own messages, read its own KV bucket).
Replies come back on a per-user inbox prefix (`_INBOX_<user>.>`), so no service can listen to another's
replies. The admin user `vigil` (credential `nats-password`: the CLI, `vigil provision`) may do anything.
No user means no access: nats-server refuses anonymous clients once an authorization block exists.

    python -m services.runtime.nats_auth CREDENTIALS_DIR [--bcrypt]   prints the authorization block
"""

from __future__ import annotations

import sys
from pathlib import Path

from proto.topology import (
    AGGREGATOR_STATE_BUCKET,
    EVENT_INDEX_BUCKET,
    EXHAUSTED_PREFIX,
    GPU_BUCKET,
    HEALTH_BUCKET,
    HEALTH_OBSERVES,
    HEARTBEAT_BUCKET,
    NOTIFIER_BUCKET,
    RETENTION_CHECK_SUBJECT,
    RETENTION_REPORT_SUBJECT,
    SERVICES,
    consumer,
    dlq_filter,
    every,
    subject,
)

ADMIN_USER = "vigil"
ADMIN_CREDENTIAL = "nats-password"


def user(service: str) -> str:
    return f"vigil-{service}"


def credential_name(service: str) -> str:
    return f"nats-{service}"


def inbox_prefix(user_name: str) -> str:
    return f"_INBOX_{user_name}"


def _consume(durable: str, stage: str) -> list[str]:
    """Fetch from and ack one durable consumer, and move its exhausted messages to the DLQ: read the
    message (MSG.GET), write the letter under the stage's own DLQ subjects, ack it on this consumer.
    Never STREAM.MSG.DELETE: that would let one stage remove work another consumer has not seen."""
    spec = consumer(durable)
    ex = f"{EXHAUSTED_PREFIX}{durable}"
    return [
        f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{durable}",
        f"$JS.ACK.{spec.stream}.{durable}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.ADVISORIES.{ex}",
        f"$JS.ACK.ADVISORIES.{ex}.>",
        f"$JS.API.STREAM.MSG.GET.{spec.stream}",
        dlq_filter(stage),
    ]


def _kv_write(bucket: str) -> list[str]:
    return [f"$KV.{bucket}.>"]


def _kv_read(bucket: str) -> list[str]:
    """get() (direct or not); keys are listed from STREAM.INFO (jetstream.kv_keys). Never CONSUMER.CREATE: a
    push consumer's deliver subject is not checked against its creator's publish permissions, so it
    would let a reader write anywhere (vigil.uploads.front_door, say) through the server."""
    stream = f"KV_{bucket}"
    return [f"$JS.API.DIRECT.GET.{stream}.>", f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.STREAM.MSG.GET.{stream}"]


# Re-publishing a dead letter onto its stage's input (services/runtime/dlq_retry.py) and taking it off
# the DLQ: health's automatic retries and the web UI's Dead letters page (the same code as `vigil dlq`).
_RETRY = [
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.STREAM.MSG.DELETE.DLQ",
    every("uploads"),
    every("detections"),
    every("events"),
    every("analysis"),
    every("notify"),
    every("gpu"),
]

# What every service does: look streams and consumers up.
_COMMON_PUB = ["$JS.API.INFO", "$JS.API.STREAM.INFO.>", "$JS.API.CONSUMER.INFO.>"]

PERMISSIONS: dict[str, dict[str, list[str]]] = {
    "watcher": {"publish": [every("uploads"), dlq_filter("watcher"), RETENTION_CHECK_SUBJECT], "subscribe": []},
    "detector": {
        "publish": [every("detections"), subject("alerts", "system"), *_consume("detector", "detector")],
        "subscribe": [],
    },
    "aggregator": {
        "publish": [
            every("events"),
            every("alerts"),
            *_consume("aggregator", "aggregator"),
            *_kv_write(AGGREGATOR_STATE_BUCKET),
            *_kv_read(AGGREGATOR_STATE_BUCKET),
            *_kv_write(EVENT_INDEX_BUCKET),
            *_kv_read(EVENT_INDEX_BUCKET),
        ],
        "subscribe": [],
    },
    "recorder": {
        "publish": [
            p
            for d in (
                "recorder-detections",
                "recorder-events",
                "recorder-analysis",
                "recorder-gpu",
                "recorder-alerts",
                "recorder-dlq",
            )
            for p in _consume(d, "recorder")
        ],
        "subscribe": [],
    },
    "gpu-stats": {"publish": [every("gpu"), *_kv_write(GPU_BUCKET)], "subscribe": []},
    # health also re-publishes transient dead letters to their stage's input (services/runtime/dlq_retry.py)
    "health": {
        "publish": [
            every("health"),
            every("alerts"),
            *_RETRY,
            *_kv_read(HEARTBEAT_BUCKET),
            *_kv_read(GPU_BUCKET),
            *_kv_read(HEALTH_BUCKET),
            *_kv_write(HEALTH_BUCKET),
        ],
        "subscribe": list(HEALTH_OBSERVES),
    },
    "retention": {"publish": [RETENTION_REPORT_SUBJECT], "subscribe": [RETENTION_CHECK_SUBJECT]},
    "analyzer": {"publish": [every("analysis"), *_consume("analyzer", "analyzer")], "subscribe": []},
    "notifier": {
        "publish": [
            every("notify"),
            *_consume("notifier", "notifier"),
            *_consume("notifier-alerts", "notifier"),
            *_consume("notifier-deliver", "notifier"),
            *_kv_write(NOTIFIER_BUCKET),
            *_kv_read(NOTIFIER_BUCKET),
        ],
        "subscribe": [],
    },
    # the web UI reads what the status page reads; its dead-letter page retries (the message back on
    # its stage's input, as `vigil dlq retry` does) and purges
    "web": {
        "publish": [
            *_RETRY,
            "$JS.API.STREAM.PURGE.DLQ",
            *_kv_read(HEARTBEAT_BUCKET),
            *_kv_read(GPU_BUCKET),
        ],
        "subscribe": [every("events"), every("analysis")],  # the events page updates live
    },
}


def permissions(service: str) -> dict[str, list[str]]:
    own = PERMISSIONS[service]
    # its own heartbeat keys only (`<service>.<instance>`): no service can speak for another
    return {
        "publish": sorted(set(_COMMON_PUB + own["publish"] + [f"$KV.{HEARTBEAT_BUCKET}.{service}.>"])),
        "subscribe": sorted(set(own["subscribe"] + [f"{inbox_prefix(user(service))}.>"])),
    }


def authorization_block(passwords: dict[str, str]) -> str:
    """nats.conf `authorization { users = [...] }`: `passwords` maps user -> password or bcrypt hash."""

    def q(values: list[str]) -> str:
        return "[" + ", ".join(f'"{v}"' for v in values) + "]"

    lines = ["authorization {", "  users = ["]
    lines.append(f'    {{ user: "{ADMIN_USER}", password: "{passwords[ADMIN_USER]}" }}')
    for service in SERVICES:
        perms = permissions(service)
        lines.append(
            f'    {{ user: "{user(service)}", password: "{passwords[user(service)]}",\n'
            f"      permissions: {{ publish: {{ allow: {q(perms['publish'])} }}, subscribe: {{ allow: {q(perms['subscribe'])} }} }} }}"
        )
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Used by ops/install.sh: read every credential, print the block with bcrypt hashes."""
    args = argv if argv is not None else sys.argv[1:]
    directory = Path(args[0])
    hashed = "--bcrypt" in args
    passwords = {}
    for name, cred in [(ADMIN_USER, ADMIN_CREDENTIAL)] + [(user(s), credential_name(s)) for s in SERVICES]:
        secret = (directory / cred).read_text().strip()
        if hashed:
            import bcrypt

            secret = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(11, prefix=b"2a")).decode()
        passwords[name] = secret
    sys.stdout.write(authorization_block(passwords))
    return 0


if __name__ == "__main__":
    sys.exit(main())
