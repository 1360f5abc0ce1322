"""`vigil`: the operator command. Every command is defined once, in services/cli/commands.py.

vigil run SERVICE [CONFIG]   run one service in the foreground (what the systemd units call)
vigil up [--home DIR]        the embedded default: NATS + PostgreSQL + every service, Ctrl-C stops
vigil models pull NAME       download a model into the models dir, checking size and sha256
vigil status|streams|tail|dlq|events|trace|provision|retention   look at the running system
vigil config check [FILE]    validate a config file, naming a bad field
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from services.cli import ctl, render
from services.cli.commands import COMMANDS, Command
from services.runtime.config import ConfigError


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vigil", description="vigil edge camera pipeline")
    sub = top.add_subparsers(dest="command", required=True)
    for c in COMMANDS.values():
        p = sub.add_parser(c.name, help=c.help, description=c.help)
        for flags, options in c.arguments:
            p.add_argument(*flags, **options)
        if c.operator:
            p.add_argument(
                "--config", default=None, help="config file (default: $VIGIL_CONFIG, else /etc/vigil/vigil.toml)"
            )
            p.add_argument("--json", action="store_true", help="machine-readable output")
    return top


def run_operator(c: Command, args: argparse.Namespace) -> int:
    """An operator command: the operator's config (78 when it is bad), then the handler; what goes
    wrong is one line on stderr with an exit status, never a traceback."""
    try:
        config = ctl.load_operator_config(args.config)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 78
    try:
        return c.handler(config, args)
    except KeyboardInterrupt:
        return 0
    except (LookupError, ValueError) as exc:
        print(f"vigil {c.name}: {render.human(exc)}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # before OSError: "needs root", not "cannot reach the server"
        print(f"vigil {c.name}: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:  # useradd, chpasswd, userdel: their own words
        print(f"vigil {c.name}: {exc.cmd[0]} failed: {(exc.stderr or '').strip()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vigil {c.name}: cannot reach the server: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "psycopg":
            raise
        # no password (not root on an appliance: the credentials are root's), database down, ...
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"vigil {c.name}: cannot use the database: {first} (on an appliance: sudo vigil ...)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    c = COMMANDS[args.command]
    return run_operator(c, args) if c.operator else c.handler(args)


if __name__ == "__main__":
    sys.exit(main())
