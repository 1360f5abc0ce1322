"""Operator commands of the `vigil` CLI: look at the running system (and fix dead letters).

    vigil status [--json] [--watch]        heartbeats of every service instance, plus backlogs
    vigil streams [--json]                 streams and consumers with their limits and lag
    vigil tail KIND [--camera X] [--count N] [--json]   live messages, decoded, one line each
    vigil dlq list|show SEQ|retry SEQ|purge [--json]     dead letters; retry re-injects at the stage
    vigil events [--camera X] [--since 1h] [--json]      closed events from PostgreSQL
    vigil trace PATH_OR_FILE_ID [--json]   where one file is: detected, in which event, dead-lettered
    vigil config check [FILE]              validate a config file, naming a bad field

Every command reads the same config as the services (--config, $VIGIL_CONFIG, else
/etc/vigil/vigil.toml when present) and, run by an administrator, the passwords in
/etc/vigil/credentials. Tables are drawn with rich; --json prints machine-readable output.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

import msgspec

import proto
from proto import topology
from proto.topology import (
    CONSUMERS,
    NOTIFIER_BUCKET,
    RETENTION_REPORT_SUBJECT,
    STREAMS,
    SYSTEM_CAMERA,
    dlq_filter,
)
from services.cli.render import human, one_line
from services.runtime import dlq_ops
from services.runtime.config import Config, credential, load_config


def _database(config: Config):
    """PostgreSQL, for the commands that read it. Imported here, not at the top: every service starts
    through `vigil run` (services/cli/main.py imports this module), and psycopg would add 9 MB to the
    RSS of each one that never touches the database (watcher, detector, aggregator, gpu-stats)."""
    from services import database

    return database.connect(config)


def audit_cli(config: Config, action: str, target: str | None, result: str) -> None:
    """The audit trail's entry for an operator command (best effort: a database that is away must not
    turn a done action into a failed command; services/runtime/audit.py logs what it could not write)."""
    from services.runtime import audit

    try:
        with _database(config) as conn:
            audit.record_sync(conn, audit.cli_actor(), "cli", action, target, result)
    except Exception as exc:  # noqa: BLE001
        audit.log.warning("audit trail not written", action=action, target=target, error=str(exc)[:200])


def end_web_sessions(config: Config) -> int:
    """A new password ends every open session (best effort: 0 when the database is away)."""
    try:
        with _database(config) as conn:
            return conn.execute("DELETE FROM web_sessions").rowcount
    except Exception:  # noqa: BLE001
        return 0


def load_operator_config(path: str | None) -> Config:
    if path is None and not os.environ.get("VIGIL_CONFIG") and Path("/etc/vigil/vigil.toml").is_file():
        path = "/etc/vigil/vigil.toml"
    if "CREDENTIALS_DIRECTORY" not in os.environ and os.access("/etc/vigil/credentials", os.R_OK | os.X_OK):
        os.environ["CREDENTIALS_DIRECTORY"] = "/etc/vigil/credentials"
    return load_config(path)


async def connect_nats(config: Config):
    import nats

    password = credential(config.nats.password_credential)
    auth = {"user": config.nats.user or "vigil", "password": password} if password else {}
    return await nats.connect(
        servers=config.nats.servers, connect_timeout=config.nats.connect_timeout, max_reconnect_attempts=0, **auth
    )


def to_builtins(value):
    return msgspec.to_builtins(value)


def parse_since(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip())
    if not m:
        raise ValueError(f"--since {text!r}: use e.g. 30m, 1h, 2d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


# ---- data gathering (each returns plain data; printing is separate) ---------------------------
async def gather_status(config: Config) -> dict:
    """The same document the health service serves at /status (services/health/checks.py), taken now."""
    from services.health.checks import snapshot, snapshot_json

    nc = await connect_nats(config)
    try:
        return snapshot_json(await snapshot(nc, config))
    finally:
        await nc.close()


async def gather_streams(config: Config) -> list[dict]:
    nc = await connect_nats(config)
    js = nc.jetstream()
    out = []
    for spec in STREAMS:
        info = await js.stream_info(spec.name)
        consumers = []
        for c in (c for c in CONSUMERS if c.stream == spec.name):
            ci = await js.consumer_info(c.stream, c.durable)
            consumers.append(
                {
                    "name": c.durable,
                    "pending": ci.num_pending,
                    "ack_pending": ci.num_ack_pending,
                    "redelivered": ci.num_redelivered,
                    "max_deliver": c.max_deliver,
                    "ack_wait_s": c.ack_wait,
                }
            )
        out.append(
            {
                "name": spec.name,
                "subjects": list(spec.subjects),
                "retention": spec.retention,
                "messages": info.state.messages,
                "bytes": info.state.bytes,
                "max_bytes": spec.max_bytes,
                "max_age_s": spec.max_age,
                "consumers": consumers,
            }
        )
    await nc.close()
    return out


async def dlq(config: Config, action: str, seq: int | None, confirm=lambda letter, subject: True) -> dict | list:
    """`vigil dlq list|show|retry|purge`: `confirm(letter, subject)` is asked before a retry
    re-publishes, with the checked target."""
    nc = await connect_nats(config)
    try:
        return await dlq_ops.operate(nc.jetstream(), config, action, seq, confirm)
    finally:
        await nc.close()


def query_events(config: Config, camera: str | None, since: str | None) -> list[dict]:

    sql = (
        "SELECT e.event_id, e.camera, extract(epoch from started_at), extract(epoch from ended_at), detection_count, labels,"
        " close_reason, keep, a.risk_score, a.risk_level, a.summary, a.fallback FROM events e"
        " LEFT JOIN event_analysis a ON a.event_id = e.event_id WHERE (%(camera)s::text IS NULL OR e.camera = %(camera)s)"
        " AND (%(since)s::float IS NULL OR started_at >= now() - make_interval(secs => %(since)s)) ORDER BY started_at DESC LIMIT 500"
    )
    with _database(config) as conn:
        rows = conn.execute(sql, {"camera": camera, "since": parse_since(since) if since else None}).fetchall()
    return [
        {
            "event_id": r[0],
            "camera": r[1],
            "started_at": float(r[2]),
            "ended_at": float(r[3]),
            "detections": r[4],
            "labels": r[5],
            "close_reason": r[6],
            "keep": r[7],
            "risk_score": r[8],
            "risk_level": r[9],
            "summary": r[10],
            "analysis_fallback": r[11],
        }
        for r in rows
    ]


async def notify_list(config: Config) -> list[dict]:
    """The rules as configured, with their last firing (the notifier's bucket)."""
    from services.notifier import service as notifier
    from services.notifier.targets import outline

    nc = await connect_nats(config)
    try:
        kv = await nc.jetstream(timeout=5).key_value(NOTIFIER_BUCKET)
        out = []
        for rule in config.notify.rules:
            raw = await notifier.kv_get(kv, notifier.last_key(rule.name))
            last = msgspec.json.decode(raw, type=notifier.Firing) if raw else None
            out.append(
                {
                    "rule": rule.name,
                    "when": {
                        "cameras": rule.cameras,
                        "labels": rule.labels,
                        "zones": rule.zones,
                        "min_risk": rule.min_risk,
                        "min_level": rule.min_level,
                        "schedule": msgspec.to_builtins(rule.schedule) if rule.schedule else None,
                        "quiet_hours": rule.quiet_hours,
                        "cooldown_seconds": rule.cooldown_seconds,
                    },
                    "targets": [outline(u) for u in rule.urls],
                    "last_fired": msgspec.to_builtins(last) if last else None,
                }
            )
        return out
    finally:
        await nc.close()


async def notify_test(config: Config, rule_name: str, wait: float = 60.0) -> list[dict]:
    """Queue a test notification to each target of `rule_name` and wait for the notifier's verdict on each."""
    from services.notifier import service as notifier
    from services.notifier.targets import outline

    rule = next((r for r in config.notify.rules if r.name == rule_name), None)
    if rule is None:
        names = ", ".join(r.name for r in config.notify.rules) or "none configured"
        raise LookupError(f"no notify rule {rule_name!r} (rules: {names})")
    nc = await connect_nats(config)
    try:
        js = nc.jetstream(timeout=5)
        kv = await js.key_value(NOTIFIER_BUCKET)
        now = time.time()
        source = f"test-{int(now * 1000)}"
        notes = [
            proto.Notification(
                notification_id=f"{rule.name}:{source}:{i}",
                rule=rule.name,
                target=i,
                target_name=outline(url),
                camera=SYSTEM_CAMERA,
                source_id=source,
                title=f"vigil test: rule {rule.name}",
                body=f"A test of notify rule {rule.name} from `vigil notify test` on {time.strftime('%Y-%m-%d %H:%M:%S')}.",
                severity=rule.severity,
                event_time=now,
                created_at=now,
                test=True,
            )
            for i, url in enumerate(rule.urls)
        ]
        for n in notes:
            await js.publish(
                proto.subject("notify", n.camera), proto.encode(n), headers=proto.headers_for(n, n.notification_id)
            )
        results: dict[str, dict] = {}
        deadline = time.monotonic() + wait
        while len(results) < len(notes) and time.monotonic() < deadline:
            for n in notes:
                if n.notification_id in results:
                    continue
                for key, ok in (
                    (notifier.delivered_key(n.notification_id), True),
                    (notifier.failed_key(n.notification_id), False),
                ):
                    raw = await notifier.kv_get(kv, key)
                    if raw:
                        d = msgspec.json.decode(raw, type=notifier.Delivery)
                        results[n.notification_id] = {"target": d.target, "delivered": ok, "error": d.error}
            await asyncio.sleep(0.5)
        return [
            results.get(n.notification_id)
            or {
                "target": n.target_name,
                "delivered": None,
                "error": f"no answer within {wait:.0f} s: is vigil-notifier running?",
            }
            for n in notes
        ]
    finally:
        await nc.close()


async def provision_all(config: Config) -> dict:
    """Declare everything, retrying for up to 60 s: run right after nats-server starts (vigil-nats
    ExecStartPost), the server may not listen yet, and a cluster may not have elected a JetStream
    leader yet (the API then times out or answers 503)."""
    import nats.errors
    import structlog

    from services.runtime.provision import provision

    log = structlog.wrap_logger(structlog.PrintLogger(sys.stderr))
    deadline = time.monotonic() + 60
    while True:
        try:
            nc = await connect_nats(config)
            try:
                await provision(nc.jetstream(timeout=5), log, config.nats.replicas)
            finally:
                await nc.close()
            break
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            if time.monotonic() > deadline:
                raise OSError(f"could not provision within 60 s: {exc!r}") from None
            await asyncio.sleep(1.0)
    return {"streams": [s.name for s in STREAMS], "consumers": [c.durable for c in CONSUMERS]}


def set_event_flag(config: Config, event_id: str, column: str, value: bool) -> dict:
    """`vigil events keep|unkeep|reviewed|unreviewed ID`, recorded in the audit trail."""
    from services.runtime import audit

    assert column in ("keep", "reviewed")
    extra = ", reviewed_at = CASE WHEN %(v)s THEN now() END" if column == "reviewed" else ""
    with _database(config) as conn:
        row = conn.execute(
            f"UPDATE events SET {column} = %(v)s{extra} WHERE event_id = %(id)s RETURNING event_id, {column}",
            {"v": value, "id": event_id},
        ).fetchone()
        if row is not None:
            audit.record_sync(conn, audit.cli_actor(), "cli", column if value else f"un{column}", event_id, "ok")
    if row is None:
        raise LookupError(f"no event {event_id!r}")
    return {"event_id": row[0], column: row[1]}


def keep_event(config: Config, event_id: str, keep: bool) -> dict:
    return set_event_flag(config, event_id, "keep", keep)


async def retention_run(config: Config, dry_run: bool) -> dict:
    """One retention run from the command line (the report is published only by the service)."""
    from services.retention.service import gather_and_run

    nc = await connect_nats(config)
    try:
        report = await gather_and_run(config, nc.jetstream(), "cli", dry_run)
        if not dry_run:
            import structlog

            from services.runtime.provision import provision

            # idempotent: the stream exists even before any service ran; its log lines go to stderr, not into --json
            await provision(
                nc.jetstream(), structlog.wrap_logger(structlog.PrintLogger(sys.stderr)), config.nats.replicas
            )
            await nc.jetstream().publish(
                RETENTION_REPORT_SUBJECT,
                proto.encode(report),
                headers=proto.headers_for(report, f"retention-{report.run_id}"),
            )
    finally:
        await nc.close()
    return to_builtins(report)


async def trace(config: Config, needle: str) -> dict:

    # an absolute path under the media root means the same as the root-relative one the pipeline keeps
    root = os.path.abspath(config.media_root)
    if os.path.isabs(needle) and os.path.commonpath([root, os.path.abspath(needle)]) == root:
        needle = os.path.relpath(os.path.abspath(needle), root)
    with _database(config) as conn:
        rows = conn.execute(
            "SELECT d.detection_id, d.file_id, d.camera, d.path, d.frame, d.labels, extract(epoch from d.recorded_at), e.event_id"
            " FROM detections d LEFT JOIN event_detections e ON e.detection_id = d.detection_id"
            " WHERE d.file_id = %s OR d.path = %s OR d.path LIKE %s ORDER BY d.detection_id",
            (needle, needle, f"%/{needle}"),
        ).fetchall()
    detections = [
        {
            "detection_id": r[0],
            "file_id": r[1],
            "camera": r[2],
            "path": r[3],
            "frame": r[4],
            "labels": r[5],
            "recorded_at": float(r[6]),
            "event_id": r[7],
        }
        for r in rows
    ]
    file_ids = {d["file_id"] for d in detections}
    nc = await connect_nats(config)
    letters = [
        {"seq": s, "stage": d.stage, "reason": d.reason, "path": d.path}
        for s, _, d in await dlq_ops.dead_letters(nc.jetstream())
        if isinstance(d, proto.DeadLetter)
        and (d.file_id in file_ids or d.file_id == needle or d.path == needle or needle in d.original_payload)
    ]
    await nc.close()
    rejected = [d for d in letters if d["stage"] == "watcher"]
    stage = (
        "recorded"
        if detections
        else rejected[-1]["reason"]
        if rejected
        else "dead-lettered"
        if letters
        else "not found (not yet uploaded, or in flight)"
    )
    return {
        "query": needle,
        "stage": stage,
        "detections": detections,
        "events": sorted({d["event_id"] for d in detections if d["event_id"]}),
        "dead_letters": letters,
    }


async def tail(config: Config, kind: str, camera: str | None, count: int | None, as_json: bool) -> None:
    nc = await connect_nats(config)
    # dead letters are vigil.dlq.<stage>.<camera>: one level deeper than the rest
    subject = dlq_filter(camera=camera or "*") if kind == "dlq" else topology.subject(kind, camera or "*")
    seen = 0
    done = asyncio.Event()

    async def handle(msg):
        nonlocal seen
        try:
            value = proto.decode(msg.data, msg.headers)
            line = json.dumps(to_builtins(value)) if as_json else human(f"{msg.subject}  {one_line(value)}")
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            line = (
                json.dumps({"subject": msg.subject, "undecodable": msg.data[:200].decode("utf-8", "replace")})
                if as_json
                else human(f"{msg.subject}  (undecodable)")
            )
        print(line, flush=True)
        seen += 1
        if count and seen >= count:
            done.set()

    await nc.subscribe(subject, cb=handle)
    try:
        await done.wait()
    finally:
        await nc.close()


# ---- printing -----------------------------------------------------------------------------------
