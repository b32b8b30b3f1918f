-- Step durations kept as a histogram as they happen, so /metrics reads a
-- few rows instead of decoding every host run's steps on each scrape.
-- Buckets (seconds): 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, +Inf (index 0..9).
CREATE TABLE step_stats (
    step  TEXT    NOT NULL,
    -- the bucket's index; count is of durations in this bucket only
    bucket BIGINT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (step, bucket)
);
CREATE TABLE step_totals (
    step  TEXT PRIMARY KEY,
    count BIGINT NOT NULL,
    sum   DOUBLE PRECISION    NOT NULL
);

-- (The SQLite twin fills these from the history it already holds; a
-- PostgreSQL history starts with this schema, empty.)
