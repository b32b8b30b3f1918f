-- Deployments, per-host runs, ordered events and the last known state of each host.
-- Times are Unix milliseconds.

CREATE TABLE deployments (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    -- running | succeeded | failed | cancelled | interrupted
    status       TEXT    NOT NULL,
    -- cli | api | slack | github
    trigger      TEXT    NOT NULL,
    requested_by TEXT    NOT NULL,
    flake        TEXT    NOT NULL,
    flake_rev    TEXT,
    strategy     TEXT    NOT NULL,
    -- JSON: the request's options
    options      TEXT    NOT NULL,
    -- JSON: host names selected
    hosts        TEXT    NOT NULL,
    -- JSON: the plan as shown to the operator
    plan         TEXT,
    error        TEXT,
    -- the coordinator process that runs it, to tell a live run from a dead one
    pid          INTEGER
);

CREATE TABLE host_runs (
    deployment_id  INTEGER NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
    host           TEXT    NOT NULL,
    -- pending | running | skipped | deployed | failed | rolled-back | rollback-failed | unreachable | cancelled
    status         TEXT    NOT NULL,
    step           TEXT,
    changed        INTEGER,
    old_path       TEXT,
    old_generation INTEGER,
    new_path       TEXT,
    new_generation INTEGER,
    started_at     INTEGER,
    finished_at    INTEGER,
    -- JSON: [{"step", "started_at", "finished_at", "ok"}]
    steps          TEXT    NOT NULL DEFAULT '[]',
    reason         TEXT,
    error          TEXT,
    -- JSON: what differs between the running and the new system
    summary        TEXT,
    -- names the activation's files on the host (/run/nix-deploy/<token>.*)
    token          TEXT,
    PRIMARY KEY (deployment_id, host)
);

CREATE TABLE events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment_id INTEGER NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
    at            INTEGER NOT NULL,
    host          TEXT,
    kind          TEXT    NOT NULL,
    -- JSON: the whole event
    data          TEXT    NOT NULL
);
CREATE INDEX events_by_deployment ON events (deployment_id, id);

CREATE TABLE hosts (
    name               TEXT PRIMARY KEY,
    current_path       TEXT,
    generation         INTEGER,
    probed_at          INTEGER,
    probe_error        TEXT,
    last_deployment_id INTEGER,
    last_status        TEXT,
    last_error         TEXT,
    last_finished_at   INTEGER
);

CREATE INDEX host_runs_by_host ON host_runs (host, finished_at);

-- One deployment at a time per host: a lease with an owner and an expiry,
-- renewed while the owner works. An expired lease, or one whose owner process
-- is gone, can be taken over.
CREATE TABLE leases (
    host          TEXT PRIMARY KEY,
    owner         TEXT    NOT NULL,
    deployment_id INTEGER,
    pid           INTEGER NOT NULL,
    acquired_at   INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL
);

-- Set by `nix-deploy cancel` (or the API); the running engine polls it.
ALTER TABLE deployments ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
