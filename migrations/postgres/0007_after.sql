-- Per host run: what the host ran and booted when its part ended, read from
-- the host itself (JSON: running, boot_generation, boot).
ALTER TABLE host_runs ADD COLUMN after TEXT;
