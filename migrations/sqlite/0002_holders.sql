-- Liveness that cannot be mistaken: every coordinator process holds an
-- exclusive flock on `locks/<holder>.lock` in the state directory for as long
-- as it lives. Deployments and leases name their holder; a holder whose lock
-- can be taken is dead, whatever became of its pid.
ALTER TABLE deployments ADD COLUMN holder TEXT;
ALTER TABLE leases ADD COLUMN holder TEXT;
