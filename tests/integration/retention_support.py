"""Seeding for the retention tests: real files with controlled mtimes, and the rows the recorder would
have written for them (in the recorder's own schema, migrated by the recorder's own code)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psycopg
import structlog

DAY = 86400.0


def migrate(dsn: str) -> None:
    from services.recorder.service import migrate as recorder_migrate

    async def go():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await recorder_migrate(conn, structlog.get_logger())

    asyncio.run(go())


def put_file(media: Path, rel: str, mtime: float, size: int = 4096) -> Path:
    path = media / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff" + os.urandom(size - 3))
    os.utime(path, (mtime, mtime))
    return path


def record(dsn: str, rel: str, captured_at: float, event_id: str | None = None, keep: bool = False) -> None:
    """The recorder's rows for one file: a detection, and optionally its event (one detection each)."""
    camera = rel.split("/")[0]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO detections (detection_id, file_id, camera, path, captured_at, width, height, model, inference_ms, box_count,"
            " labels, boxes) VALUES (%s, %s, %s, %s, to_timestamp(%s), 640, 480, 'none', 1, 0, '{}', '[]')",
            (f"id-{rel}", f"id-{rel}", camera, rel, captured_at),
        )
        if event_id:
            conn.execute(
                "INSERT INTO events (event_id, camera, started_at, ended_at, detection_count, labels, best_file_id, close_reason, keep)"
                " VALUES (%s, %s, to_timestamp(%s), to_timestamp(%s), 1, '{}', %s, 'idle', %s) ON CONFLICT DO NOTHING",
                (event_id, camera, captured_at, captured_at, f"id-{rel}", keep),
            )
            conn.execute(
                "INSERT INTO event_detections (detection_id, event_id) VALUES (%s, %s)", (f"id-{rel}", event_id)
            )


def rows(dsn: str, sql: str, *params) -> list:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()
