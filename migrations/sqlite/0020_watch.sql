-- The daemon's watch: each host's last observed state (drift kinds with
-- their times, health, last sight) as the core's `HostWatch` document, kept
-- across restarts and leader changes. A row changes when its host's state
-- changes (and its last sight is flushed every minute): the history grows
-- with events, not with probes. Only the elected leader writes these
-- tables (each write checks its term). Times are Unix milliseconds.
CREATE TABLE watch_hosts (
    name                TEXT PRIMARY KEY,
    -- JSON: the host's HostWatch
    state               TEXT   NOT NULL,
    -- 1 while an `unreachable` alert stands for the host's current outage
    unreachable_alerted BIGINT NOT NULL DEFAULT 0,
    updated_at          BIGINT NOT NULL
);

-- The fleet-wide part of the watch's view (the flake and revision it
-- compares with, the last evaluation and its error, pull mode's branch),
-- and which coordinator watches: followers answer from it. One row.
CREATE TABLE watch_fleet (
    one        BIGINT PRIMARY KEY,
    -- JSON: the FleetReport without its hosts
    data       TEXT   NOT NULL,
    watched_by TEXT   NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Changes of a host's drift, in order: `GET /api/v1/fleet/events` replays
-- them after a `Last-Event-ID`. Pruned to the newest ones.
CREATE TABLE watch_events (
    id   INTEGER PRIMARY KEY AUTOINCREMENT,
    at   BIGINT NOT NULL,
    host TEXT   NOT NULL,
    -- JSON: the FleetEvent (without its id)
    data TEXT   NOT NULL
);

-- Alerts to send (e-mail, Slack, webhooks): written with the change that
-- raised them, claimed by one coordinator (compare-and-swap) before it
-- sends them, marked sent once delivered (or given up on). One alert per
-- change, also across restarts and leader changes.
CREATE TABLE watch_alerts (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at BIGINT NOT NULL,
    -- NULL for the fleet's own alerts (its evaluation)
    host       TEXT,
    -- JSON: the Alert (without its id)
    data       TEXT   NOT NULL,
    -- the coordinator sending it; another may claim it once that one's
    -- heartbeat is older than the lease TTL
    claimed_by TEXT,
    claimed_at BIGINT,
    sent_at    BIGINT
);
CREATE INDEX watch_alerts_by_sent ON watch_alerts (sent_at, id);
CREATE INDEX watch_alerts_by_host ON watch_alerts (host, id);
