"""Event snapshots (<state_dir>/snapshots, made by the analyzer) go with their events, and within their
own quota (retention.snapshots_max_bytes).

A snapshot file that no analysis row names any more is deleted: its event went (age, missing media, a
lost file), or a newer revision replaced it, or an analyzer crashed between writing and publishing. The
analyzer writes a snapshot *before* its analysis is recorded, so a file younger than ORPHAN_GRACE is left
alone: the row naming it may be on its way. Over the quota, the oldest snapshots of events not marked
keep go first; their analysis rows then say why they have none."""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from proto import SNAPSHOTS_DIR
from services.retention.media import unlink_under
from services.runtime.config import Config

ORPHAN_GRACE = 600.0  # seconds
QUOTA_REASON = "removed by retention: over retention.snapshots_max_bytes"


@dataclass
class SnapshotFile:
    rel: str  # "<camera>.<hash>-r<revision>[.thumb].jpg"
    size: int
    mtime: float


@dataclass
class SnapshotReport:
    files: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)


def root_of(config: Config) -> Path:
    return Path(config.state_dir) / SNAPSHOTS_DIR


def scan(root: Path) -> tuple[list[SnapshotFile], list[SnapshotFile]]:
    """(snapshots, temp files of writes in progress or crashed) in the flat snapshots folder, in one
    listing; symlinks and folders are skipped."""
    files: list[SnapshotFile] = []
    temps: list[SnapshotFile] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return files, temps
    for f in entries:
        st = f.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            (temps if f.name.startswith(".tmp-") else files).append(SnapshotFile(f.name, st.st_size, st.st_mtime))
    return files, temps


def run(conn: psycopg.Connection, config: Config, now: float, dry_run: bool) -> SnapshotReport:
    root = root_of(config)
    report = SnapshotReport()
    files, temps = scan(root)
    for tmp in temps:  # a write that crashed (one still going is younger than the grace)
        if now - tmp.mtime > ORPHAN_GRACE and not dry_run:
            with contextlib.suppress(OSError):
                (root / tmp.rel).unlink()
    if not files:
        return report
    named: dict[str, tuple[str, bool]] = {}  # file -> (event id, kept)
    for event_id, snap, thumb, keep in conn.execute(
        "SELECT a.event_id, a.snapshot, a.thumbnail, coalesce(e.keep, false) FROM event_analysis a"
        " LEFT JOIN events e ON e.event_id = a.event_id WHERE a.snapshot IS NOT NULL OR a.thumbnail IS NOT NULL"
    ):
        for rel in (snap, thumb):
            if rel:
                named[rel] = (event_id, keep)
    doomed: list[SnapshotFile] = [f for f in files if f.rel not in named and now - f.mtime > ORPHAN_GRACE]
    quota = config.retention.snapshots_max_bytes
    if quota:
        live = sorted((f for f in files if f.rel in named), key=lambda f: f.mtime)
        total = sum(f.size for f in live)
        over: set[str] = set()
        for f in live:
            if total <= quota:
                break
            event_id, kept = named[f.rel]
            if kept:
                continue
            over.add(event_id)
            total -= f.size
        # an event loses its snapshot and its thumbnail together
        doomed += [f for f in live if named[f.rel][0] in over]
        if over and not dry_run:
            conn.execute(
                "UPDATE event_analysis SET snapshot = NULL, thumbnail = NULL, snapshot_error = %s"
                " WHERE event_id = ANY(%s)",
                (QUOTA_REASON, sorted(over)),
            )
    for f in doomed:
        try:
            if not dry_run:
                unlink_under(root, f.rel)
        except (OSError, ValueError) as exc:
            report.errors.append(f"snapshot {f.rel}: {exc}")
            continue
        report.files += 1
        report.bytes += f.size
    return report
