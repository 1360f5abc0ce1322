"""What the system looks like right now: facts gathered from the bus, systemd and the disks, and the
verdict on every service. Shared by the health service (/status, /metrics, alerts) and `vigil status`,
so the two always agree.

Verdicts, per service instance (the heartbeat key `<service>.<instance>`):
    healthy   heartbeat fresh, state ready, every work loop making progress
    degraded  running but impaired: detector on CPU fallback, stopping, a work loop without progress
    stale     the heartbeat is older than `health.stale_seconds`: hung, killed, or cut off from NATS
    down      stopped (a clean "stopped" heartbeat, or its systemd unit inactive/failed/restarting),
              or an expected service with no instance at all
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

import proto
from proto import GpuSample, Heartbeat
from proto.topology import CONSUMERS, DLQ_ALL, GPU_BUCKET, HEARTBEAT_BUCKET, SERVICES, STREAMS, dlq_subject_stage, token
from services.runtime import jetstream
from services.runtime.config import Config

# A work loop that has not beaten for this long is stuck even if the process still heartbeats
# (idle loops beat after every empty fetch, so this is never legitimate).
NO_PROGRESS_SECONDS = 60.0


class ServiceStatus(msgspec.Struct, kw_only=True):
    service: str
    instance: str | None  # None: the service as a whole has no instance
    verdict: proto.messages.Verdict
    reason: str
    state: str | None = None  # the heartbeat's own state
    host: str | None = None
    pid: int | None = None
    version: str | None = None
    age_s: float | None = None  # since the last heartbeat
    uptime_s: float | None = None
    in_flight: int = 0
    counters: dict[str, int] = {}
    backend: str | None = None
    last_error: str | None = None
    unit: str | None = None  # systemd, when it is there
    active_state: str | None = None
    sub_state: str | None = None
    restarts: int | None = None
    unreadable: dict[str, str] = {}  # the watcher's cameras with files vigil may not read

    @property
    def key(self) -> str:
        return f"{self.service}.{self.instance or '*'}"


class StageStatus(msgspec.Struct, kw_only=True):
    consumer: str
    stream: str
    pending: int  # not yet delivered
    ack_pending: int  # delivered, not yet acked
    redelivered: int
    oldest_unacked_s: float  # age of the oldest message this consumer has not acked; 0 when none

    @property
    def backlog(self) -> int:
        return self.pending + self.ack_pending


class DiskStatus(msgspec.Struct, kw_only=True):
    path: str
    total_bytes: int
    free_bytes: int

    @property
    def free_pct(self) -> float:
        return 100.0 * self.free_bytes / self.total_bytes if self.total_bytes else 0.0


class ReplicaStatus(msgspec.Struct, kw_only=True):
    node: str
    current: bool
    offline: bool
    lag: int  # operations behind the leader


class StreamStatus(msgspec.Struct, kw_only=True):
    """A stream's place in a NATS cluster (on a single server: no leader, no replicas)."""

    name: str
    messages: int
    bytes: int
    leader: str | None = None
    replicas: list[ReplicaStatus] = []

    @property
    def lagging(self) -> list[str]:
        return [r.node for r in self.replicas if r.offline or not r.current]


class Snapshot(msgspec.Struct, kw_only=True):
    taken_at: float
    services: list[ServiceStatus]
    stages: list[StageStatus]
    disks: list[DiskStatus]
    gpus: list[GpuSample]
    dead_letters: dict[str, int]  # per stage
    systemd: str  # "available", or why not
    streams: list[StreamStatus] = []
    nodes: list[str] = []  # NATS cluster nodes seen as leaders or replicas (empty on a single server)
    # What could not be read this time and why, e.g. a consumer whose raft group is electing a new leader
    # after a node died (JetStream answers 503 for a few seconds): the rest of the snapshot still stands.
    unreadable: list[str] = []


class UnitState(msgspec.Struct, kw_only=True):
    unit: str
    active_state: str
    sub_state: str
    restarts: int


# ---- gathering -----------------------------------------------------------------------------------
async def read_bucket(nc, bucket: str, kind: type) -> list[tuple[str, Any]]:
    """Every (key, value of type `kind`) in a KV bucket; entries that vanish meanwhile or do not decode
    are skipped."""
    import nats.js.errors

    out = []
    try:
        kv = await nc.jetstream().key_value(bucket)
        for key in await jetstream.kv_keys(nc, bucket):
            with contextlib.suppress(
                nats.js.errors.KeyNotFoundError,
                nats.js.errors.KeyDeletedError,
                msgspec.DecodeError,
                msgspec.ValidationError,
                ValueError,
            ):
                value = proto.decode((await kv.get(key)).value)
                if isinstance(value, kind):
                    out.append((key, value))
    except (nats.js.errors.NoKeysError, nats.js.errors.BucketNotFoundError):
        pass
    return out


def trusted_heartbeats(entries: list[tuple[str, Heartbeat]]) -> list[Heartbeat]:
    """Heartbeats whose service and instance are those of their key. Each service may write only
    `<service>.>` keys (services/runtime/nats_auth.py), so the key says who wrote it; a payload that claims to
    be another service or instance is someone posing, and is dropped."""
    return [hb for key, hb in entries if key == f"{hb.service}.{hb.instance}"]


async def read_heartbeats(nc) -> list[Heartbeat]:
    return trusted_heartbeats(await read_bucket(nc, HEARTBEAT_BUCKET, Heartbeat))


async def read_gpus(nc) -> list[GpuSample]:
    return sorted((s for _, s in await read_bucket(nc, GPU_BUCKET, GpuSample)), key=lambda s: (s.host, s.index))


def fmt_age(seconds: float | None) -> str:
    """30s, 5m, 2.5h: for tables and the status page."""
    if seconds is None:
        return ""
    return (
        f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"
    )


def _age(stamp, now: float) -> float:
    """Seconds since a stream message's timestamp (nats-py gives a datetime or an RFC 3339 string)."""
    from datetime import datetime

    if isinstance(stamp, str):
        text = stamp.rstrip("Z")
        head, _, frac = text.partition(".")
        stamp = datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00" if frac else head + "+00:00")
    if isinstance(stamp, datetime):
        return max(0.0, now - stamp.timestamp())
    return 0.0


def _unreadable(what: str, exc: BaseException) -> str:
    import nats.js.errors

    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return f"{what}: JetStream temporarily unavailable (a leader election after a node left?)"
    return f"{what}: {type(exc).__name__}: {exc}"


# Answers that mean "not now" rather than "not there": the snapshot notes them and goes on.
def _transient() -> tuple[type[BaseException], ...]:
    import nats.errors
    import nats.js.errors

    return (nats.js.errors.APIError, nats.errors.TimeoutError, asyncio.TimeoutError)


async def read_stages(js, now: float, unreadable: list[str] | None = None) -> list[StageStatus]:
    import nats.js.errors

    out = []
    for c in CONSUMERS:
        try:
            info = await js.consumer_info(c.stream, c.durable)
        except nats.js.errors.NotFoundError:
            continue
        except _transient() as exc:
            if unreadable is not None:
                unreadable.append(_unreadable(f"consumer {c.durable}", exc))
            continue
        oldest = 0.0
        if info.num_pending or info.num_ack_pending:
            # The first message after the ack floor is the oldest one this consumer still owes an ack.
            with contextlib.suppress(
                nats.js.errors.NotFoundError, nats.errors.Error, asyncio.TimeoutError, ValueError, TypeError
            ):
                msg = await js.get_msg(
                    c.stream,
                    seq=(info.ack_floor.stream_seq if info.ack_floor else 0) + 1,
                    subject=c.filter_subject,
                    next=True,
                )
                oldest = round(_age(msg.time, now), 1)
        out.append(
            StageStatus(
                consumer=c.durable,
                stream=c.stream,
                pending=info.num_pending,
                ack_pending=info.num_ack_pending,
                redelivered=info.num_redelivered,
                oldest_unacked_s=oldest,
            )
        )
    return out


async def read_streams(js, unreadable: list[str] | None = None) -> list[StreamStatus]:
    import nats.js.errors

    out = []
    for spec in STREAMS:
        try:
            info = await js.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            continue
        except _transient() as exc:
            if unreadable is not None:
                unreadable.append(_unreadable(f"stream {spec.name}", exc))
            continue
        cluster = info.cluster
        out.append(
            StreamStatus(
                name=spec.name,
                messages=info.state.messages,
                bytes=info.state.bytes,
                leader=cluster.leader if cluster else None,
                replicas=[
                    ReplicaStatus(node=r.name, current=bool(r.current), offline=bool(r.offline), lag=int(r.lag or 0))
                    for r in (cluster.replicas or [])
                ]
                if cluster
                else [],
            )
        )
    return out


async def read_dead_letters(js, unreadable: list[str] | None = None) -> dict[str, int]:
    """Dead letters per stage (subjects vigil.dlq.<stage>.<camera>)."""
    import nats.js.errors

    try:
        info = await js.stream_info("DLQ", subjects_filter=DLQ_ALL)
    except nats.js.errors.NotFoundError:
        return {}
    except _transient() as exc:
        if unreadable is not None:
            unreadable.append(_unreadable("dead letters", exc))
        return {}
    out: dict[str, int] = {}
    for subject, count in (info.state.subjects or {}).items():
        stage = dlq_subject_stage(subject) or "?"
        out[stage] = out.get(stage, 0) + count
    return out


def disk_paths(config: Config) -> list[str]:
    return config.health.disk_paths or [config.media_root, config.state_dir]


def read_disks(paths: Iterable[str]) -> list[DiskStatus]:
    out = []
    for path in paths:
        with contextlib.suppress(OSError):  # not mounted/created yet: nothing to report
            usage = shutil.disk_usage(path)
            out.append(DiskStatus(path=path, total_bytes=usage.total, free_bytes=usage.free))
    return out


def systemd_available() -> bool:
    return Path("/run/systemd/system").is_dir()


def read_units() -> tuple[list[UnitState], str]:
    """`systemctl show` for every loaded vigil-* service unit (blocking: run in a thread)."""
    if not systemd_available():
        return [], "not running under systemd"
    try:
        proc = subprocess.run(
            ["systemctl", "show", "--property=Id,ActiveState,SubState,NRestarts", "vigil-*.service"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"systemctl failed: {exc}"
    if proc.returncode != 0:
        return [], f"systemctl failed: {proc.stderr.strip()[:200]}"
    return parse_systemctl_show(proc.stdout), "available"


def parse_systemctl_show(text: str) -> list[UnitState]:
    """`systemctl show` prints KEY=VALUE blocks separated by blank lines, one block per unit."""
    units = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if fields.get("Id"):
            units.append(
                UnitState(
                    unit=fields["Id"],
                    active_state=fields.get("ActiveState", "?"),
                    sub_state=fields.get("SubState", "?"),
                    restarts=int(fields.get("NRestarts") or 0),
                )
            )
    return units


def unit_service(unit: str) -> tuple[str, str | None] | None:
    """vigil-watcher.service -> ("watcher", None); vigil-detector@0.service -> ("detector", "0")."""
    if not unit.startswith("vigil-") or not unit.endswith(".service"):
        return None
    name = unit[len("vigil-") : -len(".service")]
    service, _, template = name.partition("@")
    return service, template or None


# ---- judging (pure) ------------------------------------------------------------------------------
def stale_after(config: Config) -> float:
    return config.health.stale_seconds or 1.5 * config.heartbeat_seconds


def judge_heartbeat(hb: Heartbeat, now: float, stale: float) -> tuple[str, str]:
    age = now - hb.sent_at
    if hb.state == "stopped":
        return "down", f"stopped {age:.0f}s ago"
    if age > stale:
        return "stale", f"no heartbeat for {age:.0f}s"
    if hb.state == "stopping":
        return "degraded", "stopping"
    if hb.state == "degraded":
        return "degraded", hb.backend or "degraded"
    if hb.last_progress is not None and now - hb.last_progress > NO_PROGRESS_SECONDS:
        return "degraded", f"a work loop has made no progress for {now - hb.last_progress:.0f}s"
    return "healthy", "ready"


def judge(
    heartbeats: list[Heartbeat],
    units: list[UnitState],
    expected: Iterable[str],
    now: float,
    stale: float,
    host: str | None = None,
    gone: dict[str, float] | None = None,
) -> list[ServiceStatus]:
    """A verdict for every instance seen in heartbeats or systemd, plus one for each expected service
    with no instance. `gone`: instance keys health saw before whose heartbeat has since expired
    (key -> when last seen); they stay down until the instance is back."""
    out: dict[str, ServiceStatus] = {}
    for hb in heartbeats:
        verdict, reason = judge_heartbeat(hb, now, stale)
        out[f"{hb.service}.{hb.instance}"] = ServiceStatus(
            service=hb.service,
            instance=hb.instance,
            verdict=verdict,
            reason=reason,
            state=hb.state,
            host=hb.host,
            pid=hb.pid,
            version=hb.version,
            age_s=round(now - hb.sent_at, 1),
            uptime_s=round(now - hb.started_at, 1),
            in_flight=hb.in_flight,
            counters=hb.counters,
            backend=hb.backend,
            last_error=hb.last_error,
            unreadable=hb.unreadable,
        )
    for key, last_seen in (gone or {}).items():
        if key not in out:
            service, _, instance = key.partition(".")
            out[key] = ServiceStatus(
                service=service,
                instance=instance,
                verdict="down",
                reason=f"heartbeat expired (last seen {now - last_seen:.0f}s ago)",
            )
    for u in units:
        parsed = unit_service(u.unit)
        if parsed is None:
            continue
        service, template = parsed
        # The heartbeat instance of a unit is "<host>" or "<host>-<template>" (services/cli/main.py).
        instance = (host or "") + (f"-{template}" if template else "")
        s = out.get(f"{service}.{instance}") if host else None
        if s is None:
            # an instance named otherwise (VIGIL_INSTANCE set by hand), but only one running on this host
            s = next(
                (
                    x
                    for x in out.values()
                    if x.service == service
                    and x.unit is None
                    and (host is None or token(x.host or "") == host)
                    and (template is None or (x.instance or "").endswith(f"-{template}"))
                ),
                None,
            )
        if s is None:
            if u.active_state == "inactive":
                continue  # a unit nobody started (vigil-detector@1 on a one-GPU box); an expected service
                # with no instance at all is reported below
            # nats and postgresql send no heartbeats: their unit state is the verdict. A vigil service
            # unit without a heartbeat is starting, or cut off from NATS.
            up = u.active_state == "active" and service not in SERVICES
            s = out[f"{service}.{instance or u.unit}"] = ServiceStatus(
                service=service,
                instance=instance or None,
                verdict="healthy" if up else "down",
                reason=f"unit {u.active_state} ({u.sub_state})" + ("" if service not in SERVICES else ", no heartbeat"),
            )
        s.unit, s.active_state, s.sub_state, s.restarts = u.unit, u.active_state, u.sub_state, u.restarts
        if u.active_state in ("failed", "inactive", "activating", "deactivating") and s.verdict in (
            "healthy",
            "degraded",
            "stale",
        ):
            s.verdict, s.reason = "down", f"unit {u.active_state} ({u.sub_state}), {u.restarts} restarts"
    for service in expected:
        if not any(s.service == service for s in out.values()):
            out[f"{service}.*"] = ServiceStatus(
                service=service, instance=None, verdict="down", reason="no instance has sent a heartbeat"
            )
    return sorted(out.values(), key=lambda s: s.key)


async def snapshot(nc, config: Config, now: float | None = None, gone: dict[str, float] | None = None) -> Snapshot:
    """Everything at once; `vigil status --json` prints exactly this (health adds its memory via `gone`)."""
    import socket

    now = now or time.time()
    js = nc.jetstream()
    unreadable: list[str] = []
    heartbeats, stages, dead, gpus, streams = await asyncio.gather(
        read_heartbeats(nc),
        read_stages(js, now, unreadable),
        read_dead_letters(js, unreadable),
        read_gpus(nc),
        read_streams(js, unreadable),
    )
    nodes = sorted({n for st in streams for n in ([st.leader] if st.leader else []) + [r.node for r in st.replicas]})
    if config.health.systemd:
        units, systemd = await asyncio.to_thread(read_units)
    else:
        units, systemd = [], "off (health.systemd = false)"
    disks = await asyncio.to_thread(read_disks, disk_paths(config))
    host = token(socket.gethostname())  # as the services write it into their key
    services = judge(heartbeats, units, config.health.expected_services, now, stale_after(config), host, gone)
    return Snapshot(
        taken_at=now,
        services=services,
        stages=stages,
        disks=disks,
        gpus=gpus,
        dead_letters=dead,
        systemd=systemd,
        streams=streams,
        nodes=nodes,
        unreadable=unreadable,
    )


def snapshot_json(snap: Snapshot) -> dict:
    """The /status document: the snapshot plus derived numbers (backlog, free percent)."""
    data = msgspec.to_builtins(snap)
    for stage, s in zip(data["stages"], snap.stages, strict=False):
        stage["backlog"] = s.backlog
    for disk, d in zip(data["disks"], snap.disks, strict=False):
        disk["free_pct"] = round(d.free_pct, 2)
    return data


def healthy_enough(snap: Snapshot) -> bool:
    """/health/ready: no service is down or stale."""
    return all(s.verdict in ("healthy", "degraded") for s in snap.services)
