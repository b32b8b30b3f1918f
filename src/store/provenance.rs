//! Where what a host runs came from, and what a waiting deployment waits
//! for: the last successful deployment of a host (a promotion's source
//! must still run what it put there), and the next opening of the window a
//! deployment waits for (shown with the deployment).

use sqlx::Row;

use nix_deploy_core::events::EventKind;
use nix_deploy_core::run::WindowWait;

use super::{Store, StoreError, query_error};

impl Store {
    /// The system the last successful deployment of `host` put there, and
    /// which deployment that was (runs of other kinds, and host runs that
    /// did not end deployed, do not count).
    pub async fn last_deployed_system(
        &self,
        host: &str,
    ) -> Result<Option<(i64, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT r.deployment_id, r.new_path FROM host_runs r
               JOIN deployments d ON d.id = r.deployment_id
             WHERE r.host = $1 AND r.status = 'deployed' AND d.kind = 'deploy'
               AND r.new_path IS NOT NULL
             ORDER BY COALESCE(r.finished_at, 0) DESC, r.deployment_id DESC
             LIMIT 1",
        )
        .bind(host)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("reading a host's last deployment"))?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// What deployment `id` last said it waits for (its latest
    /// `waiting-for-window` event).
    pub async fn window_wait(&self, id: i64) -> Result<Option<WindowWait>, StoreError> {
        let row = sqlx::query(
            "SELECT data FROM events WHERE deployment_id = $1 AND kind = 'waiting-for-window'
             ORDER BY id DESC LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("reading what a deployment waits for"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let data: String = row.get(0);
        let kind: EventKind = serde_json::from_str(&data).map_err(|source| StoreError::Json {
            context: "events.data",
            source,
        })?;
        Ok(match kind {
            EventKind::WaitingForWindow {
                hosts,
                reason,
                until,
            } => Some(WindowWait {
                hosts,
                reason,
                opens_at: until,
            }),
            _ => None,
        })
    }
}
