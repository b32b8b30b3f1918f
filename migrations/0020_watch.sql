-- The daemon's watch: each host's last observed state (drift kinds with
-- their times, health, last sight) as the core's `HostWatch` document, kept
-- across restarts. A row changes when its host's state changes (and its
-- last sight is flushed every few minutes): the history grows with events,
-- not with probes. Times are Unix milliseconds.
CREATE TABLE watch_hosts (
    name                TEXT PRIMARY KEY,
    -- JSON: the host's HostWatch
    state               TEXT   NOT NULL,
    -- 1 while an `unreachable` alert stands for the host's current outage
    unreachable_alerted BIGINT NOT NULL DEFAULT 0,
    updated_at          BIGINT NOT NULL
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
-- raised them, marked sent once delivered (or given up on). One alert per
-- change, also across restarts: an unsent one is sent after a restart.
CREATE TABLE watch_alerts (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at BIGINT NOT NULL,
    -- NULL for the fleet's own alerts (its evaluation)
    host       TEXT,
    -- JSON: the Alert (without its id)
    data       TEXT   NOT NULL,
    sent_at    BIGINT
);
CREATE INDEX watch_alerts_by_sent ON watch_alerts (sent_at, id);
CREATE INDEX watch_alerts_by_host ON watch_alerts (host, id);
