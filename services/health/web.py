"""health's HTTP side (aiohttp) and its Prometheus metrics (prometheus-client).

    GET /health/live    200 while health's own check loop runs (for a supervisor probing health itself)
    GET /health/ready   200 when no service is down or stale, else 503 with the offenders
    GET /status         the latest snapshot as JSON - the same document as `vigil status --json`
    GET /metrics        Prometheus text format (series below)
    GET /               a small read-only page: services, backlog, GPUs, disks, alerts, last events

Series (labels in braces):
    vigil_service_up{service,instance}                  1 healthy/degraded, 0 down/stale
    vigil_service_verdict{service,instance,verdict}     1 for the current verdict
    vigil_service_restarts_total{service,instance}      systemd NRestarts (when systemd is there)
    vigil_service_uptime_seconds{service,instance}
    vigil_service_in_flight{service,instance}
    vigil_service_operations_total{service,instance,counter}   the service's own counters (published, rejected, ...)
    vigil_files_rejected_total{camera}                      files the watcher refused (dead letters of stage watcher)
    vigil_stage_backlog{stage}, vigil_stage_pending{stage}, vigil_stage_ack_pending{stage}
    vigil_stage_redelivered_total{stage}, vigil_stage_oldest_unacked_seconds{stage}
    vigil_dead_letters{stage}                           messages in the DLQ stream per failing stage
    vigil_files_detected_total{camera}                  Detections messages seen (per image or clip frame)
    vigil_detections_total{camera,label}                boxes seen
    vigil_inference_seconds                             histogram: detector inference per batch member
    vigil_detect_latency_seconds                        histogram: file settled -> detection published
    vigil_camera_last_upload_timestamp_seconds{camera}
    vigil_alerts_firing{kind}
    vigil_disk_free_bytes{path}, vigil_disk_total_bytes{path}
    vigil_gpu_utilization_percent{host,gpu}, vigil_gpu_memory_used_bytes{host,gpu}, vigil_gpu_memory_total_bytes{host,gpu},
    vigil_gpu_temperature_celsius{host,gpu}, vigil_gpu_power_watts{host,gpu}
"""

from __future__ import annotations

import html
import json
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import proto
from services.health.checks import Snapshot, fmt_age, healthy_enough, snapshot_json
from services.runtime.config import Config
from services.runtime.http import bind, host_guard


class HealthState:
    """What the check loop learnt last, read by the HTTP handlers and the metrics collector."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.snapshot: Snapshot | None = None
        self.checked_at = 0.0  # monotonic time of the last completed check
        self.firing: dict[str, proto.Alert] = {}
        self.cameras: dict[str, float] = {}  # camera -> last upload (wall clock)
        # camera -> the camera_mtime of its latest upload when that one's clock was not plausible
        self.clock_suspect: dict[str, float] = {}
        self.events: deque[dict] = deque(maxlen=20)
        self.seed_error: str | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.files = Counter(
            "vigil_files_detected",
            "Detections messages seen (one per image or clip frame)",
            ["camera"],
            registry=self.registry,
        )
        self.boxes = Counter("vigil_detections", "Detection boxes seen", ["camera", "label"], registry=self.registry)
        self.inference = Histogram(
            "vigil_inference_seconds",
            "Detector inference time per image/frame",
            registry=self.registry,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.rejected = Counter(
            "vigil_files_rejected", "Files the watcher refused (see vigil dlq list)", ["camera"], registry=self.registry
        )
        self.latency = Histogram(
            "vigil_detect_latency_seconds",
            "File settled on disk -> detection published",
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.registry.register(_SnapshotCollector(self))

    def observe(self, value: proto.Message) -> None:
        """Called for every message health sees on its plain subscriptions."""
        match value:
            case proto.FileUploaded():
                self.cameras[value.camera] = max(self.cameras.get(value.camera, 0.0), time.time())
                if value.clock_suspect:
                    self.clock_suspect[value.camera] = value.camera_mtime or 0.0
                else:
                    self.clock_suspect.pop(value.camera, None)
            case proto.DeadLetter() if value.stage == "watcher":
                self.rejected.labels(value.camera or "_").inc()
            case proto.Detections():
                self.files.labels(value.camera).inc()
                for box in value.boxes:
                    self.boxes.labels(value.camera, box.label).inc()
                self.inference.observe(value.inference_ms / 1000.0)
                if value.published_at:
                    self.latency.observe(max(0.0, time.time() - value.published_at))
            case proto.EventClosed():
                known = next((ev for ev in self.events if ev["event_id"] == value.event_id), None)
                entry = {
                    "event_id": value.event_id,
                    "camera": value.camera,
                    "started_at": value.started_at,
                    "ended_at": value.ended_at,
                    "labels": sorted(value.labels),
                    "revision": value.revision,
                    "risk": known["risk"] if known else None,
                    "summary": known["summary"] if known else None,
                }
                if known is None:
                    self.events.append(entry)
                elif value.revision >= known["revision"]:  # a later revision: the same event, updated
                    known.update(entry)
            case proto.EventAnalyzed():
                for ev in self.events:
                    if ev["event_id"] == value.event_id:
                        ev["risk"] = f"{value.risk_level} {value.risk_score}" + (
                            " (fallback)" if value.fallback else ""
                        )
                        ev["summary"] = value.summary

    def update(self, snap: Snapshot, firing: dict[str, proto.Alert]) -> None:
        self.snapshot, self.firing = snap, dict(firing)
        self.checked_at = time.monotonic()

    def summary(self) -> str:
        if self.snapshot is None:
            return "no check yet"
        bad = [s.key for s in self.snapshot.services if s.verdict in ("down", "stale")]
        return (
            f"{len(self.snapshot.services) - len(bad)} up, {len(bad)} down"
            + (f" ({', '.join(bad)})" if bad else "")
            + f", {len(self.firing)} alerts firing"
        )

    def status_document(self) -> dict:
        data = snapshot_json(self.snapshot) if self.snapshot else {}
        data["alerts_firing"] = [json.loads(proto.encode(a)) for a in self.firing.values()]
        data["cameras"] = {c: round(t, 3) for c, t in sorted(self.cameras.items())}
        data["events"] = list(self.events)
        return data


class _SnapshotCollector:
    """Gauges built fresh from the latest snapshot on each scrape, so a vanished instance or stage
    vanishes from /metrics too (no stale label sets)."""

    def __init__(self, state: HealthState) -> None:
        self.state = state

    def collect(self):
        snap = self.state.snapshot
        if snap is None:
            return
        svc = ["service", "instance"]
        up = GaugeMetricFamily("vigil_service_up", "1 when healthy or degraded, 0 when down or stale", labels=svc)
        verdict = GaugeMetricFamily(
            "vigil_service_verdict", "1 for the service's current verdict", labels=[*svc, "verdict"]
        )
        restarts = CounterMetricFamily("vigil_service_restarts", "systemd NRestarts of the unit", labels=svc)
        uptime = GaugeMetricFamily("vigil_service_uptime_seconds", "Seconds since the instance started", labels=svc)
        in_flight = GaugeMetricFamily("vigil_service_in_flight", "Messages held by the instance right now", labels=svc)
        counters = CounterMetricFamily(
            "vigil_service_operations", "The instance's own counters since it started", labels=[*svc, "counter"]
        )
        for s in snap.services:
            ids = [s.service, s.instance or ""]
            up.add_metric(ids, 1.0 if s.verdict in ("healthy", "degraded") else 0.0)
            verdict.add_metric([*ids, s.verdict], 1.0)
            if s.restarts is not None:
                restarts.add_metric(ids, s.restarts)
            if s.uptime_s is not None:
                uptime.add_metric(ids, s.uptime_s)
                in_flight.add_metric(ids, s.in_flight)
            for name, value in s.counters.items():
                counters.add_metric([*ids, name], value)
        yield from (up, verdict, restarts, uptime, in_flight, counters)
        stage = ["stage"]
        families = {
            name: GaugeMetricFamily(f"vigil_stage_{name}", doc, labels=stage)
            for name, doc in (
                ("backlog", "Pending plus ack pending"),
                ("pending", "Not yet delivered"),
                ("ack_pending", "Delivered, not yet acked"),
                ("oldest_unacked_seconds", "Age of the oldest message the stage has not acked"),
            )
        }
        redelivered = CounterMetricFamily("vigil_stage_redelivered", "Messages redelivered to the stage", labels=stage)
        for st in snap.stages:
            families["backlog"].add_metric([st.consumer], st.backlog)
            families["pending"].add_metric([st.consumer], st.pending)
            families["ack_pending"].add_metric([st.consumer], st.ack_pending)
            families["oldest_unacked_seconds"].add_metric([st.consumer], st.oldest_unacked_s)
            redelivered.add_metric([st.consumer], st.redelivered)
        yield from (*families.values(), redelivered)
        dead = GaugeMetricFamily("vigil_dead_letters", "Messages in the DLQ stream per failing stage", labels=stage)
        for name, count in snap.dead_letters.items():
            dead.add_metric([name], count)
        yield dead
        last = GaugeMetricFamily(
            "vigil_camera_last_upload_timestamp_seconds", "When the camera last uploaded", labels=["camera"]
        )
        for camera, t in self.state.cameras.items():
            last.add_metric([camera], t)
        yield last
        firing = GaugeMetricFamily("vigil_alerts_firing", "Health alerts firing now", labels=["kind"])
        kinds: dict[str, int] = {}
        for a in self.state.firing.values():
            kinds[a.kind] = kinds.get(a.kind, 0) + 1
        for kind, n in kinds.items():
            firing.add_metric([kind], n)
        yield firing
        free = GaugeMetricFamily("vigil_disk_free_bytes", "Free bytes on the filesystem", labels=["path"])
        total = GaugeMetricFamily("vigil_disk_total_bytes", "Size of the filesystem", labels=["path"])
        for d in snap.disks:
            free.add_metric([d.path], d.free_bytes)
            total.add_metric([d.path], d.total_bytes)
        yield from (free, total)
        gpu = ["host", "gpu"]
        g = {
            name: GaugeMetricFamily(f"vigil_gpu_{name}", doc, labels=gpu)
            for name, doc in (
                ("utilization_percent", "GPU utilisation"),
                ("memory_used_bytes", "GPU memory used"),
                ("memory_total_bytes", "GPU memory"),
                ("temperature_celsius", "GPU temperature"),
                ("power_watts", "GPU power draw"),
            )
        }
        for s in snap.gpus:
            ids = [s.host, str(s.index)]
            for name, value in (
                ("utilization_percent", s.util_pct),
                ("memory_used_bytes", s.mem_used_mb and s.mem_used_mb * 2**20),
                ("memory_total_bytes", s.mem_total_mb and s.mem_total_mb * 2**20),
                ("temperature_celsius", s.temp_c),
                ("power_watts", s.power_w),
            ):
                if value is not None:
                    g[name].add_metric(ids, value)
        yield from g.values()


def make_app(state: HealthState):
    from aiohttp import web

    async def live(request):
        fresh = state.checked_at and time.monotonic() - state.checked_at < 3 * state.config.health.check_seconds + 10
        return web.json_response({"live": bool(fresh)}, status=200 if fresh else 503)

    async def ready(request):
        if state.snapshot is None:
            return web.json_response({"ready": False, "reason": "no check yet"}, status=503)
        bad = [
            {"service": s.key, "verdict": s.verdict, "reason": s.reason}
            for s in state.snapshot.services
            if s.verdict in ("down", "stale")
        ]
        ok = healthy_enough(state.snapshot)
        return web.json_response({"ready": ok, "not_ready": bad}, status=200 if ok else 503)

    async def status(request):
        return web.json_response(state.status_document())

    async def metrics(request):
        return web.Response(body=generate_latest(state.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def page(request):
        return web.Response(text=render_page(state), content_type="text/html")

    app = web.Application(middlewares=[host_guard(state.config.health.allowed_hosts)])
    app.add_routes(
        [
            web.get("/health/live", live),
            web.get("/health/ready", ready),
            web.get("/status", status),
            web.get("/metrics", metrics),
            web.get("/", page),
        ]
    )
    return app


async def start_http(state: HealthState, host: str, port: int):
    """Bind the HTTP server (before the service connects to NATS, so a port in use stops it at start
    with the field named - exit 78, no crash loop). Returns the runner; `await runner.cleanup()` stops it."""
    return await bind(make_app(state), host, port, "health")


def render_page(state: HealthState) -> str:
    """The read-only status page: plain HTML, refreshed by the browser every 5 s, no scripts."""
    e = html.escape
    snap = state.snapshot
    parts = [
        "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=5><title>vigil</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}.healthy{color:#070}.degraded{color:#a60}"
        ".down,.stale{color:#b00;font-weight:bold}</style><h1>vigil</h1>",
    ]
    if snap is None:
        parts.append("<p>no check yet</p>")
        return "".join(parts)
    parts.append(
        f"<p>checked {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(snap.taken_at))}; systemd: {e(snap.systemd)}</p>"
    )
    parts.extend(f"<p class=degraded>not readable now: {e(what)}</p>" for what in snap.unreadable)

    def table(title: str, head: list[str], rows: list[list[str]]) -> None:
        parts.append(f"<h2>{e(title)}</h2><table><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
        parts.append("</table>")

    table(
        "services",
        ["service", "verdict", "reason", "uptime", "restarts", "in flight", "backend", "last error"],
        [
            [
                e(s.key),
                f"<span class={s.verdict}>{s.verdict}</span>",
                e(s.reason),
                fmt_age(s.uptime_s),
                e(str(s.restarts or "")),
                str(s.in_flight),
                e(s.backend or ""),
                e(s.last_error or ""),
            ]
            for s in snap.services
        ],
    )
    table(
        "backlog",
        ["stage", "pending", "ack pending", "redelivered", "oldest unacked"],
        [
            [e(st.consumer), str(st.pending), str(st.ack_pending), str(st.redelivered), fmt_age(st.oldest_unacked_s)]
            for st in snap.stages
        ],
    )
    if state.firing:
        table(
            "alerts firing",
            ["kind", "camera", "message", "since"],
            [
                [e(a.kind), e(a.camera), e(a.message), fmt_age(time.time() - a.created_at)]
                for a in state.firing.values()
            ],
        )
    table(
        "GPUs",
        ["host", "gpu", "name", "util", "memory", "temp", "power"],
        [
            [
                e(g.host),
                str(g.index),
                e(g.name),
                f"{g.util_pct or 0:.0f}%",
                f"{g.mem_used_mb or 0:.0f}/{g.mem_total_mb or 0:.0f} MiB",
                f"{g.temp_c or 0:.0f} °C",
                f"{g.power_w or 0:.0f} W",
            ]
            for g in snap.gpus
        ]
        or [["-", "", "no GPU samples", "", "", "", ""]],
    )
    table(
        "disks",
        ["path", "free", "size"],
        [
            [e(d.path), f"{d.free_pct:.1f}% ({d.free_bytes // 2**30} GiB)", f"{d.total_bytes // 2**30} GiB"]
            for d in snap.disks
        ],
    )
    table(
        "cameras",
        ["camera", "last upload"],
        [[e(c), fmt_age(time.time() - t) + " ago"] for c, t in sorted(state.cameras.items())],
    )
    table(
        "last events",
        ["event", "camera", "started", "labels", "risk", "summary"],
        [
            [
                e(ev["event_id"]),
                e(ev["camera"]),
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev["started_at"])),
                e(", ".join(ev["labels"])),
                e(ev.get("risk") or "-"),
                e(ev.get("summary") or ""),
            ]
            for ev in reversed(state.events)
        ],
    )
    return "".join(parts)
