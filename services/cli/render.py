"""How the operator commands print: rich tables, one-line messages, the status page in a terminal,
and the confirmation a retry asks for."""

from __future__ import annotations

import sys

import proto


def print_retention(data: dict) -> None:
    verb = "would delete" if data["dry_run"] else "deleted"
    table(
        f"retention ({'dry run' if data['dry_run'] else 'done'})",
        ["camera", "files", "bytes", "why"],
        [
            [c, v["files"], v["bytes"], ", ".join(f"{k} {n}" for k, n in v["reasons"].items())]
            for c, v in data["cameras"].items()
        ],
    )
    for path in data["deleted_paths"]:
        print(f"{verb}: {human(path)}")
    print(
        f"rows {verb}: {data['rows_deleted'] or 'none'}; missing marked {data['missing_marked']}, restored {data['missing_restored']};"
        f" skipped: kept {data['kept_skipped']}, too young {data['young_skipped']}, not yet recorded {data['unrecorded_skipped']}"
    )
    if data["unbounded_streams"]:
        print(f"streams without bounds: {human(', '.join(data['unbounded_streams']))}")
    for error in data["errors"]:
        print(f"error: {human(error)}")


def one_line(value) -> str:
    match value:
        case proto.FileUploaded():
            return f"{value.camera} {value.path} {value.kind} {value.size} B"
        case proto.Detections():
            return (
                f"{value.camera} {value.path}"
                + (f" frame {value.frame}" if value.frame is not None else "")
                + f": {', '.join(f'{b.label} {b.score:.2f}' for b in value.boxes) or 'nothing'} ({value.inference_ms} ms)"
            )
        case proto.EventClosed():
            return f"{value.camera} {value.event_id} {len(value.file_ids)} detections {sorted(value.labels)} ({value.close_reason})"
        case proto.Alert():
            return f"{value.severity} {value.camera} {value.kind}: {value.message}"
        case proto.DeadLetter():
            return f"{value.stage} {value.camera or '-'}: {value.reason}"
    return str(value)


def confirm_retry(letter, subject: str, yes: bool) -> bool:
    """Show where a retry would publish (the target services/runtime/dlq_retry.py checked) and ask, unless --yes.
    Without a terminal to ask on, --yes is required: a script must say it means it."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise ValueError(
            f"would re-publish dead letter of stage {letter.stage} to {subject}: pass --yes to do it without asking"
        )
    print(
        human(
            f"stage {letter.stage}, camera {letter.camera or '-'}, path {letter.path or '-'}\nreason: {letter.reason}"
        )
    )
    return input(human(f"re-publish to {subject}? [y/N] ")).strip().lower() in ("y", "yes")


def human(value) -> str:
    """Any value for a person's terminal: control characters (ESC sequences that move the cursor,
    retitle the window or forge a hyperlink; a newline that forges a line) written as escapes."""
    return proto.printable("" if value is None else str(value))


def table(title: str, columns: list[str], rows: list[list]) -> None:
    """Every cell is plain text: rich's markup (`[link=...]`, `[/bogus]`, which crashed `vigil status`)
    is never read from data; a cell styled by us comes as a rich Text already."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(human(title)))
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*(v if isinstance(v, Text) else Text(human(v)) for v in r))
    Console().print(t)


def styled(value, style: str):
    from rich.text import Text

    return Text(human(value), style=style)


def print_status(data: dict) -> None:
    """The HUD: services, backlog, GPUs, disks."""
    from services.health.checks import fmt_age as _age

    colour = {"healthy": "green", "degraded": "yellow", "down": "red", "stale": "red"}
    rate = lambda s: ", ".join(f"{k} {v}" for k, v in s["counters"].items())  # noqa: E731
    table(
        "services",
        [
            "service",
            "instance",
            "verdict",
            "reason",
            "uptime",
            "restarts",
            "in flight",
            "counters",
            "backend",
            "last error",
        ],
        [
            [
                s["service"],
                s["instance"] or "-",
                styled(s["verdict"], colour[s["verdict"]]),
                s["reason"],
                _age(s["uptime_s"]),
                s["restarts"],
                s["in_flight"],
                rate(s),
                s["backend"],
                s["last_error"],
            ]
            for s in data["services"]
        ],
    )
    table(
        "backlog",
        ["stage", "stream", "pending", "ack pending", "redelivered", "oldest unacked", "dead letters"],
        [
            [
                st["consumer"],
                st["stream"],
                st["pending"],
                st["ack_pending"],
                st["redelivered"],
                _age(st["oldest_unacked_s"]),
                data["dead_letters"].get(st["consumer"].split("-")[0], 0),
            ]
            for st in data["stages"]
        ],
    )
    if data["gpus"]:
        table(
            "GPUs",
            ["host", "gpu", "name", "util %", "memory MiB", "temp °C", "power W"],
            [
                [
                    g["host"],
                    g["index"],
                    g["name"],
                    g["util_pct"],
                    f"{g['mem_used_mb']}/{g['mem_total_mb']}",
                    g["temp_c"],
                    g["power_w"],
                ]
                for g in data["gpus"]
            ],
        )
    table(
        "disks",
        ["path", "free", "size"],
        [
            [
                d["path"],
                f"{d['free_pct']:.1f}% ({d['free_bytes'] / 2**30:.1f} GiB)",
                f"{d['total_bytes'] / 2**30:.1f} GiB",
            ]
            for d in data["disks"]
        ],
    )
    if data.get("nodes"):
        table(
            f"NATS cluster: nodes {', '.join(data['nodes'])}",
            ["stream", "leader", "replicas (lag)", "messages"],
            [
                [
                    st["name"],
                    st["leader"] or styled("none", "red"),
                    ", ".join(
                        f"{r['node']}{' offline' if r['offline'] else ''}"
                        f"{'' if r['current'] else ' behind'} ({r['lag']})"
                        for r in st["replicas"]
                    ),
                    st["messages"],
                ]
                for st in data["streams"]
            ],
        )
    for what in data.get("unreadable", []):
        print(styled(f"not readable now: {human(what)}", "yellow"))
    print(f"systemd: {human(data['systemd'])}")
