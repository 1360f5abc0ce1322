"""retention: the disk never fills, nothing valuable is deleted, every deletion is accounted for.

Each run (every `retention.interval_seconds`; at once when free space on the media filesystem is
below the low watermark, checked every `disk_check_seconds` and whenever the watcher asks on
vigil.control.retention):
  1. scans the media root (services/retention/media.py) and plans deletions: media older than the
     camera's max age, then over its size quota, then - while free space is below the low watermark -
     the oldest media of any camera until it is above the high watermark, never anything younger than
     min_keep_seconds, never a file of an event marked keep, never a file the pipeline has not
     finished with (recorded in PostgreSQL, or dead-lettered);
  2. deletes those files and, in the same breath, their rows (detections, event links, events left
     empty);
  3. marks rows whose file vanished (missing_since), clears the mark when the file is back, deletes
     them after missing_grace_days;
  4. deletes detections, events, alerts and GPU samples older than their own retention, in batches
     of delete_batch rows (short transactions, no long locks);
  5. checks every JetStream stream has max_age and max_bytes;
and publishes a RetentionReport on vigil.retention.report (also logged). `vigil retention run
--dry-run` computes the same report and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import msgspec
import psycopg
import psycopg.errors

import proto
from proto.messages import MAX_REPORTED_PATHS, CameraFreed, RetentionReport
from proto.topology import RETENTION_CHECK_SUBJECT, RETENTION_REPORT_SUBJECT, STREAMS
from services import database
from services.retention import snapshots
from services.retention.media import (
    DAY,
    MediaFile,
    check_root,
    free_space,
    plan,
    present,
    scan,
    unlink_under,
    watermark_bytes,
)
from services.runtime import jetstream
from services.runtime.config import Config
from services.runtime.service import Runtime

CHUNK = 5000  # paths per `= ANY(%s)` query


# ---- facts from the bus ----------------------------------------------------------------------------
async def unbounded_streams(js) -> list[str]:
    """Streams on the server without an age or size bound (someone edited one by hand, or a stream
    that vigil does not declare bounds for)."""
    import nats.js.errors

    out = []
    for spec in STREAMS:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            cfg = (await js.stream_info(spec.name)).config
            if not cfg.max_age or cfg.max_age <= 0 or not cfg.max_bytes or cfg.max_bytes <= 0:
                out.append(spec.name)
    return out


# ---- the database side -----------------------------------------------------------------------------
def _chunks(items: list, n: int = CHUNK):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def recorded(conn: psycopg.Connection, paths: list[str], prefix: str = "") -> dict[str, tuple[float, float]]:
    """Recorded paths -> (capture time, arrival, file size, file mtime): the latest detection's captured_at
    (the watcher's sane time, not a wrong camera clock), when the watcher took the file (published_at;
    rows without one fall back to captured_at), and the size and mtime of the file it read (None in rows
    written before vigil recorded them)."""
    out: dict[str, tuple] = {}
    for chunk in _chunks(paths):
        out.update(
            {
                r[0]: (float(r[1]), float(r[2]), r[3], r[4])
                for r in conn.execute(
                    "SELECT path, extract(epoch from max(captured_at)), extract(epoch from max(coalesce(published_at, captured_at))),"
                    " max(file_size), max(file_mtime)"
                    f" FROM detections d WHERE path = ANY(%s) AND {_MINE} GROUP BY path",
                    (chunk, _like(prefix)),
                )
            }
        )
    return out


def dead_lettered(conn: psycopg.Connection, files: list[MediaFile], prefix: str = "") -> set[str]:
    """Files the detector gave up on for their content (not a crash or an outage: those are retried):
    the pipeline is finished with them too. From the recorder's dead_letters rows only, whose stage is
    the subject's (services/recorder/service.py: trusted_letter): anyone who can write into the DLQ stream could
    otherwise mark any file finished and have it deleted unrecorded. Only for the very file the letter
    was about (same size and mtime): a new upload at the same path is still pending."""
    seen: dict[str, set[tuple[int, float]]] = {}
    for chunk in _chunks([f.rel for f in files]):
        for path, size, mtime in conn.execute(
            "SELECT path, file_size, file_mtime FROM dead_letters d WHERE path = ANY(%s) AND stage = 'detector' AND NOT transient"
            f" AND file_size IS NOT NULL AND file_mtime IS NOT NULL AND {_MINE}",
            (chunk, _like(prefix)),
        ):
            seen.setdefault(path, set()).add((int(size), float(mtime)))
    return {f.rel for f in files if any(same_file(f, size, mtime) for size, mtime in seen.get(f.rel, ()))}


def same_file(f: MediaFile, size, mtime) -> bool:
    """`f` is the file the pipeline saw (its size and on-disk mtime; None: a row from before vigil kept them)."""
    return (size is None or size == f.size) and (mtime is None or abs(float(mtime) - f.mtime) < 1e-3)


def with_pipeline_times(files: list[MediaFile], times: dict[str, tuple]) -> tuple[list[MediaFile], set[str]]:
    """Recorded files get the pipeline's capture and arrival times. A file is finished only if it is the
    file the pipeline read (same size and mtime): a new upload at a reused path is pending, never deleted."""
    out, finished = [], set()
    for f in files:
        t = times.get(f.rel)
        if t is None:
            out.append(f)
            continue
        captured, arrived, size, mtime = t
        if same_file(f, size, mtime):
            finished.add(f.rel)
            out.append(f._replace(mtime=captured, arrived=arrived))
        else:
            out.append(f)
    return out, finished


def kept_paths(conn: psycopg.Connection, prefix: str = "", among: list[str] | None = None) -> set[str]:
    """Paths of files in events marked keep (only those in `among`, when given)."""
    return {
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT d.path FROM events e JOIN event_detections ed ON ed.event_id = e.event_id"
            f" JOIN detections d ON d.detection_id = ed.detection_id WHERE e.keep AND {_MINE}"
            " AND (%s::text[] IS NULL OR d.path = ANY(%s::text[]))",
            (_like(prefix), among, among),
        )
    }


# Rows of this host's cameras only (watcher.camera_prefix): with several folder hosts, a path is only
# meaningful under the media root of the host whose watcher published it.
_MINE = "d.camera LIKE %s"


def _like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


_NOT_KEPT = (
    "NOT EXISTS (SELECT 1 FROM event_detections ed JOIN events e ON e.event_id = ed.event_id"
    " WHERE ed.detection_id = d.detection_id AND e.keep)"
)


def delete_rows_for_paths(
    conn: psycopg.Connection, paths: list[str], dry_run: bool, prefix: str = ""
) -> dict[str, int]:
    """Rows of deleted media: their detections, the event links, and events left with no detection."""
    counts = {"detections": 0, "event_detections": 0, "events": 0}
    for chunk in _chunks(paths):
        if dry_run:
            counts["detections"] += conn.execute(
                f"SELECT count(*) FROM detections d WHERE path = ANY(%s) AND {_MINE} AND {_NOT_KEPT}",
                (chunk, _like(prefix)),
            ).fetchone()[0]
            continue
        with conn.transaction():
            ids = [
                r[0]
                for r in conn.execute(
                    f"DELETE FROM detections d WHERE path = ANY(%s) AND {_MINE} AND {_NOT_KEPT} RETURNING detection_id",
                    (chunk, _like(prefix)),
                )
            ]
            counts["detections"] += len(ids)
            events = [
                r[0]
                for r in conn.execute(
                    "DELETE FROM event_detections WHERE detection_id = ANY(%s) RETURNING event_id", (ids,)
                )
            ]
            counts["event_detections"] += len(events)
            gone = conn.execute(
                "DELETE FROM events e WHERE event_id = ANY(%s) AND NOT keep AND NOT EXISTS"
                " (SELECT 1 FROM event_detections ed WHERE ed.event_id = e.event_id) RETURNING event_id",
                (list(set(events)),),
            ).fetchall()
            counts["events"] += len(gone)
            conn.execute("DELETE FROM event_analysis WHERE event_id = ANY(%s)", ([r[0] for r in gone],))
    return counts


def sweep(conn: psycopg.Connection, table: str, where: str, params: dict, batch: int, dry_run: bool) -> int:
    """DELETE ... WHERE <where> in batches of `batch` rows, one short transaction each (row locks
    held for milliseconds; autovacuum keeps up instead of facing one huge dead-tuple wave)."""
    key = {
        "detections": "detection_id",
        "events": "event_id",
        "alerts": "alert_id",
        "gpu_samples": "ctid",
        "dead_letters": "dlq_seq",
        "event_analysis": "event_id",
        "audit_log": "id",
        "web_sessions": "token_hash",
    }[table]
    if dry_run:
        return conn.execute(f"SELECT count(*) FROM {table} d WHERE {where}", params).fetchone()[0]
    total = 0
    while True:
        with conn.transaction():
            rows = conn.execute(
                f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} d WHERE {where} LIMIT %(batch)s)"
                f" RETURNING {key}",
                {**params, "batch": batch},
            ).fetchall()
            if table == "detections" and rows:  # event links have no foreign key to detections
                conn.execute("DELETE FROM event_detections WHERE detection_id = ANY(%s)", ([r[0] for r in rows],))
            if table == "events" and rows:  # nor analyses to events (they may come first)
                conn.execute("DELETE FROM event_analysis WHERE event_id = ANY(%s)", ([r[0] for r in rows],))
        total += len(rows)
        if len(rows) < batch:
            return total


def sweep_all(conn: psycopg.Connection, config: Config, now: float, dry_run: bool) -> dict[str, int]:
    """Rows older than their table's retention; rows of kept events never go."""
    r = config.retention
    cut = lambda days: {"cutoff": now - days * DAY}  # noqa: E731
    return {
        # one day more than asked: a clip's frames are dated before its file's mtime, and a file must
        # not lose its rows (and so count as unrecorded, never deleted) before the age rule takes it
        "detections": sweep(
            conn,
            "detections",
            f"captured_at < to_timestamp(%(cutoff)s) AND {_NOT_KEPT}",
            cut(r.detections_days + 1),
            r.delete_batch,
            dry_run,
        ),
        "events": sweep(
            conn,
            "events",
            "started_at < to_timestamp(%(cutoff)s) AND NOT keep",
            cut(r.events_days),
            r.delete_batch,
            dry_run,
        ),
        # an analysis whose event row never came (or went without it)
        "event_analysis": sweep(
            conn,
            "event_analysis",
            "analyzed_at < to_timestamp(%(cutoff)s) AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = d.event_id AND e.keep)",
            cut(r.events_days),
            r.delete_batch,
            dry_run,
        ),
        "alerts": sweep(
            conn, "alerts", "created_at < to_timestamp(%(cutoff)s)", cut(r.alerts_days), r.delete_batch, dry_run
        ),
        "gpu_samples": sweep(
            conn, "gpu_samples", "minute < to_timestamp(%(cutoff)s)", cut(r.gpu_samples_days), r.delete_batch, dry_run
        ),
        "audit_log": sweep(
            conn, "audit_log", "at < to_timestamp(%(cutoff)s)", cut(r.audit_days), r.delete_batch, dry_run
        ),
        # a session past its expiry opens nothing; the row only waits for this
        "web_sessions": sweep(
            conn, "web_sessions", "expires_at < to_timestamp(%(cutoff)s)", cut(0), r.delete_batch, dry_run
        ),
        # a dead letter stands in for the detections its file never got: it lasts as long as they would
        "dead_letters": sweep(
            conn,
            "dead_letters",
            "failed_at < to_timestamp(%(cutoff)s)",
            cut(r.detections_days + 1),
            r.delete_batch,
            dry_run,
        ),
    }


def missing(
    conn: psycopg.Connection,
    root: Path,
    on_disk: set[str],
    scan_started: float,
    config: Config,
    now: float,
    dry_run: bool,
) -> tuple[int, int, list[str]]:
    """Mark rows whose file vanished, clear marks whose file is back; return (marked, restored, paths
    past the grace period). Only rows recorded before the scan started are judged: a file recorded
    while the scan ran is not missing, just newer than the scan."""
    mine = _like(config.watcher.camera_prefix)
    marked_paths = [
        r[0]
        for r in conn.execute(
            f"SELECT DISTINCT path FROM detections d WHERE missing_since IS NOT NULL AND {_MINE}", (mine,)
        )
    ]
    back = sorted(present(root, marked_paths))
    candidates = [
        r[0]
        for r in conn.execute(
            f"SELECT DISTINCT path FROM detections d WHERE missing_since IS NULL AND recorded_at < to_timestamp(%s) AND {_MINE}",
            (scan_started, mine),
        )
    ]
    # Double-check with lstat: the scan skips symlinked and hidden paths, which are then not "present".
    gone = sorted(p for p in candidates if p not in on_disk and not present(root, [p]))
    expired = [
        r[0]
        for r in conn.execute(
            f"SELECT DISTINCT path FROM detections d WHERE missing_since < to_timestamp(%s) AND {_MINE}",
            (now - config.retention.missing_grace_days * DAY, mine),
        )
    ]
    expired = sorted(set(expired) - set(back))
    if not dry_run:
        for chunk in _chunks(back):
            conn.execute(
                f"UPDATE detections d SET missing_since = NULL WHERE path = ANY(%s) AND {_MINE}", (chunk, mine)
            )
        for chunk in _chunks(gone):
            conn.execute(
                f"UPDATE detections d SET missing_since = to_timestamp(%s) WHERE path = ANY(%s) AND missing_since IS NULL AND {_MINE}",
                (now, chunk, mine),
            )
    return len(gone), len(back), expired


# ---- one run ---------------------------------------------------------------------------------------
def _delete(root: Path, rel: str, dry_run: bool, errors: list[str]) -> bool:
    """One file beneath the media root (never through a symlink); False, with the reason in `errors`,
    when it could not be deleted."""
    try:
        if not dry_run:
            unlink_under(root, rel)
        return True
    except (OSError, ValueError) as exc:
        errors.append(proto.printable(f"{rel}: {exc}"))
        return False


def run_once(
    config: Config, conn: psycopg.Connection, now: float, trigger: str, dry_run: bool, unbounded: list[str] = ()
) -> RetentionReport:
    """Everything one run does (blocking: call in a thread). `now` is a parameter so tests control
    the clock; the database's own clock is never used for a cutoff."""
    r = config.retention
    root = check_root(config.media_root)
    started = time.time()
    report = RetentionReport(
        run_id=uuid.uuid4().hex[:12],
        trigger=trigger,
        dry_run=dry_run,
        started_at=started,
        finished_at=started,
        unbounded_streams=list(unbounded),
    )
    free, total = free_space(root)
    report.free_bytes_before, report.total_bytes = free, total
    hidden: list[MediaFile] = []
    files = scan(root, config.watcher.camera_prefix, hidden)
    for f in hidden:  # uploads that never finished under their temporary name
        if now - f.mtime < r.stale_upload_hours * 3600 or not _delete(root, f.rel, dry_run, report.errors):
            continue
        report.stale_uploads_deleted += 1
        report.stale_upload_bytes_freed += f.size
    prefix = config.watcher.camera_prefix
    finished = dead_lettered(conn, files, prefix)  # before the pipeline's times replace the files' mtimes
    files, recorded_finished = with_pipeline_times(files, recorded(conn, [f.rel for f in files], prefix))
    finished |= recorded_finished
    decided = plan(files, finished, kept_paths(conn, prefix), r, now, free, total)
    report.kept_skipped, report.young_skipped, report.unrecorded_skipped = (
        decided.kept_skipped,
        decided.young_skipped,
        decided.unrecorded_skipped,
    )
    deleted: list[str] = []
    kept_now: set[str] = set()
    for i, (f, rule) in enumerate(decided.delete):
        if i % 200 == 0:  # an event marked keep while this run goes: look again, just before each chunk
            kept_now = kept_paths(conn, prefix, [x.rel for x, _ in decided.delete[i : i + 200]])
        if f.rel in kept_now:
            report.kept_skipped += 1
            continue
        if not _delete(root, f.rel, dry_run, report.errors):
            continue
        deleted.append(f.rel)
        cam = report.cameras.setdefault(f.camera, CameraFreed())
        cam.files += 1
        cam.bytes += f.size
        cam.reasons[rule] = cam.reasons.get(rule, 0) + 1
    rows = delete_rows_for_paths(conn, deleted, dry_run, prefix)
    on_disk = {f.rel for f in files} - set(deleted)
    report.missing_marked, report.missing_restored, expired = missing(
        conn, root, on_disk, started, config, now, dry_run
    )
    for table, n in delete_rows_for_paths(conn, expired, dry_run, prefix).items():
        rows[table] = rows.get(table, 0) + n
    for table, n in sweep_all(conn, config, now, dry_run).items():
        rows[table] = rows.get(table, 0) + n
    snaps = snapshots.run(conn, config, now, dry_run)
    report.snapshots_deleted, report.snapshot_bytes_freed = snaps.files, snaps.bytes
    report.errors += [proto.printable(e) for e in snaps.errors]
    report.rows_deleted = {t: n for t, n in rows.items() if n}
    report.deleted_count = len(deleted)
    report.deleted_paths = sorted(deleted)[:MAX_REPORTED_PATHS]
    report.free_bytes_after = (
        free_space(root)[0] if not dry_run else free + sum(c.bytes for c in report.cameras.values())
    )
    report.finished_at = time.time()
    return report


async def gather_and_run(config: Config, js, trigger: str, dry_run: bool, now: float | None = None) -> RetentionReport:
    """The bus facts (stream bounds), then the blocking run in a thread."""
    unbounded = await unbounded_streams(js) if js is not None else []

    def blocking() -> RetentionReport:
        with database.connect(config, "retention", autocommit=True) as conn:
            return run_once(config, conn, now or time.time(), trigger, dry_run, unbounded)

    return await asyncio.to_thread(blocking)


# ---- the service -----------------------------------------------------------------------------------
async def run(config: Config) -> None:
    r = config.retention
    root = check_root(config.media_root)  # ConfigError -> exit 78 before anything else
    async with Runtime.start("retention", config) as rt:
        wake = asyncio.Event()
        asked_by_watcher = False

        async def on_check(msg) -> None:
            nonlocal asked_by_watcher
            asked_by_watcher = True
            wake.set()

        await rt.nc.subscribe(RETENTION_CHECK_SUBJECT, cb=on_check)
        next_full = next_disk = 0.0
        freed_last = True
        rt.beat("retention")
        while not rt.stopping.is_set():
            trigger = None
            if asked_by_watcher:
                trigger = "watcher"
            elif time.monotonic() >= next_disk:
                next_disk = time.monotonic() + r.disk_check_seconds * (1 if freed_last else 6)
                try:
                    free, total = await asyncio.to_thread(free_space, root)
                    if total and free < watermark_bytes(r.low_watermark, total):
                        trigger = "watermark"
                except OSError as exc:
                    rt.note_error(f"statvfs {root}: {exc}")
            if trigger is None and time.monotonic() >= next_full:
                trigger = "interval"
            asked_by_watcher = False
            wake.clear()
            if trigger:
                try:
                    run = asyncio.ensure_future(gather_and_run(config, rt.js, trigger, dry_run=False))
                    while not run.done():  # a big first run can take minutes: that is work, not a hang
                        await asyncio.wait({run}, timeout=2.0)
                        rt.keepalive()
                    report = run.result()
                except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
                    # first start: the recorder creates and migrates the schema; nothing to judge until then
                    rt.log.info("waiting for the recorder to migrate the schema", detail=str(exc).splitlines()[0][:200])
                    next_disk = min(next_disk, time.monotonic() + 5.0)
                except (psycopg.Error, OSError, *jetstream.TRANSIENT) as exc:
                    rt.note_error(f"retention run failed: {exc!r}")
                    rt.log.warning("retention run failed; trying again at the next check", error=repr(exc))
                else:
                    log_report(rt, report)
                    await rt.bus.publish(RETENTION_REPORT_SUBJECT, report, f"retention-{report.run_id}")
                    rt.count("runs")
                    rt.count("files_deleted", report.deleted_count)
                    # low on space with nothing deletable: check less often (a full scan every 10 s helps nobody)
                    freed_last = report.deleted_count > 0 or trigger != "watermark"
                    if trigger == "interval":
                        next_full = time.monotonic() + r.interval_seconds
            rt.beat("retention")
            # wake at least every second: to notice a stop, and to keep the disk check on its cadence
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=1.0)


def log_report(rt: Runtime, report: RetentionReport) -> None:
    level = rt.log.warning if report.errors or report.unbounded_streams else rt.log.info
    level(
        "retention run",
        trigger=report.trigger,
        files=report.deleted_count,
        bytes=sum(c.bytes for c in report.cameras.values()),
        cameras={c: msgspec.to_builtins(v) for c, v in report.cameras.items()},
        rows=report.rows_deleted,
        missing_marked=report.missing_marked,
        missing_restored=report.missing_restored,
        kept_skipped=report.kept_skipped,
        young_skipped=report.young_skipped,
        unrecorded_skipped=report.unrecorded_skipped,
        free_before=report.free_bytes_before,
        free_after=report.free_bytes_after,
        unbounded_streams=report.unbounded_streams,
        errors=report.errors[:20],
    )
