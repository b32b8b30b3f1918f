-- Runs that are not deployments share the history: `exec` (a command on many
-- hosts) and `upload-keys`. Rows from before are deployments.
ALTER TABLE deployments ADD COLUMN kind TEXT NOT NULL DEFAULT 'deploy';
-- JSON: an exec's command, timeout and parallel limit.
ALTER TABLE deployments ADD COLUMN exec TEXT;

-- Per host run: the deployment's goal (switch, boot, test, dry-activate),
-- a command's exit code and output tails (JSON), a reboot's boot ids (JSON).
ALTER TABLE host_runs ADD COLUMN goal TEXT;
ALTER TABLE host_runs ADD COLUMN output TEXT;
ALTER TABLE host_runs ADD COLUMN reboot TEXT;

-- The system a host boots next (its profile's target): a host whose boot
-- default is not what it runs is pending a reboot.
ALTER TABLE hosts ADD COLUMN boot_path TEXT;
