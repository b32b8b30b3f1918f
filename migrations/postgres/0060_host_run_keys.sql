-- Per host run: what its way back did to the host's keys (JSON: restored,
-- removed, uploaded_again, failed, left), or NULL when it did nothing to them.
ALTER TABLE host_runs ADD COLUMN key_changes TEXT;
