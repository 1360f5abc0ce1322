-- Health alerts fire and later resolve (Alert.state); pipeline alerts are always 'firing'.
ALTER TABLE alerts ADD COLUMN state text NOT NULL DEFAULT 'firing';
CREATE INDEX alerts_created ON alerts (created_at);
