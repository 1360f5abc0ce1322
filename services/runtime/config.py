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
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

ENV_PREFIX = "VIGIL_"


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class NatsConfig(_Section):
    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    connect_timeout: float = 5.0
    # Seconds between reconnect attempts; the client never gives up (max_reconnect_attempts=-1).
    reconnect_wait: float = 1.0
    publish_timeout: float = 5.0


class DatabaseConfig(_Section):
    dsn: str = "postgresql://vigil@127.0.0.1:5432/vigil"


class WatcherConfig(_Section):
    # A file is published once its size and mtime have not changed for this long.
    settle_seconds: float = 2.0
    # Full rescan of the media root, to catch anything an inotify overflow missed.
    rescan_seconds: float = 300.0
    image_extensions: list[str] = msgspec.field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".bmp", ".webp"])
    clip_extensions: list[str] = msgspec.field(default_factory=lambda: [".mp4", ".mkv", ".avi", ".mov"])
    # Poll instead of inotify (network filesystems, some FUSE mounts).
    force_polling: bool = False
    # At most this many settled files are published concurrently, then marked in one transaction.
    publish_batch: int = 256


class DetectorConfig(_Section):
    # "yolox-nano" (ONNX Runtime on the CPU) or "none" (no inference: measures pipeline overhead).
    model: Literal["yolox-nano", "none"] = "yolox-nano"
    models_dir: str = "/var/lib/vigil/models"
    batch_size: int = 16
    fetch_timeout: float = 1.0
    threads: int = 2
    score_threshold: float = 0.30
    nms_iou: float = 0.45
    # Images larger than this many pixels are refused (decompression bombs).
    max_pixels: int = 50_000_000
    # Files above this size are dead-lettered unread.
    max_file_bytes: int = 256 * 1024 * 1024


class AggregatorConfig(_Section):
    idle_seconds: float = 30.0
    max_seconds: float = 90.0
    alert_label: str = "person"
    alert_score: float = 0.90
    batch_size: int = 256


class RecorderConfig(_Section):
    batch_size: int = 256
    fetch_timeout: float = 0.2


class Config(_Section):
    """Everything a vigil service reads. Each service uses only its own section plus the shared ones."""

    media_root: str = "/srv/vigil/media"
    state_dir: str = "/var/lib/vigil"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Graceful drain bound on SIGTERM; systemd's TimeoutStopSec must be longer.
    drain_seconds: float = 10.0
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    watcher: WatcherConfig = msgspec.field(default_factory=WatcherConfig)
    detector: DetectorConfig = msgspec.field(default_factory=DetectorConfig)
    aggregator: AggregatorConfig = msgspec.field(default_factory=AggregatorConfig)
    recorder: RecorderConfig = msgspec.field(default_factory=RecorderConfig)


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


def _listify(tree: dict[str, Any], struct: type[msgspec.Struct]) -> None:
    """Environment values are strings; split them where the field is a list."""
    hints = {f.name: f.type for f in msgspec.structs.fields(struct)}
    for name, value in tree.items():
        hint = hints.get(name)
        if isinstance(value, dict) and isinstance(hint, type) and issubclass(hint, msgspec.Struct):
            _listify(value, hint)
        elif isinstance(value, str) and getattr(hint, "__origin__", None) is list:
            tree[name] = [v.strip() for v in value.split(",") if v.strip()]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply VIGIL_* overrides, validate. Raises ConfigError naming the field."""
    environ = os.environ if environ is None else environ
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
    """Cross-field rules msgspec cannot express."""
    if config.aggregator.idle_seconds <= 0 or config.aggregator.max_seconds < config.aggregator.idle_seconds:
        raise ConfigError("config error: aggregator.max_seconds must be >= aggregator.idle_seconds > 0")
    if config.detector.batch_size < 1:
        raise ConfigError("config error: detector.batch_size must be >= 1")
    if config.watcher.settle_seconds < 0:
        raise ConfigError("config error: watcher.settle_seconds must be >= 0")
    if not config.nats.servers:
        raise ConfigError("config error: nats.servers must name at least one server")
