-- Operating the fleet with other people (windows, approvals, chat, audit).
-- Times are Unix milliseconds.

-- The audit trail: append-only, each entry chained to the one before by
-- its hash (see the core's `audit` module). Ids are assigned from
-- `audit_head` in the appending transaction, never reused.
CREATE TABLE audit_log (
    id        BIGINT PRIMARY KEY,
    at        BIGINT NOT NULL,
    actor     TEXT   NOT NULL,
    origin    TEXT   NOT NULL,
    action    TEXT   NOT NULL,
    target    TEXT   NOT NULL,
    -- JSON
    detail    TEXT   NOT NULL,
    prev_hash TEXT   NOT NULL,
    hash      TEXT   NOT NULL
);
CREATE INDEX audit_log_by_time ON audit_log (at);

-- The newest entry, kept apart: one row, so that cutting off the end of
-- the chain shows too.
CREATE TABLE audit_head (
    one     BIGINT PRIMARY KEY,
    last_id BIGINT NOT NULL,
    hash    TEXT   NOT NULL
);
INSERT INTO audit_head (one, last_id, hash)
    VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Approval gates and pauses of a deployment, and who approved them.
CREATE TABLE gates (
    deployment_id BIGINT NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
    number        BIGINT NOT NULL,
    -- approval | pause
    kind          TEXT   NOT NULL,
    title         TEXT   NOT NULL,
    -- JSON: the held hosts
    hosts         TEXT   NOT NULL,
    -- JSON: each held host's tags (who may decide is checked against them)
    host_tags     TEXT   NOT NULL,
    -- JSON: what each matching rule needs
    requirements  TEXT   NOT NULL,
    -- open | approved | rejected | expired | closed
    state         TEXT   NOT NULL,
    opened_at     BIGINT NOT NULL,
    deadline      BIGINT,
    decided_by    TEXT,
    decided_at    BIGINT,
    reason        TEXT,
    -- what an approver is shown
    summary       TEXT   NOT NULL,
    PRIMARY KEY (deployment_id, number)
);

CREATE TABLE approvals (
    deployment_id BIGINT NOT NULL,
    number        BIGINT NOT NULL,
    by_identity   TEXT   NOT NULL,
    at            BIGINT NOT NULL,
    via           TEXT   NOT NULL,
    comment       TEXT,
    seen          TEXT   NOT NULL,
    PRIMARY KEY (deployment_id, number, by_identity),
    FOREIGN KEY (deployment_id, number) REFERENCES gates (deployment_id, number) ON DELETE CASCADE
);

-- Chat deployments waiting for their requester's Confirm button.
CREATE TABLE chat_requests (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    requester     TEXT   NOT NULL,
    channel       TEXT   NOT NULL,
    -- JSON: the request, its hosts pinned to the plan that was shown
    request       TEXT   NOT NULL,
    -- pending | confirmed | cancelled
    state         TEXT   NOT NULL,
    deployment_id BIGINT,
    response_url  TEXT
);

-- When each `[[schedule]]` last started a deployment.
CREATE TABLE schedule_runs (
    name          TEXT   PRIMARY KEY,
    last_run_at   BIGINT NOT NULL,
    deployment_id BIGINT
);
