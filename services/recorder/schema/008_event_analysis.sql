-- The analyzer's judgement of each event (services/analyzer/): the latest revision wins. No foreign key
-- to events: the two arrive on different consumers, in either order. Retention deletes a row with its
-- event, and an orphan after events_days.
CREATE TABLE event_analysis (
    event_id text PRIMARY KEY,
    revision integer NOT NULL,
    camera text NOT NULL,
    risk_score smallint NOT NULL CHECK (risk_score BETWEEN 0 AND 100),
    risk_level text NOT NULL,
    summary text NOT NULL,
    factors jsonb NOT NULL,
    analyzer text NOT NULL,
    analyzer_version text NOT NULL,
    fallback boolean NOT NULL DEFAULT false,
    fallback_reason text,
    zones text[] NOT NULL DEFAULT '{}',
    analyzed_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_analysis_level ON event_analysis (risk_level, analyzed_at);
