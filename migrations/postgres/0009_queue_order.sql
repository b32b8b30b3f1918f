-- Queued deployments start first come, first served per host, and a newer
-- push of the same branch supersedes the older ones still queued.
--   source: where a pushed deployment comes from (`github:main`), with the
--           commit it deploys in `flake_rev`;
--   waiting_for: JSON list of the hosts a queued deployment waits for
--           (NULL while it is still being validated);
--   superseded_by: why a queued deployment will never start.
ALTER TABLE deployments ADD COLUMN source TEXT;
ALTER TABLE deployments ADD COLUMN waiting_for TEXT;
ALTER TABLE deployments ADD COLUMN superseded_by TEXT;
CREATE INDEX deployments_by_status ON deployments (status, id);
