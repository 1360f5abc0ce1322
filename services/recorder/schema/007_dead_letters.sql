-- Dead letters as the recorder saw them on the bus (one row per DLQ message, keyed by its DLQ sequence).
-- `stage` is the stage named by the subject the letter was written under (vigil.dlq.<stage>.<camera>),
-- which only that stage's NATS user may publish to; a letter claiming another stage is refused. Retention
-- trusts these rows, never the DLQ stream itself, to decide that the pipeline is finished with a file.
CREATE TABLE dead_letters (
    dlq_seq bigint PRIMARY KEY,
    stage text NOT NULL,
    camera text,
    path text,
    file_id text,
    reason text NOT NULL,
    transient boolean NOT NULL,
    original_stream text,
    original_sequence bigint,
    -- the file as the letter's FileUploaded saw it: retention takes the letter only for that very file
    file_size bigint,
    file_mtime double precision,
    failed_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_path ON dead_letters (path) WHERE path IS NOT NULL;
CREATE INDEX dead_letters_failed_at ON dead_letters (failed_at);
