"""Message types. Evolution rules: new fields get defaults, a tag is never reused, and a
breaking change bumps VERSION (consumers reject versions they do not know)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from nats.js.api import Header

VERSION = 1
# A camera id is a NATS subject token: vigil.<kind>.<camera>. Anything else is refused at decode.
CAMERA_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
Camera = Annotated[str, msgspec.Meta(pattern=CAMERA_PATTERN)]
MAX_DEAD_LETTER_PAYLOAD = 64 * 1024
_CAMERA_RE = re.compile(CAMERA_PATTERN)
TYPE_HEADER = "Vigil-Type"
VERSION_HEADER = "Vigil-Version"
RETRY_HEADER = "Vigil-Retry"  # on a message re-published from the DLQ: how many automatic retries so far


# Text that must never travel in a message: C0 and C1 control characters (NUL stalls PostgreSQL, ESC
# drives the operator's terminal, a newline forges log lines) and lone surrogates (a file name that is
# not UTF-8, as Python's surrogateescape decodes it), and the invisible characters that reorder or
# break what a person reads (bidirectional overrides and isolates, LRM/RLM, line/paragraph separators):
# "gpj.exe" shown as "exe.jpg".
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u200e\u200f\u2028-\u202e\u2066-\u2069]")
# The same as they look in encoded JSON: a cheap scan of the bytes decides whether a message needs the
# field-by-field check (false alarms such as an escaped backslash before "n" only cost that check).
_UNSAFE_JSON = re.compile(
    rb"\\(?:u00[0189][0-9a-fA-F]|u007[fF]|[bfnrt]|u200[eEfF]|u202[89a-eA-E]|u206[6-9])"
    rb"|\x7f|\xc2[\x80-\x9f]|\xe2\x80[\x8e\x8f\xa8-\xae]|\xe2\x81[\xa6-\xa9]"
)
# Fields that keep foreign bytes on purpose: a dead letter's copy of the message it could not use.
_RAW_FIELDS = {("DeadLetter", "original_payload")}


def unsafe_char(text: str) -> str | None:
    """The first control character or lone surrogate in `text`, or None."""
    m = _UNSAFE.search(text)
    return m.group() if m else None


def printable(text: str) -> str:
    """`text` with every control character and lone surrogate written as an escape (`\\x1b`, `\\xff`
    for a byte of a name that is not UTF-8): safe in a message, a log line, a terminal and a table."""

    def esc(m: re.Match) -> str:
        c = ord(m.group())
        return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"

    return _UNSAFE.sub(esc, text)


def unsafe_field(value, where: str = "") -> str | None:
    """Where in a decoded message (`path`, `boxes[2].label`, `labels[key]`) text carries a control
    character, or None. Dict keys count: they are text too."""
    if isinstance(value, str):
        return where or "value" if _UNSAFE.search(value) else None
    if isinstance(value, msgspec.Struct):
        kind = type(value).__name__
        for name in value.__struct_fields__:
            if (kind, name) not in _RAW_FIELDS:
                found = unsafe_field(getattr(value, name), f"{where}.{name}" if where else name)
                if found:
                    return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = unsafe_field(item, f"{where}[{i}]")
            if found:
                return found
    elif isinstance(value, dict):
        for k, v in value.items():
            found = unsafe_field(k, f"{where}[key]") or unsafe_field(v, f"{where}[{k!r}]")
            if found:
                return found
    return None


def valid_camera(name: str) -> bool:
    """True when `name` can be a camera id (a folder name under the media root, a subject token)."""
    return bool(_CAMERA_RE.match(name))


class _Msg(msgspec.Struct, tag=True, kw_only=True, forbid_unknown_fields=False):
    """Base: `tag=True` writes {"type": "<ClassName>"} into the JSON so a bare payload names itself."""


class FileUploaded(_Msg, kw_only=True):
    """A camera file that has settled on disk and passed the magic-byte check."""

    file_id: str  # deterministic: sha256(camera, path, content sha256), so re-publishing dedupes
    camera: Camera
    path: str  # relative to the media root, POSIX separators
    size: int
    mtime: float  # seconds since the epoch; the detection's time for event grouping
    sha256: str
    kind: Literal["image", "clip"]
    published_at: float = 0.0  # when the watcher saw it settle; the start of end-to-end latency
    # The camera's clock could not be trusted (mtime far in the future, or older than any retention
    # age): `mtime` is then the arrival time, and the real mtime is kept in `camera_mtime`.
    clock_suspect: bool = False
    camera_mtime: float | None = None


class Box(msgspec.Struct, array_like=True):
    """One detection box in source-image pixels. array_like keeps the JSON compact: never reorder."""

    label: str
    score: float
    x1: float
    y1: float
    x2: float
    y2: float


class Detections(_Msg, kw_only=True):
    """The detector's result for one image or one sampled frame of a clip (zero boxes is a result)."""

    file_id: str
    camera: Camera
    path: str
    captured_at: float  # image: the file's mtime; clip frame: clip start + offset_s
    width: int
    height: int
    model: str
    inference_ms: float
    boxes: list[Box] = []
    published_at: float = 0.0  # copied from FileUploaded, for end-to-end latency
    frame: int | None = None  # index of the sampled frame within a clip; None for an image
    offset_s: float = 0.0  # the frame's time from the start of the clip
    clock_suspect: bool = False  # copied from FileUploaded: captured_at is the arrival time
    file_size: int | None = None  # the file as the detector read it (FileUploaded.size, and its mtime
    file_mtime: float | None = None  # as on disk): retention deletes only that file, not a new one at its path

    @property
    def key(self) -> str:
        """Unique per detection: the file id, plus the frame index for a clip."""
        return self.file_id if self.frame is None else f"{self.file_id}:{self.frame}"


class Spot(msgspec.Struct, array_like=True):
    """Where a box stood in its frame: the bottom-centre of the box in source pixels (the point a zone
    test uses: where the feet are), with its label and best score. array_like: never reorder."""

    label: str
    x: int
    y: int
    score: float


MAX_SPOTS = 200  # per event: the best-scored distinct (label, x, y), so an event message stays small


class LabelSummary(msgspec.Struct, kw_only=True):
    count: int
    max_score: float


CloseReason = Literal["idle", "max_window", "max_detections"]


class EventClosed(_Msg, kw_only=True):
    """A group of detections on one camera (services/aggregator/grouping.py: the grouping contract).

    Published when the event is cut (the next detection is more than idle_seconds later, or would make
    it longer than max_seconds or larger than max_detections) and when its camera has been quiet for
    idle_seconds. The same event can be published again with a higher `revision` (a detection that
    arrived late was added, or a quiet event went on): the latest revision is the event.
    """

    event_id: str
    camera: Camera
    started_at: float
    ended_at: float
    file_ids: list[str]  # detection keys (Detections.key): a file id, or "file_id:frame" for clip frames
    labels: dict[str, LabelSummary]
    best_file_id: str
    close_reason: CloseReason
    revision: int = 1
    # Where the boxes stood (at most MAX_SPOTS, best first): what the analyzer's zones are tested on.
    spots: list[Spot] = []
    # The best detection's media file (relative to the media root) and, for a clip, the frame's offset.
    best_path: str | None = None
    best_offset_s: float = 0.0
    # The best detection's boxes (its MAX_BEST_BOXES best): what the event's snapshot draws.
    best_boxes: list[Box] = []


MAX_BEST_BOXES = 50

RiskLevel = Literal["low", "medium", "high", "critical"]
RISK_LEVELS: tuple[RiskLevel, ...] = ("low", "medium", "high", "critical")


def risk_level(score: int) -> RiskLevel:
    """low 0-29, medium 30-59, high 60-84, critical 85-100."""
    return "critical" if score >= 85 else "high" if score >= 60 else "medium" if score >= 30 else "low"


class Factor(msgspec.Struct, kw_only=True):
    """One reason for a risk score: its points (may be negative) and why, in words."""

    name: str
    points: int
    detail: str


class AnalyzerInfo(msgspec.Struct, kw_only=True):
    name: str  # "rules" or "model"
    version: str  # the rules' version, or the model's name


class EventAnalyzed(_Msg, kw_only=True):
    """The analyzer's judgement of one event revision (vigil.analysis.<camera>); the latest revision wins."""

    event_id: str
    revision: int
    camera: Camera
    risk_score: Annotated[int, msgspec.Meta(ge=0, le=100)]
    risk_level: RiskLevel
    summary: str  # one sentence a person reads on a phone
    factors: list[Factor] = []
    analyzer: AnalyzerInfo
    fallback: bool = False  # the configured model did not answer usefully: these are the rules' results
    fallback_reason: str | None = None
    analyzed_at: float
    # the event's facts the notifier's rules match on
    started_at: float = 0.0
    ended_at: float = 0.0
    labels: list[str] = []
    zones: list[str] = []  # the analyzer's zones that a box stood in
    best_path: str | None = None
    # The annotated best frame and its thumbnail, relative to <state_dir>/snapshots (written before
    # this was published; None when the frame could not be read: the reason is in snapshot_error).
    snapshot: str | None = None
    thumbnail: str | None = None
    snapshot_error: str | None = None


# Event snapshots live in <state_dir>/SNAPSHOTS_DIR/, one flat folder (written by the analyzer; read by the
# notifier, the web service and retention).
SNAPSHOTS_DIR = "snapshots"

# A camera with an FTP account (vigil camera add NAME --ftp) is chrooted into <media_root>/<camera>,
# which it may not write (vsftpd refuses a writable chroot), and uploads into this folder inside it,
# which it owns. Retention never removes it when it empties: the account could not make it again.
FTP_UPLOAD_FOLDER = "upload"

Severity = Literal["info", "warning", "critical"]


class Notification(_Msg, kw_only=True):
    """One message for one target of one notify rule (stream NOTIFY, a work queue of the notifier's
    delivery loop). `target_name` is the target's URL with its secrets masked; the URL itself is only
    ever in the notifier's config and credentials."""

    notification_id: str  # "<rule>:<event or alert id>:<target index>": a rule fires once per event
    rule: str
    target: int  # index into the rule's urls
    target_name: str
    camera: str  # the event's camera, or "system" for health alerts
    source_id: str  # the event id, or the alert id
    title: str
    body: str
    severity: Severity = "warning"
    risk_level: RiskLevel | None = None
    event_time: float
    link: str | None = None
    created_at: float
    test: bool = False
    snapshot: str | None = (
        None  # the event's annotated snapshot, relative to <state_dir>/snapshots: attached  # `vigil notify test RULE`
    )


class Alert(_Msg, kw_only=True):
    alert_id: str
    camera: Camera
    kind: str  # e.g. "person"
    severity: Literal["info", "warning", "critical"] = "warning"
    message: str
    created_at: float
    file_id: str | None = None
    event_id: str | None = None
    score: float | None = None
    # Health alerts (camera "system" unless about one camera) fire once when a condition starts and
    # once more with state "resolved" when it clears; pipeline alerts are always "firing".
    state: Literal["firing", "resolved"] = "firing"


class DeadLetter(_Msg, kw_only=True):
    """A message a stage gave up on, with enough to understand and replay it."""

    stage: str
    reason: str
    original_subject: str
    original_payload: str  # the original bytes as UTF-8 (replacement chars), cut at MAX_DEAD_LETTER_PAYLOAD
    original_headers: dict[str, str] = {}
    original_size: int = 0  # bytes of the original payload; larger than what is kept when it was cut
    original_stream: str | None = None
    original_sequence: int | None = None
    deliveries: int = 1
    camera: str | None = None  # free text here: the camera of a refused message may itself be invalid
    file_id: str | None = None
    failed_at: float = 0.0
    path: str | None = None  # the media file, relative to the media root, when one is known
    # True when the cause could pass (deliveries used up by a crash, a hang or a timeout; a server or
    # database away): such letters are retried automatically once their stage is healthy
    # (services/runtime/dlq_retry.py). False: bad content, which no retry fixes.
    transient: bool = False
    retries: int = 0  # automatic retries that came before this letter (header Vigil-Retry)


class Heartbeat(_Msg, kw_only=True):
    """A service instance's latest state, kept in the KV bucket vigil_heartbeats under
    `<service>.<instance>` (entries expire HEARTBEAT_TTL after the last put)."""

    service: str
    instance: str
    host: str
    pid: int
    version: str
    started_at: float
    sent_at: float
    state: Literal["ready", "degraded", "stopping", "stopped"]
    counters: dict[str, int] = {}
    in_flight: int = 0
    last_progress: float | None = None  # wall clock of the oldest work loop's latest beat
    backend: str | None = None  # e.g. "backend onnxruntime:cpu, model yolox_nano@e8af07"
    last_error: str | None = None
    # The watcher's cameras with files it may not read, each with one example and why ("front_door/a.jpg:
    # not readable by vigil (owner ftp-cam, mode 0600)"): health raises camera_unreadable while it lasts.
    unreadable: dict[str, str] = {}


Verdict = Literal["healthy", "degraded", "down", "stale"]


class HealthChanged(_Msg, kw_only=True):
    """A service's verdict changed (health, on vigil.health.<service>). `instance` is None for the
    service as a whole (e.g. no instance of it heartbeating at all)."""

    service: str
    instance: str | None = None
    previous: Verdict | None = None  # None: first verdict since health started
    verdict: Verdict
    reason: str
    changed_at: float


class GpuProcess(msgspec.Struct, kw_only=True):
    pid: int
    used_mb: int
    unit: str | None = None  # the systemd unit owning the process, e.g. "vigil-detector@0.service"


class GpuSample(_Msg, kw_only=True):
    """One GPU's readings (gpu-stats, every interval) on vigil.gpu.<host>; latest also in KV vigil_gpu."""

    host: str
    index: int
    name: str
    uuid: str | None = None
    source: Literal["nvml", "nvidia-smi"]
    sampled_at: float
    util_pct: float | None = None
    mem_used_mb: float | None = None
    mem_total_mb: float | None = None
    temp_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    throttle_reasons: list[str] = []
    processes: list[GpuProcess] = []


class CameraFreed(msgspec.Struct, kw_only=True):
    files: int = 0
    bytes: int = 0
    reasons: dict[str, int] = {}  # files per rule: age, quota, watermark


class RetentionReport(_Msg, kw_only=True):
    """One retention run (vigil.retention.report): what was deleted, per camera and table, and why."""

    run_id: str
    trigger: Literal["interval", "watermark", "watcher", "cli"]
    dry_run: bool
    started_at: float
    finished_at: float
    cameras: dict[str, CameraFreed] = {}
    rows_deleted: dict[str, int] = {}  # per table
    deleted_paths: list[str] = []  # relative to the media root, at most MAX_REPORTED_PATHS
    deleted_count: int = 0
    missing_marked: int = 0  # rows whose file vanished, newly marked
    missing_restored: int = 0  # marked rows whose file came back
    kept_skipped: int = 0  # files that a rule would delete, kept by a "keep" event
    young_skipped: int = 0  # files under watermark pressure, younger than min_keep_seconds
    unrecorded_skipped: int = 0  # files the pipeline has not recorded (yet): never deleted
    free_bytes_before: int = 0
    free_bytes_after: int = 0
    total_bytes: int = 0
    unbounded_streams: list[str] = []  # JetStream streams without max_age or max_bytes
    errors: list[str] = []
    snapshots_deleted: int = 0  # event snapshots and thumbnails (their event went, or over their quota)
    snapshot_bytes_freed: int = 0
    stale_uploads_deleted: int = 0  # hidden files (uploads under a temporary name) older than stale_upload_hours
    stale_upload_bytes_freed: int = 0


MAX_REPORTED_PATHS = 1000


Message = (
    FileUploaded
    | Detections
    | EventClosed
    | Alert
    | DeadLetter
    | Heartbeat
    | GpuSample
    | HealthChanged
    | RetentionReport
    | EventAnalyzed
    | Notification
)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


def encode(msg: Message) -> bytes:
    """JSON bytes; refuses (ValueError) what `decode` would refuse, so a bad message fails where it is
    made, naming the field, instead of being dead-lettered by every reader."""
    data = _encoder.encode(msg)
    if _UNSAFE_JSON.search(data):
        where = unsafe_field(msg)
        if where:
            raise ValueError(
                f"control character in text field `{where}` of {type(msg).__name__}: use proto.printable()"
            )
    return data


def headers_for(msg: Message, msg_id: str | None = None) -> dict[str, str]:
    """The headers every vigil message carries; `msg_id` becomes JetStream's Nats-Msg-Id for dedupe."""
    headers = {TYPE_HEADER: type(msg).__name__, VERSION_HEADER: str(VERSION)}
    if msg_id is not None:
        headers[Header.MSG_ID.value] = msg_id
    return headers


def decode(data: bytes, headers: dict[str, str] | None = None) -> Message:
    """Decode any vigil message; raises msgspec.ValidationError/DecodeError on bad payloads and
    ValueError on a version this code does not know."""
    if headers:
        version = headers.get(VERSION_HEADER)
        if version is not None and version != str(VERSION):
            raise ValueError(f"unsupported {VERSION_HEADER} {version!r} (this build speaks {VERSION})")
    msg = _decoder.decode(data)
    if _UNSAFE_JSON.search(data):
        where = unsafe_field(msg)
        if where:
            raise msgspec.ValidationError(f"control character in text field `{where}` of {type(msg).__name__}")
    return msg
