-- Issue 17: event snapshots (written by the analyzer, named in its analysis), review state and notes
-- (the web UI), the operators' audit trail, the web UI's login sessions.
ALTER TABLE event_analysis
    ADD COLUMN snapshot text,        -- relative to <state_dir>/snapshots
    ADD COLUMN thumbnail text,
    ADD COLUMN snapshot_error text;  -- why there is none (the best frame could not be read)

ALTER TABLE events
    ADD COLUMN reviewed boolean NOT NULL DEFAULT false,
    ADD COLUMN reviewed_at timestamptz,
    ADD COLUMN notes text NOT NULL DEFAULT '';
CREATE INDEX events_started_at ON events (started_at DESC, event_id DESC);
CREATE INDEX events_unreviewed ON events (started_at DESC) WHERE NOT reviewed;

-- Every operator action, from the web UI or the CLI: who, when, through what, what, on what, how it went.
CREATE TABLE audit_log (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor   text NOT NULL,      -- the web user, or "cli:<unix user>"
    via     text NOT NULL,      -- "web" | "cli" | "api"
    action  text NOT NULL,      -- login, login_failed, start, stop, restart, retry, purge, keep, reviewed, notes, upload
    target  text,               -- a service, an event id, a dead letter's sequence, a camera
    result  text NOT NULL,      -- "ok" or what went wrong
    remote  text                -- the peer's address, for the web
);
CREATE INDEX audit_log_at ON audit_log (at DESC);
CREATE INDEX audit_log_target ON audit_log (target, at DESC);

-- Server-side sessions: the cookie holds a random token, the table only its SHA-256.
CREATE TABLE web_sessions (
    token_hash bytea PRIMARY KEY,
    username   text NOT NULL,
    csrf       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
