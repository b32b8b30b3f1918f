//! Which systems nix-deploy deployed to a host: what colmena's
//! `deployment.replaceUnknownProfiles = false` asks about before a host's
//! running system is replaced.

use super::{Store, StoreError, query_error};

impl Store {
    /// Whether a deployment of nix-deploy (recorded here) ever made `host`
    /// run `path`.
    pub async fn deployed_before(&self, host: &str, path: &str) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT 1 FROM host_runs WHERE host = $1 AND new_path = $2 \
             AND status = 'deployed' LIMIT 1",
        )
        .bind(host)
        .bind(path)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("reading the systems deployed to a host"))?;
        Ok(row.is_some())
    }
}
