-- A daemon stopping while other daemons take deployments over hands its
-- deployments over to them: it says so in its row (`stopping`: it takes
-- nothing over any more), and counts the deployments it handed over.
ALTER TABLE coordinators ADD COLUMN stopping BIGINT NOT NULL DEFAULT 0;
ALTER TABLE coordinators ADD COLUMN handed_over BIGINT NOT NULL DEFAULT 0;
