-- GPU samples from gpu-stats, one row per GPU per minute (the stream keeps every sample for a day).
CREATE TABLE gpu_samples (
    host             text NOT NULL,
    gpu_index        integer NOT NULL,
    minute           timestamptz NOT NULL,
    name             text NOT NULL,
    source           text NOT NULL,
    util_pct         real,
    mem_used_mb      real,
    mem_total_mb     real,
    temp_c           real,
    power_w          real,
    power_limit_w    real,
    sm_clock_mhz     real,
    mem_clock_mhz    real,
    throttle_reasons text[] NOT NULL,
    processes        jsonb NOT NULL,   -- [{"pid": .., "used_mb": .., "unit": "vigil-detector@0.service"}]
    PRIMARY KEY (host, gpu_index, minute)
);
