"""`vigil`: the operator command.

    vigil run SERVICE [CONFIG]   run one service in the foreground (what the systemd units call)
    vigil up [--home DIR]        the embedded default: NATS + PostgreSQL + every service, Ctrl-C stops
"""

from __future__ import annotations

import argparse
import importlib
import sys

SERVICES = ("watcher", "detector", "aggregator", "recorder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vigil", description="vigil edge camera pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run one service in the foreground")
    p_run.add_argument("service", choices=SERVICES)
    p_run.add_argument("config", nargs="?", help="TOML config file (default: $VIGIL_CONFIG, else built-in defaults)")
    p_up = sub.add_parser("up", help="run everything on the embedded NATS + PostgreSQL")
    p_up.add_argument("--home", default=".vigil", help="folder for state, media and logs (default .vigil)")
    p_up.add_argument("--models-dir", default=None, help="folder with yolox_nano.onnx (default $VIGIL_MODELS_DIR, else HOME/models)")
    p_up.add_argument("--nats-port", type=int, default=4222)
    p_up.add_argument("--pg-port", type=int, default=5433)
    args = parser.parse_args(argv)

    if args.command == "run":
        return _run_service(args.service, args.config)
    if args.command == "up":
        from services.up import up

        return up(args)
    return 2


def _run_service(name: str, config: str | None) -> int:
    from services.runtime.service import main as service_main

    module = importlib.import_module(f"services.{name}")
    return service_main(name, module.run, [config] if config else [])


if __name__ == "__main__":
    sys.exit(main())
