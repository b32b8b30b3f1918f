//! Reads for the web dashboard: a host's history with who asked for each
//! run, and the latest evaluation of every host the history knows (its tags,
//! role and desired system for the fleet view). Read only; nothing here is
//! written.

use sqlx::Row;

use nix_deploy_core::run::HostRun;

use super::{Store, StoreError, query_error};

/// One run of a host, with the deployment that made it.
#[derive(Clone, Debug)]
pub struct HostHistoryEntry {
    pub run: HostRun,
    /// `token:NAME`, `slack:USER`, `user@machine`, …
    pub requested_by: String,
    /// `cli`, `api`, `web`, `slack`, `github`.
    pub trigger: String,
    /// The strategy, or `rollback` for a rollback on request.
    pub strategy: String,
}

/// The newest cached evaluation of one host: the core's JSON of the host
/// (toplevel, `deployment`), and when it was evaluated.
#[derive(Clone, Debug)]
pub struct LatestEvaluation {
    pub host: String,
    pub value: String,
    pub evaluated_at: i64,
}

impl Store {
    /// A host's deployment runs (rollbacks on request included, skipped runs
    /// left out), newest first.
    pub async fn host_history(
        &self,
        host: &str,
        limit: i64,
    ) -> Result<Vec<HostHistoryEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT r.*, d.requested_by AS d_requested_by, d.trigger AS d_trigger,
                    d.strategy AS d_strategy
             FROM host_runs r JOIN deployments d ON d.id = r.deployment_id
             WHERE r.host = $1 AND d.kind = 'deploy' AND r.status <> 'skipped'
             ORDER BY COALESCE(r.started_at, d.created_at) DESC, r.deployment_id DESC
             LIMIT $2",
        )
        .bind(host)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading a host's history"))?;
        let runs = Self::host_runs_from_rows(&rows)?;
        Ok(runs
            .into_iter()
            .zip(&rows)
            .map(|(run, row)| HostHistoryEntry {
                run,
                requested_by: row.get("d_requested_by"),
                trigger: row.get("d_trigger"),
                strategy: row.get("d_strategy"),
            })
            .collect())
    }

    /// Every host's newest entry in the evaluation cache, by name: what the
    /// flake last evaluated it to, whichever command evaluated it.
    pub async fn latest_evaluations(&self) -> Result<Vec<LatestEvaluation>, StoreError> {
        let rows = sqlx::query(
            "SELECT host, value, created_at FROM (
                 SELECT host, value, created_at,
                        ROW_NUMBER() OVER (PARTITION BY host ORDER BY created_at DESC, key) AS n
                 FROM eval_cache WHERE host IS NOT NULL
             ) newest
             WHERE n = 1 ORDER BY host",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading the latest evaluations"))?;
        Ok(rows
            .iter()
            .map(|row| LatestEvaluation {
                host: row.get("host"),
                value: row.get("value"),
                evaluated_at: row.get("created_at"),
            })
            .collect())
    }
}
