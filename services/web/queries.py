"""The web UI's reads and writes in PostgreSQL: each page is one or two indexed queries (no page decodes
an image or scans a table: events_started_at serves the newest-first list and its paging)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from psycopg.rows import dict_row

from proto.messages import RISK_LEVELS

REVIEWED = ("any", "no", "yes")


@dataclass(frozen=True)
class EventFilter:
    camera: str | None = None
    label: str | None = None
    level: str | None = None  # one of RISK_LEVELS
    reviewed: str = "any"  # any | no | yes
    day_from: dt.date | None = None  # in UTC
    day_to: dt.date | None = None
    page: int = 1

    @classmethod
    def of(cls, q) -> EventFilter:
        """From a query string; anything malformed is dropped (a filter that cannot match is no filter)."""

        def day(v: str | None) -> dt.date | None:
            try:
                return dt.date.fromisoformat(v) if v else None
            except ValueError:
                return None

        try:
            page = max(1, min(int(q.get("page", 1)), 100_000))
        except ValueError:
            page = 1
        level = q.get("level") or None
        reviewed = q.get("reviewed") or "any"
        return cls(
            camera=(q.get("camera") or None),
            label=(q.get("label") or None),
            level=level if level in RISK_LEVELS else None,
            reviewed=reviewed if reviewed in REVIEWED else "any",
            day_from=day(q.get("from")),
            day_to=day(q.get("to")),
            page=page,
        )

    def where(self) -> tuple[str, list]:
        parts: list[str] = ["true"]
        args: list = []
        if self.camera:
            parts.append("e.camera = %s")
            args.append(self.camera)
        if self.label:
            parts.append("e.labels ? %s")
            args.append(self.label)
        if self.level:
            parts.append("a.risk_level = %s")
            args.append(self.level)
        if self.reviewed != "any":
            parts.append("e.reviewed = %s")
            args.append(self.reviewed == "yes")
        # days on this box's clock, as the pages show times
        if self.day_from:
            parts.append("e.started_at >= %s")
            args.append(dt.datetime.combine(self.day_from, dt.time()).astimezone())
        if self.day_to:
            parts.append("e.started_at < %s")
            args.append(dt.datetime.combine(self.day_to + dt.timedelta(days=1), dt.time()).astimezone())
        return " AND ".join(parts), args

    def query_string(self, **change) -> str:
        from urllib.parse import urlencode

        v = {
            "camera": self.camera,
            "label": self.label,
            "level": self.level,
            "reviewed": None if self.reviewed == "any" else self.reviewed,
            "from": self.day_from.isoformat() if self.day_from else None,
            "to": self.day_to.isoformat() if self.day_to else None,
            "page": self.page if self.page > 1 else None,
        }
        v.update(change)
        return urlencode({k: x for k, x in v.items() if x not in (None, "") and not (k == "page" and x == 1)})


EVENT_COLUMNS = (
    "e.event_id, e.camera, e.started_at, e.ended_at, e.detection_count, e.labels, e.best_file_id, e.close_reason,"
    " e.keep, e.reviewed, e.reviewed_at, e.notes, e.revision, a.risk_score, a.risk_level, a.summary, a.factors,"
    " a.analyzer, a.analyzer_version, a.fallback, a.fallback_reason, a.zones, a.snapshot, a.thumbnail, a.snapshot_error"
)


async def events(conn, f: EventFilter, page_size: int) -> tuple[list[dict], bool]:
    """One page, newest first; and whether there is another."""
    where, args = f.where()
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {EVENT_COLUMNS} FROM events e LEFT JOIN event_analysis a ON a.event_id = e.event_id"
        f" WHERE {where} ORDER BY e.started_at DESC, e.event_id DESC LIMIT %s OFFSET %s",
        [*args, page_size + 1, (f.page - 1) * page_size],
    )
    rows = await cur.fetchall()
    return rows[:page_size], len(rows) > page_size


async def mark_reviewed(conn, f: EventFilter, seen_at: dt.datetime | None) -> int:
    """Every event the filter matches that was recorded by `seen_at` (when the page was drawn): one that
    closed after the operator looked is not marked seen."""
    where, args = f.where()
    if seen_at is not None:
        where += " AND e.recorded_at <= %s"
        args.append(seen_at)
    cur = await conn.execute(
        f"UPDATE events e SET reviewed = true, reviewed_at = now() FROM events e2"
        f" LEFT JOIN event_analysis a ON a.event_id = e2.event_id"
        f" WHERE e.event_id = e2.event_id AND NOT e.reviewed AND {where}",
        args,
    )
    return cur.rowcount


async def event(conn, event_id: str) -> dict | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {EVENT_COLUMNS} FROM events e LEFT JOIN event_analysis a ON a.event_id = e.event_id"
        " WHERE e.event_id = %s",
        (event_id,),
    )
    return await cur.fetchone()


async def detections(conn, event_id: str) -> list[dict]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT d.detection_id, d.file_id, d.path, d.frame, d.captured_at, d.width, d.height, d.model, d.boxes"
        " FROM event_detections ed JOIN detections d ON d.detection_id = ed.detection_id"
        " WHERE ed.event_id = %s ORDER BY d.captured_at, d.detection_id LIMIT 500",
        (event_id,),
    )
    return await cur.fetchall()


async def detection_path(conn, detection_id: str) -> str | None:
    row = await (await conn.execute("SELECT path FROM detections WHERE detection_id = %s", (detection_id,))).fetchone()
    return row[0] if row else None


async def set_flag(conn, event_id: str, column: str, value: bool) -> bool:
    assert column in ("reviewed", "keep")
    extra = ", reviewed_at = CASE WHEN %s THEN now() END" if column == "reviewed" else ""
    params: list = [value] + ([value] if extra else []) + [event_id]
    cur = await conn.execute(f"UPDATE events SET {column} = %s{extra} WHERE event_id = %s", params)
    return cur.rowcount == 1


async def set_notes(conn, event_id: str, notes: str) -> bool:
    cur = await conn.execute("UPDATE events SET notes = %s WHERE event_id = %s", (notes, event_id))
    return cur.rowcount == 1


async def cameras(conn, folders: list[str]) -> list[dict]:
    """Per camera (every camera folder, and every camera with rows): last upload (when vigil recorded
    it: the camera's own clock may be off), today's counts, the latest snapshot."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "WITH f AS (SELECT unnest(%s::text[]) AS camera),"
        " d AS (SELECT camera, max(recorded_at) AS last_upload,"
        "   count(*) FILTER (WHERE captured_at >= date_trunc('day', now())) AS detections_today"
        "   FROM detections GROUP BY camera),"
        " e AS (SELECT camera, count(*) FILTER (WHERE started_at >= date_trunc('day', now())) AS events_today"
        "   FROM events GROUP BY camera),"
        " s AS (SELECT DISTINCT ON (e.camera) e.camera, e.event_id, a.thumbnail FROM events e"
        "   JOIN event_analysis a ON a.event_id = e.event_id WHERE a.thumbnail IS NOT NULL"
        "   ORDER BY e.camera, e.started_at DESC)"
        " SELECT c.camera, d.last_upload, coalesce(d.detections_today, 0) AS detections_today,"
        "   coalesce(e.events_today, 0) AS events_today, s.event_id AS latest_event, s.thumbnail"
        " FROM (SELECT camera FROM f UNION SELECT camera FROM d UNION SELECT camera FROM e) c"
        " LEFT JOIN d ON d.camera = c.camera LEFT JOIN e ON e.camera = c.camera LEFT JOIN s ON s.camera = c.camera"
        " ORDER BY 1",
        (folders,),
    )
    return await cur.fetchall()


async def camera_alerts(conn) -> list[dict]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT DISTINCT ON (camera, kind) camera, kind, severity, message, created_at, state FROM alerts"
        " WHERE kind IN ('camera_silent', 'camera_clock', 'camera_unreadable') ORDER BY camera, kind, created_at DESC"
    )
    return [r for r in await cur.fetchall() if r["state"] != "resolved"]


async def audit(conn, target: str | None = None, limit: int = 200) -> list[dict]:
    cur = conn.cursor(row_factory=dict_row)
    if target:
        await cur.execute(
            "SELECT id, at, actor, via, action, target, result, remote FROM audit_log WHERE target = %s"
            " ORDER BY at DESC LIMIT %s",
            (target, limit),
        )
    else:
        await cur.execute(
            "SELECT id, at, actor, via, action, target, result, remote FROM audit_log ORDER BY at DESC LIMIT %s",
            (limit,),
        )
    return await cur.fetchall()


async def camera_names(conn) -> list[str]:
    cur = await conn.execute("SELECT DISTINCT camera FROM events ORDER BY 1")
    return [r[0] for r in await cur.fetchall()]
