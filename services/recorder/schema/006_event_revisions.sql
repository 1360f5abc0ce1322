-- Events are published again with a higher revision when a late detection joins them or a quiet event
-- goes on (services/events.py); the row keeps the latest revision. Detections with a camera clock that
-- could not be trusted carry clock_suspect (captured_at is then the arrival time).
ALTER TABLE events ADD COLUMN revision integer NOT NULL DEFAULT 1;
ALTER TABLE detections ADD COLUMN clock_suspect boolean NOT NULL DEFAULT false;
-- The size and mtime of the file the detector read: retention deletes a file only if it is that file
-- (a new upload at a reused path is still pending).
ALTER TABLE detections ADD COLUMN file_size bigint, ADD COLUMN file_mtime double precision;
