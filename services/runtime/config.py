"""Typed configuration: one TOML file plus environment overrides, validated once at start.

A bad value stops the service before it does anything, with the field named:
    config error: Expected `float`, got `str` - at `$.watcher.settle_seconds` (from VIGIL_WATCHER__SETTLE_SECONDS)

Environment overrides use `VIGIL_<SECTION>__<FIELD>`, e.g. `VIGIL_NATS__SERVERS=nats://a:4222,nats://b:4222`
(double underscore between levels because field names contain single ones), or `VIGIL_<FIELD>` for a
top-level field such as `VIGIL_MEDIA_ROOT`. Variables whose first part is not a config field
(VIGIL_CONFIG, VIGIL_MODELS_DIR) are not overrides; within a known section, an unknown field is an error.
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
import urllib.parse
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from proto.messages import RiskLevel, Severity
from proto.topology import SERVICES

ENV_PREFIX = "VIGIL_"


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class NatsConfig(_Section):
    servers: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["nats://127.0.0.1:4222"]
    )
    user: str | None = None
    # Name of the systemd credential (LoadCredential=) holding the password; never in this file.
    password_credential: str = "nats-password"
    connect_timeout: float = 5.0
    # Seconds between reconnect attempts; the client never gives up (max_reconnect_attempts=-1).
    reconnect_wait: float = 1.0
    publish_timeout: float = 5.0
    # A server that stops answering (a partitioned cluster node, a dead link) is given up on after
    # ping_interval x max_outstanding_pings seconds and the client moves to another server.
    ping_interval: float = 10.0
    max_outstanding_pings: int = 3
    # Every service declares the streams, consumers and KV buckets at start (idempotent). false: it only
    # checks they exist - for per-service NATS users without stream-admin rights; the installer then
    # runs `vigil provision` as the admin user.
    provision: bool = True
    # Connect as vigil-<service> with credential nats-<service> (least privilege, services/runtime/nats_auth.py)
    # instead of `user` with `password_credential`.
    per_service_users: bool = False
    # Copies of every stream, consumer and KV bucket: 1 on a single box, 3 on a 3-node NATS cluster
    # (survives the loss of one node). Applied by provisioning; raising it on a running system scales up.
    replicas: Literal[1, 3, 5] = 1  # copies of every stream: an odd quorum


class DatabaseConfig(_Section):
    dsn: str = "postgresql://vigil@127.0.0.1:5432/vigil"
    # Name of the systemd credential holding the password (added to the DSN at connect time).
    password_credential: str = "db-password"
    # Each service logs in as its own role (vigil_recorder, vigil_retention, vigil_health) with its own
    # credential (db-<service>), with only the rights its work needs (services/database.py). The
    # installer turns it on; the owner role above then migrates (vigil-postgres) and serves the CLI.
    per_service_roles: bool = False


class WatcherConfig(_Section):
    # A file is published once its size and mtime have not changed for this long.
    settle_seconds: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    # A settled file that is not whole (a JPEG without its end marker, an MP4 cut inside a box: an
    # FTP upload whose connection dropped) is held this long for the camera to resume it (APPE), then
    # rejected as truncated (a watcher dead letter); it is never processed as complete.
    incomplete_seconds: Annotated[float, msgspec.Meta(ge=0)] = 120.0
    # Camera clocks: an mtime more than this ahead of the file's arrival, or older than the longest
    # retention age (clock_floor_days, default retention's), is replaced by the arrival time and the
    # file is marked clock_suspect (health raises camera_clock).
    clock_skew_seconds: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    clock_floor_days: Annotated[float, msgspec.Meta(gt=0)] | None = None
    # Full rescan of the media root, to catch anything an inotify overflow missed.
    rescan_seconds: float = 300.0
    image_extensions: list[str] = msgspec.field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".webp"])
    clip_extensions: list[str] = msgspec.field(default_factory=lambda: [".mp4", ".mkv", ".avi", ".mov"])
    # Poll instead of inotify (network filesystems, some FUSE mounts).
    force_polling: bool = False
    # At most this many settled files are published concurrently, then marked in one transaction.
    publish_batch: int = 256
    # Several watchers on several folder hosts share one cluster: a per-host prefix keeps their camera
    # ids (and so file ids, events and retention's view of the database) apart, e.g. "site2-".
    camera_prefix: str = ""

    def __post_init__(self) -> None:
        # the separator at the end keeps "site1-" from matching the cameras of "site10-"
        if not re.fullmatch(r"([A-Za-z0-9_-]{0,31}[-_])?", self.camera_prefix):
            raise ValueError(
                "watcher.camera_prefix may only hold letters, digits, '-' and '_' (at most 32), ending in '-' or '_'"
            )


class CameraFilter(_Section):
    """Per-camera detector settings: which labels to keep and the minimum score per label."""

    labels: list[str] | None = None  # None keeps every label
    min_score: dict[str, float] = msgspec.field(default_factory=dict)


class DetectorConfig(_Section):
    # A model file name in models_dir ("yolox_nano.onnx"), a catalog name ("yolox-nano"),
    # "none" (no inference, zero boxes: measures the pipeline's own overhead) or "synthetic" (no
    # inference, one whole-frame person per frame: benchmarks of grouping, alerts and events).
    model: str = "yolox-nano"
    models_dir: str = "/var/lib/vigil/models"
    # "auto" picks the best available: tensorrt, then onnxruntime on CUDA, then the CPU.
    # "tensorrt", "cuda" (onnxruntime CUDA/TensorRT EP), "cpu", or "plugin:module:Class".
    backend: str = "auto"
    device: int = 0  # GPU index (vigil-detector@0 ...)
    precision: Literal["fp16", "fp32"] = "fp16"
    # "auto" reads the family from the model's output shape.
    family: Literal["auto", "yolox", "yolov8", "end2end"] = "auto"
    labels_file: str | None = None  # one label per line; default: model metadata, else COCO
    batch_size: Annotated[int, msgspec.Meta(ge=1)] = 16  # infer up to this many frames at once...
    # ...or whatever arrived within this long after the first. 0 (default): take what one fetch returns.
    # A follow-up pull that expires just as a message arrives orphans that message until ack_wait
    # (nats.py #933/#986), so waits shorter than 50 ms are rounded up to 50 ms.
    batch_wait_ms: float = 0.0
    fetch_timeout: float = 1.0
    decode_threads: Annotated[int, msgspec.Meta(ge=1)] = 2
    threads: int = 2  # onnxruntime intra-op threads on the CPU
    score_threshold: float = 0.30
    nms_iou: float = 0.45
    # Images larger than this many pixels are refused (decompression bombs).
    max_pixels: int = 50_000_000
    # Files above this size are dead-lettered unread.
    max_file_bytes: int = 256 * 1024 * 1024
    clip_fps: Annotated[float, msgspec.Meta(gt=0)] = 2.0  # frames sampled per second of video
    clip_max_frames: Annotated[int, msgspec.Meta(ge=1)] = 120
    # GPU -> CPU fallback: consecutive device errors before switching, then retry the GPU with backoff.
    gpu_max_errors: int = 3
    gpu_retry_seconds: float = 60.0
    gpu_retry_max_seconds: float = 1800.0
    engine_cache_dir: str | None = None  # default: <state_dir>/engines
    # A TensorRT engine missing from the cache is built once, at start, before READY (systemd's start
    # timeout is extended meanwhile). A build that takes longer is stopped: the detector starts on the
    # CPU (degraded, with the reason) and builds again at its next start.
    engine_build_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 1800.0
    cameras: dict[str, CameraFilter] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "tensorrt", "cuda", "cpu") and not (
            self.backend.startswith("plugin:") and self.backend.count(":") == 2
        ):
            raise ValueError(
                f"detector.backend {self.backend!r} is not auto, tensorrt, cuda, cpu or plugin:module:Class"
            )


class AggregatorConfig(_Section):
    # The grouping contract (services/aggregator/grouping.py): cut where the gap exceeds idle_seconds, where the
    # event would last longer than max_seconds, or hold more than max_detections detections (this
    # bounds every event message and KV entry far below NATS's 1 MiB max_payload).
    idle_seconds: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    max_seconds: float = 90.0
    max_detections: Annotated[int, msgspec.Meta(ge=1, le=4000)] = 1000
    alert_label: str = "person"
    alert_score: float = 0.90
    batch_size: int = 256
    # The reorder bound: a detection may arrive up to reorder_window detections of its camera, or up
    # to reorder_seconds, after one captured later, and still be grouped as if all came in order
    # (several detectors x their batch size; an upload held by a detector that was killed comes back
    # after 10 s, after 25 s if that happens twice: proto/topology.py). Once the detectors and this
    # stage have caught up, nothing waits.
    reorder_window: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 512
    reorder_seconds: Annotated[float, msgspec.Meta(ge=0, le=600)] = 30.0


class GpuStatsConfig(_Section):
    interval_seconds: float = 5.0
    nvidia_smi: str = "nvidia-smi"  # used when the NVML library cannot be loaded


class HealthConfig(_Section):
    # HTTP: /health/live, /health/ready, /status, /metrics, and a status page at /. Loopback only by
    # default: the page is read-only but shows camera names and errors.
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9470  # 0 turns the HTTP server off
    # Host names answered besides loopback ones (localhost, 127.0.0.1, [::1]), e.g. ["vigil.lan"] when
    # http_host is a LAN address. Any other Host header gets 421: DNS rebinding protection.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    check_seconds: Annotated[float, msgspec.Meta(gt=0)] = 2.0  # how often verdicts are recomputed
    # A heartbeat older than this is stale (default 1.5 x heartbeat_seconds, so a dead process shows
    # within two heartbeat intervals).
    stale_seconds: Annotated[float, msgspec.Meta(gt=0)] | None = None
    # Services that must be running; one with no live instance is down. Detector instances
    # (vigil-detector@N) count together.
    expected_services: list[str] = msgspec.field(default_factory=lambda: [s for s in SERVICES if s != "health"])
    down_alert_seconds: float = 60.0  # alert when a service has been down/stale this long
    backlog_alert_seconds: float = 300.0  # alert when a stage's backlog has grown for this long
    backlog_min: int = 10  # backlogs below this never alert
    disk_low_percent: Annotated[float, msgspec.Meta(ge=0, lt=100)] = (
        10.0  # alert when free space on a watched filesystem is below this
    )
    disk_paths: list[str] = msgspec.field(default_factory=list)  # default: media_root and state_dir
    # Alert when a camera (a folder under the media root) has sent nothing for this long; 0 = off.
    camera_silent_seconds: float = 86400.0
    cameras: dict[str, float] = msgspec.field(default_factory=dict)  # per-camera override of the above
    systemd: bool = True  # read unit states with `systemctl show` when systemd is running
    # Dead letters whose cause could pass (a crash, hang or timeout; not bad content) are re-published
    # once their stage is healthy: first after this long, then 4x longer each time, at most
    # dlq_retry_max times (services/runtime/dlq_retry.py). 0 turns it off.
    dlq_retry_seconds: Annotated[float, msgspec.Meta(ge=0)] = 300.0
    dlq_retry_max: Annotated[int, msgspec.Meta(ge=0, le=20)] = 3
    # Optional: every Alert is also POSTed here as JSON, retried with backoff.
    webhook_url: str | None = None
    webhook_attempts: int = 5
    webhook_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.webhook_url is not None and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"health.webhook_url {self.webhook_url!r} must start with http:// or https://")


class RetentionCamera(_Section):
    max_age_days: Annotated[float, msgspec.Meta(gt=0)] | None = None  # None: retention.max_age_days
    max_bytes: int | None = None  # None: retention.camera_max_bytes


class RetentionConfig(_Section):
    # Age and quota rules, and the database sweep, run every interval.
    interval_seconds: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    # Free space on the media filesystem is checked this often (and at once when the watcher asks).
    disk_check_seconds: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    max_age_days: Annotated[float, msgspec.Meta(gt=0)] = (
        30.0  # media older than this goes, per camera unless overridden
    )
    camera_max_bytes: int = 0  # per-camera size quota in bytes; 0 = none
    # A hidden file in a camera folder is an upload still under its temporary name; one this old never
    # finished (a dropped FTP connection, a crashed HTTP upload) and is deleted: the watcher never takes
    # hidden files, so nothing else would ever free their space.
    stale_upload_hours: Annotated[float, msgspec.Meta(gt=0)] = 24.0
    cameras: dict[str, RetentionCamera] = msgspec.field(default_factory=dict)
    # Watermarks: "10%" of the filesystem, or a size ("20GiB", "500MB", "1073741824"). Below the low
    # one, the oldest media go until free space is above the high one.
    low_watermark: str = "10%"
    high_watermark: str = "15%"
    min_keep_seconds: Annotated[float, msgspec.Meta(ge=0)] = (
        3600.0  # nothing younger than this is deleted, not even under pressure
    )
    # Rows older than these go (events marked keep never do). detections_days must be >= every
    # media age: a file whose rows are gone would no longer count as recorded, so it would never go.
    detections_days: float = 30.0
    events_days: float = 30.0
    alerts_days: float = 90.0
    gpu_samples_days: float = 7.0
    audit_days: float = 365.0  # the operators' audit trail (web UI and CLI actions)
    delete_batch: Annotated[int, msgspec.Meta(ge=1)] = 1000  # rows per DELETE statement: short locks, steady autovacuum
    missing_grace_days: float = 7.0  # rows whose file vanished are deleted after this long
    # Event snapshots (<state_dir>/snapshots) over this many bytes: the oldest of events not kept go; 0 = none.
    snapshots_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 2 * 1024**3

    def __post_init__(self) -> None:
        for name in ("low_watermark", "high_watermark"):
            try:
                parse_watermark(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"retention.{name}: {exc}") from None


class RecorderConfig(_Section):
    batch_size: int = 256
    fetch_timeout: float = 0.2


# "22:00-06:00": a daily time range in a time zone; it runs overnight when the end is earlier than the start.
TimeRange = Annotated[
    str, msgspec.Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]-(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")
]
Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Points = Annotated[int, msgspec.Meta(ge=-100, le=100)]


def check_timezone(name: str | None, where: str) -> None:
    """An IANA zone name (Europe/Berlin), or None for the machine's own (/etc/localtime)."""
    if name is None:
        return
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{where}: unknown time zone {name!r} (an IANA name such as Europe/Berlin)") from None


DEFAULT_LABEL_POINTS = {
    "person": 40,
    "car": 15,
    "truck": 15,
    "motorcycle": 15,
    "bicycle": 10,
    "bus": 10,
    "dog": 8,
    "horse": 8,
    "bear": 30,
    "cat": 5,
    "bird": 1,
}


class Zone(_Section):
    """A polygon in the camera's image pixels ([[x, y], ...], at least three corners). A box whose
    bottom-centre (where the feet are) lies inside it adds the zone's points."""

    name: Name
    polygon: Annotated[list[tuple[float, float]], msgspec.Meta(min_length=3, max_length=64)]
    points: Points = 20
    labels: list[str] | None = None  # None: every label that scores points


class AnalyzerCamera(_Section):
    """Per camera: its time zone and night hours, label points over the defaults, its zones."""

    timezone: str | None = None  # None: analyzer.timezone
    night: TimeRange | None = None  # None: analyzer.night
    label_points: dict[str, Points] = msgspec.field(default_factory=dict)
    zones: list[Zone] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        check_timezone(self.timezone, "timezone")
        names = [z.name for z in self.zones]
        if len(set(names)) != len(names):
            raise ValueError(f"zone names must be unique, got {names}")


class ModelConfig(_Section):
    """An OpenAI-compatible chat-completions endpoint (llama.cpp server, Ollama, vLLM) that judges each
    event; its reply must be the JSON the analyzer asks for. When it is down, slow or answers nonsense,
    the rules' result is published instead, flagged fallback with the reason."""

    url: str  # e.g. http://127.0.0.1:8080/v1/chat/completions
    model: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:/@+-]{1,200}$")] = "default"
    api_key_credential: str | None = None  # a credential holding the bearer token, if the endpoint wants one
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 20.0
    attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 2  # per event, with backoff
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2  # requests in flight at once
    vision: bool = False  # send the best frame (JPEG) to a vision model
    # After an event's attempts all failed, the model is skipped (rules only, flagged fallback) this long.
    retry_seconds: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    max_tokens: Annotated[int, msgspec.Meta(ge=16, le=8192)] = 400

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r} must start with http:// or https://")


class AnalyzerConfig(_Section):
    """The rule-based risk judgement (services/analyzer/rules.py): points per label, count, dwell, best
    score and zones, times night_multiplier during night hours, clamped to 0-100."""

    timezone: str | None = None  # IANA name; None: the machine's own
    night: TimeRange = "22:00-06:00"
    night_multiplier: Annotated[float, msgspec.Meta(ge=1, le=5)] = 1.5
    label_points: dict[str, Points] = msgspec.field(default_factory=lambda: dict(DEFAULT_LABEL_POINTS))
    other_label_points: Points = 2  # a label not in label_points
    count_points: Points = 3  # per detection of the top label after the first...
    count_max_points: Points = 12  # ...up to this
    dwell_points: Points = 15  # an event this long or longer gets them all, a shorter one its share
    dwell_full_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    score_points: Points = 10  # best score 1.0: +score_points, 0.5: 0, 0.0: -score_points
    cameras: dict[str, AnalyzerCamera] = msgspec.field(default_factory=dict)
    model: ModelConfig | None = None
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 64

    def __post_init__(self) -> None:
        check_timezone(self.timezone, "timezone")


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Schedule(_Section):
    """When a rule may fire: on these days, within these ranges. An overnight range belongs to the day it
    starts on ("fri" with "22:00-06:00" covers Friday night into Saturday morning)."""

    days: Annotated[list[Weekday], msgspec.Meta(min_length=1)] = msgspec.field(default_factory=lambda: list(WEEKDAYS))
    times: Annotated[list[TimeRange], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["00:00-24:00"]
    )


# {secret:NAME} in a notify URL is replaced by credential notify_NAME (the unit loads the folder
# /etc/vigil/credentials/notify/ as LoadCredential=notify:..., so its file NAME becomes notify_NAME).
SECRET_PLACEHOLDER = re.compile(r"\{secret:([A-Za-z0-9_.-]{1,64})\}")
_SECRET_QUERY_KEYS = {"pass", "password", "token", "apikey", "api_key", "key", "secret", "access_token", "auth"}


def clear_secret(url: str) -> str | None:
    """What in `url` looks like a secret written in clear (a password, a token parameter), or None."""
    plain = SECRET_PLACEHOLDER.sub("", url)
    try:
        parts = urllib.parse.urlsplit(plain)
    except ValueError:
        return None  # Apprise judges the URL itself at the notifier's start
    if parts.password:
        return "a password"
    for key, value in urllib.parse.parse_qsl(parts.query):
        if key.lower() in _SECRET_QUERY_KEYS and value:
            return f"the parameter {key}"
    return None


class NotifyRule(_Section):
    """Who is told about what (services/notifier/rules.py). Every condition given must hold."""

    name: Name
    # Apprise URLs (https://github.com/caronc/apprise/wiki): ntfy://, pover://, tgram://, mailto://,
    # discord://, slack://, matrix://, json://... Secrets as {secret:NAME}, never in clear.
    urls: Annotated[list[str], msgspec.Meta(min_length=1, max_length=16)]
    min_risk: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    min_level: RiskLevel | None = None
    labels: list[str] | None = None  # any of these labels (for camera "system": alert kinds, e.g. service_down)
    cameras: list[str] | None = None  # None: every camera but "system" (health's alerts go only to rules naming it)
    zones: list[str] | None = None  # a box stood in any of these analyzer zones
    timezone: str | None = None  # of schedule and quiet_hours; None: analyzer.timezone, else the machine's
    schedule: Schedule | None = None  # None: always
    quiet_hours: list[TimeRange] = msgspec.field(default_factory=list)
    severity: Severity = "warning"
    # After a firing, the same dedupe key does not fire again for this long (by event time).
    cooldown_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    dedupe: Annotated[list[Literal["camera", "rule", "label", "zone"]], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["camera", "rule"]
    )

    def __post_init__(self) -> None:
        if self.min_risk is not None and self.min_level is not None:
            raise ValueError(f"rule {self.name!r}: give min_risk or min_level, not both")
        check_timezone(self.timezone, f"rule {self.name!r}: timezone")
        for i, url in enumerate(self.urls):
            what = clear_secret(url)
            if what:
                raise ValueError(
                    f"rule {self.name!r}: urls[{i}] holds {what} in clear: put it in the credential"
                    " file notify/NAME and write {secret:NAME} in its place"
                )


class NotifyConfig(_Section):
    # The web UI's address; a notification then links to its event (<web_url>/events/<event id>).
    web_url: str | None = None
    # One delivery: this many tries, with exponential backoff between them, then a dead letter.
    attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 4
    retry_initial_seconds: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    retry_max_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 15.0  # one try, whatever the target
    rules: list[NotifyRule] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique: {', '.join(dupes)} twice")
        if self.web_url is not None and not self.web_url.startswith(("http://", "https://")):
            raise ValueError(f"web_url {self.web_url!r} must start with http:// or https://")
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError(
                f"retry_max_seconds ({self.retry_max_seconds}) must be >= retry_initial_seconds ({self.retry_initial_seconds})"
            )


class WebConfig(_Section):
    # The web UI (events, cameras, services, dead letters, audit trail) and the HTTP upload API.
    # Loopback by default: put it behind a reverse proxy with TLS to reach it from the LAN (README).
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8470
    # Host names answered besides loopback ones, e.g. ["vigil.lan"] behind a proxy (DNS rebinding guard).
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    # Addresses of reverse proxies whose X-Forwarded-For names the browser (the login limit and the
    # audit trail then see the browser, not the proxy). Nobody else's header is believed.
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    username: Name = "admin"
    # Credential holding the bcrypt hash of the login password (`vigil web password` writes it).
    password_credential: str = "web-password"
    session_hours: Annotated[float, msgspec.Meta(gt=0, le=24 * 30)] = 12.0
    # Mark the session cookie Secure: set this when the UI is served over HTTPS by a proxy.
    secure_cookies: bool = False
    # Failed logins allowed per client address in 15 minutes before it must wait.
    login_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    # Uploads: POST /api/v1/uploads/<camera> with the bearer token in credential upload_<camera>.
    upload_max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024 * 1024
    page_size: Annotated[int, msgspec.Meta(ge=5, le=500)] = 50


class Config(_Section):
    """Everything a vigil service reads. Each service uses only its own section plus the shared ones."""

    media_root: str = "/srv/vigil/media"
    state_dir: str = "/var/lib/vigil"
    log_format: Literal["auto", "journal", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Graceful drain bound on SIGTERM; systemd's TimeoutStopSec must be longer.
    drain_seconds: float = 10.0
    # Every this many seconds each service puts its Heartbeat into the vigil_heartbeats KV bucket.
    # At most 10: heartbeats expire from the bucket after 30 s.
    heartbeat_seconds: Annotated[float, msgspec.Meta(gt=0, le=10)] = 5.0
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    watcher: WatcherConfig = msgspec.field(default_factory=WatcherConfig)
    detector: DetectorConfig = msgspec.field(default_factory=DetectorConfig)
    aggregator: AggregatorConfig = msgspec.field(default_factory=AggregatorConfig)
    recorder: RecorderConfig = msgspec.field(default_factory=RecorderConfig)
    gpu_stats: GpuStatsConfig = msgspec.field(default_factory=GpuStatsConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    analyzer: AnalyzerConfig = msgspec.field(default_factory=AnalyzerConfig)
    notify: NotifyConfig = msgspec.field(default_factory=NotifyConfig)
    web: WebConfig = msgspec.field(default_factory=WebConfig)


def credential_folder() -> Path:
    """Where an operator command writes credentials ($CREDENTIALS_DIRECTORY: /etc/vigil/credentials on
    an appliance, .vigil/credentials under `vigil up`), or ValueError saying how to name it."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ValueError(
            "no credential folder: run it as root on the appliance (/etc/vigil/credentials), or set"
            " CREDENTIALS_DIRECTORY (under `vigil up`: .vigil/credentials)"
        )
    return Path(directory)


def credential(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A secret handed over by systemd's LoadCredential= ($CREDENTIALS_DIRECTORY/<name>), or None.

    Secrets never live in the config file, a unit file or the environment."""
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        mode = path.stat().st_mode
        if mode & 0o007:  # anyone on the machine could read it: refuse rather than use a leaked secret
            raise ConfigError(
                f"config error: credential file {path} is readable by other users (mode {mode & 0o777:o}); chmod 0600 it"
            )
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None  # this unit was not given that credential
    except PermissionError:
        raise ConfigError(f"config error: credential {name} in {directory} is not readable by this service") from None


class ConfigError(Exception):
    """Raised for any unusable configuration; the message names the field."""


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Nest VIGIL_A__B=v into {"a": {"b": v}}; list-typed fields accept comma-separated values."""
    tree: dict[str, Any] = {}
    origin: dict[str, str] = {}
    top_level = {f.name for f in msgspec.structs.fields(Config)}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = key[len(ENV_PREFIX) :].lower().split("__")
        if parts[0] not in top_level:
            continue  # VIGIL_CONFIG, VIGIL_MODELS_DIR and other tools' variables are not overrides
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config error: {key} conflicts with another VIGIL_ variable")
        node[parts[-1]] = value
        origin["$." + ".".join(parts)] = key
    return tree, origin


def _unannotated(hint: Any) -> Any:
    """`Annotated[list[str], Meta(...)]` -> `list[str]`."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint


def _listify(tree: dict[str, Any], struct: type[msgspec.Struct]) -> None:
    """Environment values are strings; split them where the field is a list."""
    hints = {f.name: f.type for f in msgspec.structs.fields(struct)}
    for name, value in tree.items():
        hint = hints.get(name)
        if isinstance(value, dict) and isinstance(hint, type) and issubclass(hint, msgspec.Struct):
            _listify(value, hint)
        elif isinstance(value, str) and typing.get_origin(_unannotated(hint)) is list:
            tree[name] = [v.strip() for v in value.split(",") if v.strip()]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None, instance: str | None = None
) -> Config:
    """Read the TOML file (if any), apply VIGIL_* overrides, validate. Raises ConfigError naming the field.

    `instance` is a systemd template instance (vigil-detector@cpu, vigil-detector@0): "cpu" pins the
    detector to the CPU backend, a number selects that GPU.
    """
    environ = dict(os.environ if environ is None else environ)
    if instance == "cpu":
        environ["VIGIL_DETECTOR__BACKEND"] = "cpu"
    elif instance is not None:
        if not instance.isdigit():
            raise ConfigError(f"config error: instance {instance!r} is neither 'cpu' nor a GPU index")
        environ["VIGIL_DETECTOR__DEVICE"] = instance
    path = path or environ.get("VIGIL_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config error: file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {path} is not valid TOML: {exc}") from None
    overrides, origin = _env_overrides(environ)
    _listify(overrides, Config)
    try:
        # strict=False lets environment strings become numbers/bools; the file must still be typed right
        msgspec.convert(data, Config)
        config = msgspec.convert(_merge(data, overrides), Config, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = next((env for field, env in origin.items() if text.endswith(f"`{field}`")), None)
        source = f" (from {where})" if where else (f" (in {path})" if path else "")
        raise ConfigError(f"config error: {text}{source}") from None
    _check(config)
    return config


def _check(config: Config) -> None:
    """The rules across fields. Every rule on one field is on the field itself (Meta, __post_init__);
    these two run after the environment's overrides are merged, since the file alone (type-checked
    strictly first) may be completed by them."""
    a = config.aggregator
    if a.max_seconds < a.idle_seconds:
        raise ConfigError(
            f"config error: aggregator.max_seconds ({a.max_seconds}) must be >= aggregator.idle_seconds ({a.idle_seconds})"
        )
    r = config.retention
    ages = [r.max_age_days] + [c.max_age_days for c in r.cameras.values() if c.max_age_days is not None]
    if r.detections_days < max(ages):
        raise ConfigError(
            f"config error: retention.detections_days ({r.detections_days}) must be >= the longest media age ({max(ages)} days)"
        )


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_watermark(text: str) -> tuple[str, float]:
    """ "10%" -> ("percent", 10.0); "20GiB" -> ("bytes", 21474836480.0)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|[KMGT]i?B|B)?\s*", text, re.I)
    if not m:
        raise ValueError(f"{text!r} is neither a percentage (10%) nor a size (20GiB, 500MB, bytes)")
    value, unit = float(m.group(1)), (m.group(2) or "").upper()
    if unit == "%":
        if not 0 <= value < 100:
            raise ValueError(f"{text!r}: a percentage must be in [0, 100)")
        return "percent", value
    return "bytes", value * _UNITS[unit]
