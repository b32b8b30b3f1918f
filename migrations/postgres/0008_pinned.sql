-- What a deployment deploys, fixed when it starts (JSON: the pinned flake
-- reference, its revision, each host's planned toplevel): `resume` deploys
-- exactly that.
ALTER TABLE deployments ADD COLUMN pinned TEXT;
