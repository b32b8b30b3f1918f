-- The evaluation cache: one evaluated host (or the fleet's host names), by a
-- key that is the SHA-256 of everything that determines the result: the
-- flake's locked identity (`locked` and `locks` of `nix flake metadata`), the
-- expression, the Nix version and the host (see the core's `eval` module).
-- A row is only ever written from an evaluation of exactly that identity,
-- and never updated in place (same key, same value). Times are Unix ms.
CREATE TABLE eval_cache (
    key        TEXT PRIMARY KEY,
    -- for people and pruning only: never part of a lookup
    flake      TEXT    NOT NULL,
    host       TEXT,
    -- JSON: the host's entry of the evaluation (toplevel, drvPath, deployment),
    -- or the list of host names
    value      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    used_at    INTEGER NOT NULL
);
CREATE INDEX eval_cache_by_use ON eval_cache (used_at);

-- What evaluating one host of a flake cost in memory, measured: the peak of
-- a `nix eval` process divided by its hosts. Sizes the next run's shards.
CREATE TABLE eval_memory (
    flake        TEXT PRIMARY KEY,
    host_kib     INTEGER NOT NULL,
    measured_at  INTEGER NOT NULL
);
