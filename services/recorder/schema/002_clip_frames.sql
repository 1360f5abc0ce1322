-- Clips give one detection per sampled frame: the key becomes detection_id (file_id, or file_id:frame).
ALTER TABLE detections ADD COLUMN detection_id text;
UPDATE detections SET detection_id = file_id;
ALTER TABLE detections ALTER COLUMN detection_id SET NOT NULL;
ALTER TABLE detections DROP CONSTRAINT detections_pkey;
ALTER TABLE detections ADD PRIMARY KEY (detection_id);
ALTER TABLE detections ADD COLUMN frame integer, ADD COLUMN offset_s real NOT NULL DEFAULT 0;
CREATE INDEX detections_file ON detections (file_id);
ALTER TABLE event_detections RENAME COLUMN file_id TO detection_id;
