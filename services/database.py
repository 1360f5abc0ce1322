"""PostgreSQL roles: one per service that uses the database, with only the rights its work needs.

The owner role (`vigil`, credential `db-password`) owns the schema and migrates it; the CLI uses it.
With `[database] per_service_roles = true` (what the installer writes) each service logs in as its own
role with its own credential instead, so code run inside one service cannot do what its work does not
need: the recorder cannot delete, retention cannot write rows, health can only read.
`vigil-postgres` (the bundled server's unit) migrates and sets these roles up at every start.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from services.runtime.config import Config, credential

# what the pipeline records (the recorder writes these, health reads them)
TABLES = ("detections", "events", "event_detections", "alerts", "gpu_samples", "dead_letters", "event_analysis")
# what the web UI reads (never the sessions of others through a SELECT *: it owns that table's rows)
WEB_READS = ("detections", "events", "event_detections", "alerts", "dead_letters", "event_analysis", "audit_log")

# service -> (privileges, tables) grants; every role also reads schema_migrations (to know the schema is current)
GRANTS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    # every write is ON CONFLICT DO NOTHING but an event's new revision: UPDATE on those columns alone
    # (never `keep`, which would let it expose evidence to retention)
    "recorder": [
        ("SELECT, INSERT", TABLES),
        ("UPDATE (started_at, ended_at, detection_count, labels, best_file_id, close_reason, revision)", ("events",)),
        (
            "UPDATE (revision, risk_score, risk_level, summary, factors, analyzer, analyzer_version, fallback,"
            " fallback_reason, zones, analyzed_at, snapshot, thumbnail, snapshot_error)",
            ("event_analysis",),
        ),
    ],
    # the web UI marks, keeps and annotates events and writes the audit trail; it deletes nothing but sessions
    "web": [
        ("SELECT", WEB_READS),
        ("UPDATE (reviewed, reviewed_at, notes, keep)", ("events",)),
        ("INSERT", ("audit_log",)),
        ("SELECT, INSERT, DELETE", ("web_sessions",)),
        ("USAGE", ("audit_log_id_seq",)),
    ],
    "retention": [
        ("SELECT, DELETE", (*TABLES, "audit_log", "web_sessions")),  # the audit trail's age, expired sessions
        ("UPDATE (missing_since)", ("detections",)),
        ("UPDATE (snapshot, thumbnail, snapshot_error)", ("event_analysis",)),  # the snapshot quota
    ],
    "health": [("SELECT", TABLES)],
}


def role_name(service: str) -> str:
    return f"vigil_{service.replace('-', '_')}"


def credential_name(service: str) -> str:
    return f"db-{service}"


def setup_roles(conn: psycopg.Connection, passwords: dict[str, str | None]) -> list[str]:
    """Create or update every service role (as the owner, after migrating): LOGIN, its password when one
    is given (none: it can log in only where pg_hba trusts), exactly its grants. Returns the role names."""
    (db,) = conn.execute("SELECT current_database()").fetchone() or ("",)
    made = []
    with conn.transaction():
        # PostgreSQL before 15 lets every role create tables in public: only the owner may change the schema
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        for service, grants in GRANTS.items():
            role = sql.Identifier(role_name(service))
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role_name(service),)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE").format(role))
            password = passwords.get(service)
            conn.execute(
                sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(password) if password else sql.NULL)
            )
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(db), role))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role))
            conn.execute(sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {}").format(role))
            conn.execute(sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {}").format(role))
            conn.execute(sql.SQL("GRANT SELECT ON schema_migrations TO {}").format(role))
            for privileges, tables in grants:
                kind = "SEQUENCE " if all(t.endswith("_seq") for t in tables) else ""
                conn.execute(
                    sql.SQL("GRANT " + privileges + " ON " + kind + "{} TO {}").format(
                        sql.SQL(", ").join(map(sql.Identifier, tables)), role
                    )
                )
            made.append(role_name(service))
    return made


def conninfo(config: Config, service: str | None = None) -> dict[str, Any]:
    """psycopg connect() arguments: the DSN plus the credential's password, if systemd gave one. With
    per_service_roles, `service` logs in as its own role with its own credential."""
    if service is not None and config.database.per_service_roles:
        password = credential(credential_name(service))
        return {
            "conninfo": config.database.dsn,
            "user": role_name(service),
            **({"password": password} if password else {}),
        }
    password = credential(config.database.password_credential)
    return {"conninfo": config.database.dsn, **({"password": password} if password else {})}


def connect(
    config: Config, service: str | None = None, timeout: int = 5, autocommit: bool = False
) -> psycopg.Connection:
    """PostgreSQL as `service` (its own role where [database] per_service_roles; the owner for the CLI and
    tests), failing within `timeout` seconds when the server is away."""
    return psycopg.connect(**conninfo(config, service), connect_timeout=timeout, autocommit=autocommit)
