"""Every `vigil` command, each defined once: its arguments, what it does and how it prints, together.

`@command(name, help, *arguments)` registers a handler; services/cli/main.py builds the parser from
COMMANDS and runs one. An operator command (the default) gets `--config` and `--json`, and its handler
receives the loaded operator config; the others (run, up, models, config) read their own.
Exit statuses: 0 done, 1 the server cannot be reached or a download failed, 2 bad arguments or an
unknown name, 78 a bad config (as the services).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proto.topology import SERVICES
from services.cli import ctl, render
from services.runtime.config import Config, ConfigError, load_config


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: Callable[..., int]  # (config, args) for operator commands, (args) for the others
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()
    operator: bool = True


COMMANDS: dict[str, Command] = {}


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, options


def command(name: str, help: str, *arguments: tuple[tuple[str, ...], dict[str, Any]], operator: bool = True):
    def register(handler: Callable[..., int]) -> Callable[..., int]:
        COMMANDS[name] = Command(name, help, handler, arguments, operator)
        return handler

    return register


def emit(args: argparse.Namespace, data: Any, human: Callable[[Any], None]) -> int:
    """--json prints the data as one JSON document; otherwise `human` draws it."""
    if args.json:
        print(json.dumps(data))
    else:
        human(data)
    return 0


# ---- the services and the embedded default ------------------------------------------------------
@command(
    "run",
    "run one service in the foreground (what the systemd units call)",
    arg("service", choices=SERVICES),
    arg("config", nargs="?", help="TOML config file (default: $VIGIL_CONFIG, else built-in defaults)"),
    arg("--instance", default=None, help="systemd template instance: cpu or a GPU index (detector)"),
    operator=False,
)
def run(args: argparse.Namespace) -> int:
    import socket

    from services.runtime.service import main as service_main

    # The heartbeat key: <service>.<host>[-<instance>], stable across restarts of the same unit.
    os.environ.setdefault("VIGIL_INSTANCE", socket.gethostname() + (f"-{args.instance}" if args.instance else ""))
    module = importlib.import_module(f"services.{args.service.replace('-', '_')}.service")  # each service's run(config)
    return service_main(args.service, module.run, args.config, args.instance)


@command(
    "up",
    "run everything on the embedded NATS + PostgreSQL (Ctrl-C stops it)",
    arg("--home", default=".vigil", help="folder for state, media and logs (default .vigil)"),
    arg("--models-dir", default=None, help="folder with yolox_nano.onnx (default $VIGIL_MODELS_DIR, else HOME/models)"),
    arg("--nats-port", type=int, default=4222),
    arg("--pg-port", type=int, default=5433),
    arg("--web-port", type=int, default=8470, help="the web UI (http://127.0.0.1:PORT/)"),
    arg("--health-port", type=int, default=9470, help="health's status page and /metrics"),
    operator=False,
)
def up(args: argparse.Namespace) -> int:
    from services.cli.up import up as run_up

    return run_up(args)


@command(
    "models",
    "install detector models (explicit and hash-checked; nothing downloads at run time)",
    arg("action", choices=["pull", "list"]),
    arg("name", nargs="?", help="catalog name, e.g. yolox-nano (pull)"),
    arg("--models-dir", default=None, help="default: detector.models_dir from the config"),
    arg("--config", default=None),
    arg(
        "--url",
        default=None,
        help="download from this address instead (a local mirror); size and sha256 are still checked",
    ),
    operator=False,
)
def models(args: argparse.Namespace) -> int:
    from services.detector.catalog import CATALOG, PullError, pull

    if args.action == "list":
        for entry in CATALOG.values():
            print(f"{entry.name:12} {entry.file:18} {entry.size:>10} bytes  sha256 {entry.sha256}  {entry.licence}")
        return 0
    entry = CATALOG.get(args.name or "")
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


@command(
    "config",
    "configuration tools: `config check [FILE]` validates a config, naming a bad field",
    arg("action", choices=["check"]),
    arg("file", nargs="?", default=None),
    operator=False,
)
def config_check(args: argparse.Namespace) -> int:
    try:
        load_config(args.file, environ={} if args.file else None)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 78
    print(f"ok: {args.file or os.environ.get('VIGIL_CONFIG') or 'defaults'}")
    return 0


# ---- looking at the running system (services/cli/ctl.py gathers, these print) --------------------
@command("status", "services, their state and backlogs (from heartbeats)", arg("--watch", action="store_true"))
def status(config: Config, args: argparse.Namespace) -> int:
    while True:
        emit(args, asyncio.run(ctl.gather_status(config)), render.print_status)
        if not args.watch:
            return 0
        time.sleep(2)
        print("\033[2J\033[H", end="")


@command("streams", "streams and consumers with limits and lag")
def streams(config: Config, args: argparse.Namespace) -> int:
    def human(data: list[dict]) -> None:
        render.table(
            "streams",
            ["stream", "retention", "messages", "bytes", "max bytes", "consumers (pending/ack pending)"],
            [
                [s["name"], s["retention"], s["messages"], s["bytes"], s["max_bytes"],
                 ", ".join(f"{c['name']} {c['pending']}/{c['ack_pending']}" for c in s["consumers"])]
                for s in data
            ],
        )  # fmt: skip

    return emit(args, asyncio.run(ctl.gather_streams(config)), human)


@command(
    "tail",
    "follow messages, decoded, one line each",
    arg("kind", choices=["uploads", "detections", "events", "alerts", "dlq"]),
    arg("--camera", default=None),
    arg("--count", type=int, default=None, help="stop after this many messages"),
)
def tail(config: Config, args: argparse.Namespace) -> int:
    asyncio.run(ctl.tail(config, args.kind, args.camera, args.count, args.json))
    return 0


@command(
    "dlq",
    "dead letters: list, show SEQ, retry SEQ, purge",
    arg("action", choices=["list", "show", "retry", "purge"]),
    arg("seq", nargs="?", type=int),
    arg("--yes", action="store_true", help="retry without asking (it shows the target and asks otherwise)"),
)
def dlq(config: Config, args: argparse.Namespace) -> int:
    try:
        data = asyncio.run(
            ctl.dlq(
                config,
                args.action,
                args.seq,
                confirm=lambda letter, subject: render.confirm_retry(letter, subject, args.yes),
            )
        )
    except LookupError as exc:
        if args.action in ("retry", "purge"):
            ctl.audit_cli(config, args.action, f"dlq:{args.seq}" if args.seq is not None else "dlq", f"refused: {exc}")
        raise
    if args.action == "retry" and isinstance(data, dict) and not data.get("cancelled"):
        ctl.audit_cli(config, "retry", f"dlq:{args.seq}", f"ok: back on {data['subject']}")
    elif args.action == "purge" and isinstance(data, dict):
        ctl.audit_cli(config, "purge", "dlq", f"ok: {data['purged']} purged")
    if args.json or args.action != "list":
        print(json.dumps(data))
        return 0
    render.table(
        "dead letters",
        ["seq", "stage", "camera", "path", "reason", "retry"],
        [[d["seq"], d["stage"], d["camera"], d["path"] or "", d["reason"], d["retry"]] for d in data],
    )
    return 0


@command(
    "events",
    "closed events from PostgreSQL; `events keep ID` keeps one (and its media) forever, `unkeep ID` undoes it;"
    " `reviewed ID` / `unreviewed ID` as on the web UI",
    arg("action", nargs="?", choices=["list", "keep", "unkeep", "reviewed", "unreviewed"], default="list"),
    arg("event_id", nargs="?", default=None),
    arg("--camera", default=None),
    arg("--since", default=None, help="e.g. 30m, 1h, 2d"),
)
def events(config: Config, args: argparse.Namespace) -> int:
    if args.action in ("keep", "unkeep"):
        if not args.event_id:
            raise ValueError(f"usage: vigil events {args.action} EVENT_ID")
        kept = ctl.keep_event(config, args.event_id, args.action == "keep")
        return emit(args, kept, lambda d: print(f"event {d['event_id']}: keep = {str(d['keep']).lower()}"))
    if args.action in ("reviewed", "unreviewed"):
        if not args.event_id:
            raise ValueError(f"usage: vigil events {args.action} EVENT_ID")
        seen = ctl.set_event_flag(config, args.event_id, "reviewed", args.action == "reviewed")
        return emit(args, seen, lambda d: print(f"event {d['event_id']}: reviewed = {str(d['reviewed']).lower()}"))

    def human(data: list[dict]) -> None:
        render.table(
            "events",
            ["event", "camera", "started", "detections", "labels", "risk", "summary", "closed by"],
            [
                [e["event_id"], e["camera"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["started_at"])),
                 e["detections"], ", ".join(e["labels"]),
                 f"{e['risk_level']} {e['risk_score']}{' (fallback)' if e['analysis_fallback'] else ''}" if e["risk_level"] else "-",
                 e["summary"] or "", e["close_reason"]]
                for e in data
            ],
        )  # fmt: skip

    return emit(args, ctl.query_events(config, args.camera, args.since), human)


@command(
    "camera",
    "onboard cameras: `camera add NAME [--ftp] [--http]` makes its folder (group vigil, setgid, default ACL),"
    " its FTP account and/or HTTP upload token, and prints what to type into the camera; `list`; `rotate NAME`"
    " (new password/token); `remove NAME [--keep-media]`",
    arg("action", choices=["add", "list", "rotate", "remove"]),
    arg("name", nargs="?", default=None),
    arg("--ftp", action="store_true", help="an FTP account vigil-cam-NAME (root; after ops/install.sh --ftp)"),
    arg("--http", action="store_true", help="an HTTP upload token (POST /api/v1/uploads/NAME)"),
    arg("--keep-media", action="store_true", help="remove: keep the camera's folder and files"),
    arg("--url", default=None, help="the address cameras reach the web UI at (default: web.http_host:http_port)"),
)
def camera(config: Config, args: argparse.Namespace) -> int:
    from services.cli import cameras

    if args.action == "list":
        return emit(args, cameras.listing(config), cameras.print_listing)
    if not args.name:
        raise ValueError(f"usage: vigil camera {args.action} NAME")
    if args.action == "add":
        done = cameras.add(config, args.name, http=args.http, url=args.url, ftp=args.ftp)
    elif args.action == "rotate":
        done = cameras.rotate(config, args.name, url=args.url)
    else:
        done = cameras.remove(config, args.name, keep_media=args.keep_media)
    ctl.audit_cli(config, f"camera_{args.action}", args.name, "ok")
    return emit(args, done, cameras.print_done)


@command(
    "service",
    "start, stop or restart a vigil service (systemd's unit, or `vigil up`'s supervisor), recorded in the audit trail",
    arg("action", choices=["start", "stop", "restart"]),
    arg("unit", help="a service (detector) or its unit (vigil-detector@cpu.service)"),
)
def service(config: Config, args: argparse.Namespace) -> int:
    from services.web import control

    unit = args.unit if args.unit.endswith(".service") else control.unit_of(args.unit)
    if unit == "vigil-detector.service" and control.supervisor(config) == "systemd":
        raise ValueError("name the detector's instance: vigil-detector@cpu.service, vigil-detector@0.service, ...")
    try:
        result = asyncio.run(control.act(config, unit, args.action))
    except (control.NotAllowed, RuntimeError) as exc:
        ctl.audit_cli(config, args.action, unit, f"refused: {exc}")
        raise ValueError(str(exc)) from None
    ctl.audit_cli(config, args.action, unit, result)
    return emit(
        args,
        {"unit": unit, "action": args.action, "result": result},
        lambda d: print(f"{d['action']} {d['unit']}: {d['result']}"),
    )


@command(
    "web",
    "the web UI: `web password` sets its login password (stores only the bcrypt hash, as its credential)",
    arg("action", choices=["password"]),
    arg("--stdin", action="store_true", help="read the new password from standard input (for scripts)"),
)
def web(config: Config, args: argparse.Namespace) -> int:
    import getpass

    from services.runtime.config import credential_folder
    from services.runtime.files import write_secret
    from services.web.auth import hash_password

    path = credential_folder() / config.web.password_credential
    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("new web UI password: ")
        if getpass.getpass("again: ") != password:
            raise ValueError("the two passwords differ")
    if len(password) < 8:
        raise ValueError("the password needs at least 8 characters")
    write_secret(path, hash_password(password))
    ended = ctl.end_web_sessions(config)
    ctl.audit_cli(config, "password", "web", f"ok: {ended} sessions ended")
    print(
        f"saved its hash in {path}; {ended} open sessions ended; restart the web UI to use it (systemctl restart vigil-web)"
    )
    return 0


@command(
    "notify",
    "notify rules: `notify list` shows them with their last firing, `notify test RULE` sends a test to its targets",
    arg("action", choices=["list", "test"]),
    arg("rule", nargs="?", default=None),
)
def notify(config: Config, args: argparse.Namespace) -> int:
    if args.action == "test":
        if not args.rule:
            raise ValueError("usage: vigil notify test RULE")
        results = asyncio.run(ctl.notify_test(config, args.rule))

        def said(data: list[dict]) -> None:
            for r in data:
                verdict = "delivered" if r["delivered"] else "NOT delivered" if r["delivered"] is False else "unknown"
                print(f"{r['target']}: {verdict}{': ' + r['error'] if r['error'] else ''}")

        emit(args, results, said)
        return 0 if all(r["delivered"] for r in results) else 1

    def human(data: list[dict]) -> None:
        render.table(
            "notify rules",
            ["rule", "when", "targets", "last fired"],
            [
                [r["rule"], ", ".join(f"{k} {v}" for k, v in r["when"].items() if v not in (None, [], 0.0)) or "always",
                 "\n".join(r["targets"]),
                 (f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['last_fired']['fired_at']))}"
                  f" {r['last_fired']['camera']} {r['last_fired']['source_id']}") if r["last_fired"] else "never"]
                for r in data
            ],
        )  # fmt: skip

    return emit(args, asyncio.run(ctl.notify_list(config)), human)


@command(
    "trace", "where one file is: detected, in which event, dead-lettered", arg("target", help="a path or a file id")
)
def trace(config: Config, args: argparse.Namespace) -> int:
    return emit(args, asyncio.run(ctl.trace(config, args.target)), lambda d: print(json.dumps(d, indent=2)))


@command(
    "provision", "declare every stream, consumer and KV bucket (idempotent; the installer runs it as the NATS admin)"
)
def provision(config: Config, args: argparse.Namespace) -> int:
    return emit(
        args, asyncio.run(ctl.provision_all(config)), lambda d: print(f"provisioned: streams {', '.join(d['streams'])}")
    )


@command(
    "retention",
    "run retention once now (what the service does every interval)",
    arg("action", choices=["run"]),
    arg("--dry-run", action="store_true", help="print what would be deleted and change nothing"),
)
def retention(config: Config, args: argparse.Namespace) -> int:
    return emit(args, asyncio.run(ctl.retention_run(config, args.dry_run)), render.print_retention)
