"""Streams and durable consumers, declared as data and applied idempotently at every service start
(services/runtime/bus.py: provision). Every service applies all of it, so a consumer always exists
before its stream receives anything (interest/work-queue streams drop messages nobody is bound to)."""

from __future__ import annotations

import re
from typing import Literal

import msgspec

MiB = 1024 * 1024
DAY = 86400.0


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    subjects: tuple[str, ...]
    retention: Literal["limits", "interest", "workqueue"]
    max_age: float  # seconds
    max_bytes: int
    duplicate_window: float = 120.0
    discard: Literal["old", "new"] = "new"
    max_msg_size: int = 1 * MiB


class ConsumerSpec(msgspec.Struct, frozen=True, kw_only=True):
    stream: str
    durable: str
    description: str
    filter_subject: str
    ack_wait: float  # seconds; with backoff set the server uses backoff[0] for the first redelivery
    max_deliver: int
    max_ack_pending: int
    backoff: tuple[float, ...] = ()


# The server publishes this (plus .<stream>.<consumer>) when a message reaches a consumer's max_deliver;
# the message itself stays in its stream until someone copies and deletes it.
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


def token(text: str) -> str:
    """`text` as one subject or KV-key token: anything but letters, digits, '-' and '_' becomes '_'
    (dots would add levels, spaces and wildcards would break subjects)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"


def subject(kind: str, camera: str) -> str:
    """`vigil.<kind>.<camera>`: subjects carry the camera so `nats sub 'vigil.*.front_door'` works."""
    return f"vigil.{kind}.{camera}"


def every(kind: str) -> str:
    """`vigil.<kind>.*`: the subjects of one kind, for every camera (or host, service)."""
    return subject(kind, "*")


def dlq_subject(stage: str, camera: str | None) -> str:
    return f"vigil.dlq.{stage}.{camera or '_'}"


DLQ_ALL = "vigil.dlq.>"  # every stage's dead letters


def dlq_filter(stage: str = "*", camera: str = "*") -> str:
    """Dead letters of one stage and/or camera (`*` for any)."""
    return f"vigil.dlq.{stage}.{camera}"


# The retention run's report (stream RETENTION); one subject, not per camera.
RETENTION_REPORT_SUBJECT = "vigil.retention.report"
# Plain NATS (not stored): the watcher asks retention for an immediate free-space check.
RETENTION_CHECK_SUBJECT = "vigil.control.retention"

# The services, each its own process, systemd unit (vigil-<name>.service; the detector is the template
# vigil-detector@<gpu>.service: one per GPU) and NATS user. vigil-nats and vigil-postgresql run the
# servers and are not in this list. ops/install.sh and systemd/ follow it (tests/unit/test_architecture.py).
SERVICES = (
    "watcher",
    "detector",
    "aggregator",
    "recorder",
    "gpu-stats",
    "health",
    "retention",
    "analyzer",
    "notifier",
    "web",
)
# What health watches go by as plain subscriptions (never holding anything back): uploads, detections
# and events for camera activity, the analyses for its page, the watcher's rejections.
HEALTH_OBSERVES = (every("uploads"), every("detections"), every("events"), every("analysis"), dlq_filter("watcher"))
# The camera of health's (and the detector's) own alerts; notify rules name it to receive them.
SYSTEM_CAMERA = "system"


def dlq_subject_stage(subject: str) -> str | None:
    """The stage a dead letter was written by, from its subject: only that stage's NATS user may publish
    under vigil.dlq.<stage>.* (services/runtime/nats_auth.py), so this - never the letter's own `stage` - is
    who wrote it."""
    parts = subject.split(".")
    return parts[2] if len(parts) == 4 and parts[:2] == ["vigil", "dlq"] else None


# discard="new": a full stream refuses the publish (the publisher retries with backoff) instead of
# silently dropping the oldest unprocessed work.
STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec(
        name="UPLOADS",
        description="Settled camera files awaiting detection (vigil.uploads.<camera>); work queue of the detectors",
        subjects=(every("uploads"),),
        retention="workqueue",
        max_age=7 * DAY,
        max_bytes=1024 * MiB,
    ),
    StreamSpec(
        name="DETECTIONS",
        description="Detector results per file (vigil.detections.<camera>); kept until aggregator and recorder ack",
        subjects=(every("detections"),),
        retention="interest",
        max_age=7 * DAY,
        max_bytes=2048 * MiB,
    ),
    StreamSpec(
        name="EVENTS",
        description="Closed events: detections grouped per camera (vigil.events.<camera>)",
        subjects=(every("events"),),
        retention="interest",
        max_age=7 * DAY,
        max_bytes=512 * MiB,
    ),
    StreamSpec(
        name="ALERTS",
        description="Alerts from the pipeline and from health checks (vigil.alerts.<camera|system>)",
        subjects=(every("alerts"),),
        retention="interest",
        max_age=30 * DAY,
        max_bytes=256 * MiB,
        # an alert re-sent from the aggregator's outbox after a long outage must still dedupe: at most
        # one alert per event, ever (alerts are few, so a day of message ids costs little)
        duplicate_window=DAY,
    ),
    StreamSpec(
        name="ANALYSIS",
        description="The analyzer's risk judgement of every event revision (vigil.analysis.<camera>): score, level, summary, factors",
        subjects=(every("analysis"),),
        retention="interest",
        max_age=7 * DAY,
        max_bytes=512 * MiB,
    ),
    StreamSpec(
        name="NOTIFY",
        description="Notifications to deliver, one per rule, event and target (vigil.notify.<camera>); work queue of the notifier",
        subjects=(every("notify"),),
        retention="workqueue",
        max_age=7 * DAY,
        max_bytes=256 * MiB,
        # a rule fires once per event: the id dedupes a decision repeated after a crash (the notifier's KV
        # marker covers revisions that come later than this)
        duplicate_window=DAY,
    ),
    StreamSpec(
        name="GPU",
        description="GPU samples from gpu-stats every interval (vigil.gpu.<host>); kept a day, recorded once a minute",
        subjects=(every("gpu"),),
        retention="limits",
        max_age=1 * DAY,
        max_bytes=256 * MiB,
        discard="old",  # telemetry: the newest samples matter most
    ),
    StreamSpec(
        name="HEALTH",
        description="Verdict changes from health (vigil.health.<service>): healthy, degraded, down, stale, with the reason",
        subjects=(every("health"),),
        retention="limits",
        max_age=30 * DAY,
        max_bytes=64 * MiB,
        discard="old",
    ),
    StreamSpec(
        name="RETENTION",
        description="One RetentionReport per retention run (vigil.retention.report): files, bytes and rows deleted, and why",
        subjects=(RETENTION_REPORT_SUBJECT,),
        retention="limits",
        max_age=90 * DAY,
        max_bytes=64 * MiB,
        discard="old",
    ),
    StreamSpec(
        name="ADVISORIES",
        description="JetStream MAX_DELIVERIES advisories, kept so a message that used up its deliveries is dead-lettered even when its service was down as it happened",
        subjects=(f"{MAX_DELIVERIES_ADVISORY}.>",),
        retention="limits",
        max_age=7 * DAY,
        max_bytes=64 * MiB,
        discard="old",
    ),
    StreamSpec(
        name="DLQ",  # read by the recorder (table dead_letters), health and the CLI
        description="Dead letters: messages a stage gave up on, with stage, reason and original payload (vigil.dlq.<stage>.<camera>)",
        subjects=(DLQ_ALL,),
        retention="limits",
        max_age=30 * DAY,
        max_bytes=512 * MiB,
        discard="old",  # a flood of bad input must never block the pipeline
        max_msg_size=4 * MiB,
    ),
)

CONSUMERS: tuple[ConsumerSpec, ...] = (
    ConsumerSpec(
        stream="UPLOADS",
        durable="detector",
        description="Shared by every detector process; in_progress() keeps long batches alive",
        filter_subject=every("uploads"),
        # with a backoff the server waits backoff[0] before the first redelivery (ack_wait follows it).
        # The first two redeliveries (an upload held by a detector killed twice) come back within 25 s,
        # inside the aggregator's default reorder_seconds (30): its events stay exactly the contract's.
        # The later ones are spaced out so a file that keeps crashing detectors cannot crash-loop them.
        ack_wait=10.0,
        max_deliver=5,
        max_ack_pending=512,
        backoff=(10.0, 15.0, 60.0, 120.0),
    ),
    ConsumerSpec(
        stream="DETECTIONS",
        durable="aggregator",
        description="Groups detections into events; holds them unacked in its reorder buffer, acks once the event state is durable in KV",
        filter_subject=every("detections"),
        ack_wait=15.0,
        max_deliver=10,
        # the reorder buffer holds up to this minus two batches (services/aggregator/service.py)
        max_ack_pending=8192,
    ),
    ConsumerSpec(
        stream="DETECTIONS",
        durable="recorder-detections",
        description="Writes detections to PostgreSQL; acks after commit",
        filter_subject=every("detections"),
        ack_wait=30.0,
        max_deliver=20,
        max_ack_pending=4096,
    ),
    ConsumerSpec(
        stream="EVENTS",
        durable="recorder-events",
        description="Writes events to PostgreSQL; acks after commit",
        filter_subject=every("events"),
        ack_wait=30.0,
        max_deliver=20,
        max_ack_pending=1024,
    ),
    ConsumerSpec(
        stream="EVENTS",
        durable="analyzer",
        description="Judges every event revision; acks after the EventAnalyzed's PubAck (in_progress() while a model answers)",
        filter_subject=every("events"),
        ack_wait=60.0,
        max_deliver=10,
        max_ack_pending=512,
    ),
    ConsumerSpec(
        stream="ANALYSIS",
        durable="recorder-analysis",
        description="Writes analyses to PostgreSQL (the latest revision wins); acks after commit",
        filter_subject=every("analysis"),
        ack_wait=30.0,
        max_deliver=20,
        max_ack_pending=1024,
    ),
    ConsumerSpec(
        stream="ANALYSIS",
        durable="notifier",
        description="Matches every analysis against the notify rules; acks once its notifications are queued",
        filter_subject=every("analysis"),
        ack_wait=30.0,
        max_deliver=20,
        max_ack_pending=256,
    ),
    ConsumerSpec(
        stream="ALERTS",
        durable="notifier-alerts",
        description="Matches health's alerts (camera system) against the notify rules",
        filter_subject=every("alerts"),
        ack_wait=30.0,
        max_deliver=20,
        max_ack_pending=256,
    ),
    ConsumerSpec(
        stream="NOTIFY",
        durable="notifier-deliver",
        description="Sends each notification to its target; acks after the target accepted (retries in process, then dead-letters)",
        filter_subject=every("notify"),
        # the delivery loop keeps a message alive with in_progress() through its retries; a redelivery
        # means the notifier died holding it, and comes 10 s later
        ack_wait=10.0,
        max_deliver=10,
        max_ack_pending=64,
        backoff=(10.0, 30.0, 120.0, 600.0),
    ),
    ConsumerSpec(
        stream="GPU",
        durable="recorder-gpu",
        description="Writes one GPU sample per GPU per minute to PostgreSQL; acks after commit",
        filter_subject=every("gpu"),
        ack_wait=30.0,
        max_deliver=20,
        max_ack_pending=1024,
    ),
    ConsumerSpec(
        stream="ALERTS",
        durable="recorder-alerts",
        description="Writes alerts to PostgreSQL; acks after commit",
        filter_subject=every("alerts"),
        ack_wait=30.0,
        max_deliver=20,
        max_ack_pending=1024,
    ),
    ConsumerSpec(
        stream="DLQ",
        durable="recorder-dlq",
        description="Writes dead letters to PostgreSQL (what retention trusts); acks after commit",
        filter_subject=DLQ_ALL,
        ack_wait=30.0,
        max_deliver=20,
        max_ack_pending=1024,
    ),
)

# Per pipeline consumer, a durable consumer of its MAX_DELIVERIES advisories (batches.exhausted_loop).
EXHAUSTED_PREFIX = "exhausted-"
CONSUMERS += tuple(
    ConsumerSpec(
        stream="ADVISORIES",
        durable=f"{EXHAUSTED_PREFIX}{c.durable}",
        description=f"Dead-letters {c.stream} messages that used up {c.durable}'s deliveries",
        filter_subject=f"{MAX_DELIVERIES_ADVISORY}.{c.stream}.{c.durable}",
        ack_wait=30.0,
        # never given up: the advisory is naked until the lagging consumer is past the message, however
        # long that takes (its dead letter is written at once)
        max_deliver=-1,
        max_ack_pending=64,
    )
    for c in CONSUMERS
)

# Key-value buckets (JetStream KV) for state that must survive a crash.
AGGREGATOR_STATE_BUCKET = "vigil_aggregator"  # key cam.<camera>: services/aggregator/grouping.py CameraState
# Every published event by camera and start hour (key <camera>.<hour>.<event_id>), so a detection that
# arrives days late is recognised or joins its event. Kept as long as a dead letter can be retried.
EVENT_INDEX_BUCKET = "vigil_event_index"
EVENT_INDEX_TTL = 31 * DAY
# Latest Heartbeat per service instance (`nats kv get vigil_heartbeats detector.host-1234`); an entry
# expires HEARTBEAT_TTL seconds after its last put, so a crashed instance disappears on its own.
HEARTBEAT_BUCKET = "vigil_heartbeats"
HEARTBEAT_TTL = 30.0
# health's alert bookkeeping (conditions held, alerts fired), so a restart neither repeats nor forgets one.
HEALTH_BUCKET = "vigil_health"
# Latest GpuSample per GPU, key `<host>.<index>`.
GPU_BUCKET = "vigil_gpu"
# The notifier's bookkeeping: fired.<rule>.<source> (a rule fires once per event, revisions included),
# cooldown.<rule>.<key>, last.<rule> (the last firing, for `vigil notify list`), delivered.<id> / failed.<id>.
NOTIFIER_BUCKET = "vigil_notifier"
NOTIFIER_TTL = EVENT_INDEX_TTL  # as long as a late revision of an event can come
GPU_TTL = 60.0


def consumer(durable: str) -> ConsumerSpec:
    return next(c for c in CONSUMERS if c.durable == durable)
