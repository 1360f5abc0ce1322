-- Retention: rows whose media file vanished are marked, then deleted after a grace period (or
-- unmarked when the file comes back); deletions look rows up by path.
ALTER TABLE detections ADD COLUMN missing_since timestamptz;
CREATE INDEX detections_path ON detections (path);
CREATE INDEX detections_missing ON detections (missing_since) WHERE missing_since IS NOT NULL;
CREATE INDEX detections_captured ON detections (captured_at);
CREATE INDEX events_keep ON events (event_id) WHERE keep;
CREATE INDEX gpu_samples_minute ON gpu_samples (minute);
