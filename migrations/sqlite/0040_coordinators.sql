-- Several coordinators on one history: the database's clock, deployment
-- leases with epochs, host leases with epochs, the coordinators and their
-- elected leader. Times are Unix milliseconds of the database's clock.

-- The database's clock. Leases are computed by it, never by a coordinator's
-- own clock; queries read `(SELECT now_ms FROM db_clock)`, the same text on
-- every backend (each defines the view in its own dialect).
CREATE VIEW db_clock AS
    SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) AS now_ms;

-- A deployment's lease: `holder` (the coordinator running it) holds it at
-- `epoch`, raised by every taking (creation, resume, takeover); every write
-- of the deployment's state is conditional on it. It expires at
-- `lease_expires_at` unless its holder's heartbeat renews it.
ALTER TABLE deployments ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deployments ADD COLUMN lease_expires_at INTEGER;

-- A host lease serves its deployment at one epoch.
ALTER TABLE leases ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;

-- Every coordinator process (daemon or CLI) using this history, with its
-- heartbeat.
CREATE TABLE coordinators (
    id           TEXT PRIMARY KEY,
    -- daemon | cli
    kind         TEXT    NOT NULL,
    hostname     TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    version      TEXT    NOT NULL,
    -- 1: takes over deployments whose holder's lease expired
    takeover     INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);

-- The elected leader (one row per election name), written only by the
-- election's three queries (elect, reelect, resign).
CREATE TABLE leader (
    name       TEXT PRIMARY KEY,
    leader_id  TEXT    NOT NULL,
    elected_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
