-- Step durations kept as a histogram as they happen, so /metrics reads a
-- few rows instead of decoding every host run's steps on each scrape.
-- Buckets (seconds): 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, +Inf (index 0..9).
CREATE TABLE step_stats (
    step  TEXT    NOT NULL,
    -- the bucket's index; count is of durations in this bucket only
    bucket INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (step, bucket)
);
CREATE TABLE step_totals (
    step  TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    sum   REAL    NOT NULL
);

-- What the history holds already.
CREATE TEMP TABLE step_seen AS
    SELECT json_extract(j.value, '$.step') AS step,
           MAX(0, json_extract(j.value, '$.finished_at') - json_extract(j.value, '$.started_at')) / 1000.0 AS d
    FROM host_runs, json_each(host_runs.steps) AS j
    WHERE json_extract(j.value, '$.finished_at') IS NOT NULL;
INSERT INTO step_totals (step, count, sum)
    SELECT step, COUNT(*), SUM(d) FROM step_seen GROUP BY step;
INSERT INTO step_stats (step, bucket, count)
    SELECT step,
           CASE WHEN d <= 0.1 THEN 0 WHEN d <= 0.5 THEN 1 WHEN d <= 1 THEN 2 WHEN d <= 5 THEN 3
                WHEN d <= 10 THEN 4 WHEN d <= 30 THEN 5 WHEN d <= 60 THEN 6 WHEN d <= 300 THEN 7
                WHEN d <= 600 THEN 8 ELSE 9 END AS bucket,
           COUNT(*)
    FROM step_seen GROUP BY step, bucket;
DROP TABLE step_seen;
