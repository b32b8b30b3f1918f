-- Replays of signed hooks are refused: every delivery (a GitHub delivery id,
-- a Slack timestamp and signature) is remembered, and the last push deployed
-- from each branch, so an older one is never deployed over a newer one.
CREATE TABLE hook_deliveries (
    source      TEXT    NOT NULL,
    delivery    TEXT    NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (source, delivery)
);

CREATE TABLE branch_heads (
    branch       TEXT PRIMARY KEY,
    commit_id    TEXT    NOT NULL,
    -- the pushed head commit's time, Unix seconds
    committed_at BIGINT NOT NULL
);

-- A deployment recorded at once and waiting (queued) starts later than it
-- was requested.
ALTER TABLE deployments ADD COLUMN started_at BIGINT;
