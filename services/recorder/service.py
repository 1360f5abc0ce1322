"""recorder: Detections, EventClosed, EventAnalyzed, Alert, GpuSample and DeadLetter -> PostgreSQL.

Each consumer writes a fetched batch in one transaction (idempotent: ON CONFLICT on the message ids)
and acks only after COMMIT. While PostgreSQL is away nothing is acked: the batch is held (with
in_progress() so it is not redelivered elsewhere), the backlog waits in JetStream, and writing resumes
when the database returns. A row the database rejects is isolated and dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from importlib import resources

import msgspec
import psycopg
from nats.aio.msg import Msg

import proto
from proto import Alert, DeadLetter, Detections, EventAnalyzed, EventClosed, FileUploaded, GpuSample
from proto.topology import dlq_subject_stage
from services import database
from services.runtime import jetstream
from services.runtime.config import Config
from services.runtime.service import Runtime

STAGE = "recorder"
_MIGRATION_LOCK = 0x76696731  # "vig1": one migrator at a time


async def migrate(conn: psycopg.AsyncConnection, log) -> None:
    """Apply services/recorder/schema/NNN_*.sql in order, each once, under an advisory lock. A schema
    that is current costs no DDL, so a role without CREATE (per_service_roles) passes; one that is
    behind raises InsufficientPrivilege for such a role (the owner, vigil-postgres, migrates)."""
    files = sorted(f for f in resources.files("services.recorder.schema").iterdir() if f.name.endswith(".sql"))
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        exists = (await (await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")).fetchone())[0]
        done = (
            {r[0] for r in await (await conn.execute("SELECT version FROM schema_migrations")).fetchall()}
            if exists
            else set()
        )
        if {int(f.name.split("_", 1)[0]) for f in files} <= done:
            return
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for f in files:
            version = int(f.name.split("_", 1)[0])
            if version not in done:
                await conn.execute(f.read_text())
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, f.name))
                log.info("schema migrated", version=version, name=f.name)


async def write_detections(cur: psycopg.AsyncCursor, items: list[Detections]) -> None:
    await cur.executemany(
        "INSERT INTO detections (detection_id, file_id, frame, offset_s, camera, path, captured_at, published_at,"
        " width, height, model, inference_ms, box_count, labels, boxes, clock_suspect, file_size, file_mtime) VALUES (%s, %s, %s,"
        " %s, %s, %s, to_timestamp(%s), to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s) ON CONFLICT (detection_id) DO NOTHING",
        [
            (
                d.key,
                d.file_id,
                d.frame,
                d.offset_s,
                d.camera,
                d.path,
                d.captured_at,
                d.published_at or None,
                d.width,
                d.height,
                d.model,
                d.inference_ms,
                len(d.boxes),
                sorted({b.label for b in d.boxes}),
                msgspec.json.encode(d.boxes).decode(),
                d.clock_suspect,
                d.file_size,
                d.file_mtime,
            )
            for d in items
        ],
    )


async def write_events(cur: psycopg.AsyncCursor, items: list[EventClosed]) -> None:
    await cur.executemany(
        "INSERT INTO events (event_id, camera, started_at, ended_at, detection_count, labels, best_file_id,"
        " close_reason, revision) VALUES (%s, %s, to_timestamp(%s), to_timestamp(%s), %s, %s::jsonb, %s, %s, %s)"
        " ON CONFLICT (event_id) DO UPDATE SET started_at = excluded.started_at, ended_at = excluded.ended_at,"
        " detection_count = excluded.detection_count, labels = excluded.labels, best_file_id = excluded.best_file_id,"
        " close_reason = excluded.close_reason, revision = excluded.revision"
        " WHERE events.revision < excluded.revision",  # the latest revision wins, in whatever order they come
        [
            (
                e.event_id,
                e.camera,
                e.started_at,
                e.ended_at,
                len(e.file_ids),
                msgspec.json.encode(e.labels).decode(),
                e.best_file_id,
                e.close_reason,
                e.revision,
            )
            for e in items
        ],
    )
    await cur.executemany(
        "INSERT INTO event_detections (detection_id, event_id) VALUES (%s, %s) ON CONFLICT (detection_id) DO NOTHING",
        [(fid, e.event_id) for e in items for fid in e.file_ids],
    )


async def write_analyses(cur: psycopg.AsyncCursor, items: list[EventAnalyzed]) -> None:
    await cur.executemany(
        "INSERT INTO event_analysis (event_id, revision, camera, risk_score, risk_level, summary, factors, analyzer,"
        " analyzer_version, fallback, fallback_reason, zones, analyzed_at, snapshot, thumbnail, snapshot_error)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, to_timestamp(%s), %s, %s, %s)"
        " ON CONFLICT (event_id) DO UPDATE SET revision = excluded.revision,"
        " risk_score = excluded.risk_score, risk_level = excluded.risk_level, summary = excluded.summary,"
        " factors = excluded.factors, analyzer = excluded.analyzer, analyzer_version = excluded.analyzer_version,"
        " fallback = excluded.fallback, fallback_reason = excluded.fallback_reason, zones = excluded.zones,"
        " analyzed_at = excluded.analyzed_at, snapshot = excluded.snapshot, thumbnail = excluded.thumbnail,"
        " snapshot_error = excluded.snapshot_error"
        " WHERE event_analysis.revision < excluded.revision",  # the latest revision wins, in whatever order
        [
            (
                a.event_id,
                a.revision,
                a.camera,
                a.risk_score,
                a.risk_level,
                a.summary,
                msgspec.json.encode(a.factors).decode(),
                a.analyzer.name,
                a.analyzer.version,
                a.fallback,
                a.fallback_reason,
                a.zones,
                a.analyzed_at,
                a.snapshot,
                a.thumbnail,
                a.snapshot_error,
            )
            for a in items
        ],
    )


async def write_alerts(cur: psycopg.AsyncCursor, items: list[Alert]) -> None:
    await cur.executemany(
        "INSERT INTO alerts (alert_id, camera, kind, severity, message, created_at, file_id, event_id, score, state)"
        " VALUES (%s, %s, %s, %s, %s, to_timestamp(%s), %s, %s, %s, %s) ON CONFLICT (alert_id) DO NOTHING",
        [
            (a.alert_id, a.camera, a.kind, a.severity, a.message, a.created_at, a.file_id, a.event_id, a.score, a.state)
            for a in items
        ],
    )


def is_bad_row(exc: psycopg.Error) -> bool:
    """Only data (SQLSTATE class 22) and integrity (23) errors are about the row itself. Everything
    else - connection lost, read-only standby, missing privilege - is the database's state, and a
    batch must wait for it rather than be dead-lettered. psycopg raises DataError itself, with no
    SQLSTATE, for what it cannot even send (a NUL byte in a text value): a bad row too."""
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return state[:2] in ("22", "23")


async def write_gpu_samples(cur: psycopg.AsyncCursor, items: list[GpuSample]) -> None:
    """Downsampled to one row per GPU per minute: the first sample of each minute wins."""
    await cur.executemany(
        "INSERT INTO gpu_samples (host, gpu_index, minute, name, source, util_pct, mem_used_mb, mem_total_mb, temp_c, power_w,"
        " power_limit_w, sm_clock_mhz, mem_clock_mhz, throttle_reasons, processes) VALUES (%s, %s,"
        " date_trunc('minute', to_timestamp(%s)), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
        " ON CONFLICT (host, gpu_index, minute) DO NOTHING",
        [
            (
                g.host,
                g.index,
                g.sampled_at,
                g.name,
                g.source,
                g.util_pct,
                g.mem_used_mb,
                g.mem_total_mb,
                g.temp_c,
                g.power_w,
                g.power_limit_w,
                g.sm_clock_mhz,
                g.mem_clock_mhz,
                g.throttle_reasons,
                msgspec.json.encode(g.processes).decode(),
            )
            for g in items
        ],
    )


class SeenLetter(msgspec.Struct):
    """A dead letter with what the bus says about it: its DLQ sequence and the stage of its subject."""

    dlq_seq: int
    stage: str
    letter: DeadLetter
    file_size: int | None = None  # of the FileUploaded it was about (its mtime as on disk)
    file_mtime: float | None = None


def trusted_letter(msg: Msg, letter: DeadLetter) -> SeenLetter | str:
    """A letter as recorded, or why it is refused. Only the stage itself may publish under
    vigil.dlq.<stage>.* (services/runtime/nats_auth.py), so the subject says who wrote it: a letter claiming
    another stage (a detector posing as the watcher, say) is someone's forgery."""
    stage = dlq_subject_stage(msg.subject)
    if stage != letter.stage:
        return f"dead letter of stage {letter.stage!r} written under {msg.subject!r}"
    seen = SeenLetter(msg.metadata.sequence.stream, stage, letter)
    try:
        up = proto.decode(letter.original_payload.encode())
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        up = None
    if isinstance(up, FileUploaded):
        seen.file_size, seen.file_mtime = (
            up.size,
            up.camera_mtime if up.clock_suspect and up.camera_mtime is not None else up.mtime,
        )
    return seen


async def write_dead_letters(cur: psycopg.AsyncCursor, items: list[SeenLetter]) -> None:
    await cur.executemany(
        "INSERT INTO dead_letters (dlq_seq, stage, camera, path, file_id, reason, transient, original_stream, original_sequence,"
        " file_size, file_mtime, failed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s)) ON CONFLICT (dlq_seq) DO NOTHING",
        [
            (
                s.dlq_seq,
                s.stage,
                s.letter.camera,
                s.letter.path,
                s.letter.file_id,
                s.letter.reason,
                s.letter.transient,
                s.letter.original_stream,
                s.letter.original_sequence,
                s.file_size,
                s.file_mtime,
                s.letter.failed_at or 0.0,
            )
            for s in items
        ],
    )


Writer = Callable[[psycopg.AsyncCursor, list], Awaitable[None]]


class TableWriter:
    """One consumer -> one connection -> one table family."""

    def __init__(self, rt: Runtime, dsn: dict, durable: str, kind: type, write: Writer, trust=None) -> None:
        self.rt, self.dsn, self.durable, self.kind, self.write = rt, dsn, durable, kind, write
        # trust(msg, item) -> what to write, or why not (the dead-letter writer). Such a stream's refusals
        # are logged and termed, never dead-lettered again: a letter about a letter would loop.
        self.trust = trust
        self.conn: psycopg.AsyncConnection | None = None

    async def connection(self) -> psycopg.AsyncConnection:
        if self.conn is None or self.conn.closed:
            self.conn = await psycopg.AsyncConnection.connect(**self.dsn, connect_timeout=5)
        return self.conn

    async def commit(self, items: list) -> None:
        conn = await self.connection()
        async with conn.transaction(), conn.cursor() as cur:
            await self.write(cur, items)

    async def handle_batch(self, msgs: list[Msg]) -> None:
        batch: list[tuple[Msg, msgspec.Struct]] = []
        for msg in msgs:
            item = jetstream.decode_as(msg, self.kind)
            if not isinstance(item, str) and self.trust is not None:
                item = self.trust(msg, item)
            if isinstance(item, str) and self.trust is not None:
                self.rt.count("letters_refused")
                self.rt.log.warning("dead letter refused, not recorded", subject=msg.subject, reason=item[:300])
                await msg.term()
            elif isinstance(item, str):
                await self.rt.bus.dead_letter(STAGE, msg, item)
            else:
                batch.append((msg, item))
        if not batch:
            return
        delay = 0.5
        while True:
            try:
                await self.commit([item for _, item in batch])
                break
            except psycopg.Error as exc:
                if is_bad_row(exc):
                    await self._reset()
                    batch = await self._isolate(batch)
                    if not batch:
                        return
                    continue
                # The database is away, read-only after a failover, or refusing us: hold the batch,
                # keep it ours, and try again. Nothing is acked and nothing is dropped.
                self.rt.log.warning(
                    "database unavailable, holding batch",
                    consumer=self.durable,
                    held=len(batch),
                    error=str(exc).strip()[:200],
                )
                await self._reset()
                if self.rt.stopping.is_set():
                    await asyncio.gather(*(m.nak() for m, _ in batch), return_exceptions=True)
                    return
                self.rt.keepalive()
                await asyncio.gather(*(m.in_progress() for m, _ in batch), return_exceptions=True)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.rt.stopping.wait(), timeout=delay)
                delay = min(delay * 2, 5.0)
        # A lost ack only means a harmless redelivery (the writes are idempotent): never crash on it.
        await asyncio.gather(*(m.ack() for m, _ in batch), return_exceptions=True)
        self.rt.count(self.durable.removeprefix("recorder-"), len(batch))

    async def _isolate(self, batch):
        """A row was refused: write one at a time and dead-letter the ones the database rejects.
        Returns what is left to retry if the database went away meanwhile."""
        good = []
        try:
            for i, (msg, item) in enumerate(batch):
                try:
                    await self.commit([item])
                    good.append(msg)
                except psycopg.Error as exc:
                    if not is_bad_row(exc):
                        return batch[i:]  # the database itself is the problem: retry normally
                    await self._reset()
                    await self.rt.bus.dead_letter(
                        STAGE,
                        msg,
                        f"database rejected row: {str(exc).strip()[:300]}",
                        camera=getattr(item, "camera", None),
                        file_id=getattr(item, "file_id", None),
                    )
            return []
        finally:
            await asyncio.gather(*(m.ack() for m in good), return_exceptions=True)

    async def _reset(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
        self.conn = None

    async def close(self) -> None:
        await self._reset()


async def wait_for_database(rt: Runtime, dsn: dict) -> None:
    """Connect and migrate, retrying while PostgreSQL is not up yet."""
    delay = 0.5
    while not rt.stopping.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(**dsn, connect_timeout=5) as conn:
                await migrate(conn, rt.log)
            return
        except (psycopg.OperationalError, psycopg.errors.InsufficientPrivilege) as exc:
            # InsufficientPrivilege: our own role may not migrate; the owner (vigil-postgres at its start) does
            rt.log.warning("database not reachable or schema not current yet, retrying", error=str(exc).strip()[:200])
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(rt.stopping.wait(), timeout=delay)
            delay = min(delay * 2, 5.0)


async def run(config: Config) -> None:
    cfg = config.recorder
    async with Runtime.start("recorder", config) as rt:
        dsn = database.conninfo(config, "recorder")
        await wait_for_database(rt, dsn)
        writers = [
            TableWriter(rt, dsn, "recorder-detections", Detections, write_detections),
            TableWriter(rt, dsn, "recorder-events", EventClosed, write_events),
            TableWriter(rt, dsn, "recorder-alerts", Alert, write_alerts),
            TableWriter(rt, dsn, "recorder-analysis", EventAnalyzed, write_analyses),
            TableWriter(rt, dsn, "recorder-gpu", GpuSample, write_gpu_samples),
            TableWriter(rt, dsn, "recorder-dlq", DeadLetter, write_dead_letters, trust=trusted_letter),
        ]
        try:
            async with asyncio.TaskGroup() as tg:
                for w in writers:
                    tg.create_task(
                        rt.bus.consume(w.durable, w.handle_batch, cfg.batch_size, cfg.fetch_timeout, stage=STAGE)
                    )
                    tg.create_task(rt.bus.exhausted_loop(w.durable, STAGE))
        finally:
            for w in writers:
                await w.close()
