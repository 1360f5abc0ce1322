-- vigil schema v1. Every write is idempotent: primary keys are the message ids.
CREATE TABLE detections (
    file_id      text PRIMARY KEY,
    camera       text NOT NULL,
    path         text NOT NULL,
    captured_at  timestamptz NOT NULL,
    published_at timestamptz,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    width        integer NOT NULL,
    height       integer NOT NULL,
    model        text NOT NULL,
    inference_ms real NOT NULL,
    box_count    integer NOT NULL,
    labels       text[] NOT NULL,
    boxes        jsonb NOT NULL   -- [[label, score, x1, y1, x2, y2], ...] in source-image pixels
);
CREATE INDEX detections_camera_time ON detections (camera, captured_at);
CREATE INDEX detections_labels ON detections USING gin (labels);

CREATE TABLE events (
    event_id        text PRIMARY KEY,
    camera          text NOT NULL,
    started_at      timestamptz NOT NULL,
    ended_at        timestamptz NOT NULL,
    detection_count integer NOT NULL,
    labels          jsonb NOT NULL,   -- {"person": {"count": 3, "max_score": 0.93}, ...}
    best_file_id    text NOT NULL,
    close_reason    text NOT NULL,
    keep            boolean NOT NULL DEFAULT false,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX events_camera_time ON events (camera, started_at);

-- A detection belongs to at most one event: file_id is the key.
CREATE TABLE event_detections (
    file_id  text PRIMARY KEY,
    event_id text NOT NULL REFERENCES events (event_id) ON DELETE CASCADE
);
CREATE INDEX event_detections_event ON event_detections (event_id);

CREATE TABLE alerts (
    alert_id    text PRIMARY KEY,
    camera      text NOT NULL,
    kind        text NOT NULL,
    severity    text NOT NULL,
    message     text NOT NULL,
    created_at  timestamptz NOT NULL,
    file_id     text,
    event_id    text,
    score       real,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
