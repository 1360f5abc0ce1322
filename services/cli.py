"""`vigil`: the operator command.

    vigil run SERVICE [CONFIG]   run one service in the foreground (what the systemd units call)
    vigil up [--home DIR]        the embedded default: NATS + PostgreSQL + every service, Ctrl-C stops
    vigil models pull NAME       download a model into the models dir, checking size and sha256
    vigil status|streams|tail|dlq|events|trace|config check   look at the running system (services/ctl.py)
"""

from __future__ import annotations

import argparse
import importlib
import sys

SERVICES = ("watcher", "detector", "aggregator", "recorder", "gpu-stats", "health", "retention")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vigil", description="vigil edge camera pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one service in the foreground")
    p_run.add_argument("service", choices=SERVICES)
    p_run.add_argument("config", nargs="?", help="TOML config file (default: $VIGIL_CONFIG, else built-in defaults)")
    p_run.add_argument("--instance", default=None, help="systemd template instance: cpu or a GPU index (detector)")
    p_up = sub.add_parser("up", help="run everything on the embedded NATS + PostgreSQL")
    p_up.add_argument("--home", default=".vigil", help="folder for state, media and logs (default .vigil)")
    p_up.add_argument("--models-dir", default=None, help="folder with yolox_nano.onnx (default $VIGIL_MODELS_DIR, else HOME/models)")
    p_up.add_argument("--nats-port", type=int, default=4222)
    p_up.add_argument("--pg-port", type=int, default=5433)
    p_models = sub.add_parser("models", help="install detector models (explicit; nothing downloads at run time)")
    models_sub = p_models.add_subparsers(dest="models_command", required=True)
    p_pull = models_sub.add_parser("pull", help="download a catalog model, verify size and sha256, install it")
    p_pull.add_argument("name", help="catalog name, e.g. yolox-nano")
    p_pull.add_argument("--models-dir", default=None, help="default: detector.models_dir from the config")
    p_pull.add_argument("--config", default=None)
    p_pull.add_argument("--url", default=None, help="download from this address instead (a local mirror); size and sha256 are still checked")
    models_sub.add_parser("list", help="list the catalog")
    _operator_commands(sub)
    args = parser.parse_args(argv)

    if args.command == "run":
        return _run_service(args.service, args.config, args.instance)
    if args.command == "models":
        return _models(args)
    if args.command == "up":
        from services.up import up

        return up(args)
    from services.ctl import run_command

    return run_command(args)


def _operator_commands(sub) -> None:
    """The look-at-it commands (services/ctl.py)."""

    def add(name: str, help: str, json_flag: bool = True):
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", default=None, help="config file (default: $VIGIL_CONFIG, else /etc/vigil/vigil.toml)")
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    add("status", "services, their state and backlogs (from heartbeats)").add_argument("--watch", action="store_true")
    add("streams", "streams and consumers with limits and lag")
    p = add("tail", "follow messages, decoded, one line each")
    p.add_argument("kind", choices=["uploads", "detections", "events", "alerts", "dlq"])
    p.add_argument("--camera", default=None)
    p.add_argument("--count", type=int, default=None, help="stop after this many messages")
    p = add("dlq", "dead letters: list, show SEQ, retry SEQ, purge")
    p.add_argument("action", choices=["list", "show", "retry", "purge"])
    p.add_argument("seq", nargs="?", type=int)
    p.add_argument("--yes", action="store_true", help="retry without asking (it shows the target and asks otherwise)")
    p = add("events", "closed events from PostgreSQL; `events keep ID` keeps one (and its media) forever, `unkeep ID` undoes it")
    p.add_argument("action", nargs="?", choices=["list", "keep", "unkeep"], default="list")
    p.add_argument("event_id", nargs="?", default=None)
    p.add_argument("--camera", default=None)
    p.add_argument("--since", default=None, help="e.g. 30m, 1h, 2d")
    add("trace", "where one file is: detected, in which event, dead-lettered").add_argument("target", help="a path or a file id")
    add("provision", "declare every stream, consumer and KV bucket (idempotent; the installer runs it as the NATS admin)")
    p = add("retention", "run retention once now (what the service does every interval)")
    p.add_argument("action", choices=["run"])
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted and change nothing")
    p = sub.add_parser("config", help="configuration tools")
    p.add_argument("action", choices=["check"])
    p.add_argument("file", nargs="?", default=None)


def _models(args) -> int:
    from pathlib import Path

    from services.detector.catalog import CATALOG, PullError, pull
    from services.runtime.config import ConfigError, load_config

    if args.models_command == "list":
        for entry in CATALOG.values():
            print(f"{entry.name:12} {entry.file:18} {entry.size:>10} bytes  sha256 {entry.sha256}  {entry.licence}")
        return 0
    entry = CATALOG.get(args.name)
    if entry is None:
        print(f"vigil models pull: unknown model {args.name!r}; known: {', '.join(CATALOG)}", file=sys.stderr)
        return 2
    try:
        models_dir = Path(args.models_dir or load_config(args.config).detector.models_dir)
    except ConfigError as exc:
        print(f"vigil models pull: {exc}", file=sys.stderr)
        return 78
    print(f"downloading {entry.name} from {args.url or entry.url}", flush=True)
    try:
        path = pull(entry, models_dir, url=args.url)
    except PullError as exc:
        print(f"vigil models pull: {entry.name}: {exc}; nothing was installed", file=sys.stderr)
        return 1
    print(f"installed {path} ({entry.size} bytes, sha256 verified)")
    return 0


def _run_service(name: str, config: str | None, instance: str | None = None) -> int:
    import os
    import socket

    from services.runtime.service import main as service_main

    # The heartbeat key: <service>.<host>[-<instance>], stable across restarts of the same unit.
    os.environ.setdefault("VIGIL_INSTANCE", socket.gethostname() + (f"-{instance}" if instance else ""))
    module = importlib.import_module(f"services.{name.replace('-', '_')}")
    return service_main(name, module.run, config, instance)


if __name__ == "__main__":
    sys.exit(main())
