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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CachedEvaluation, NewDeployment};
    use nix_deploy_core::events::{DeploymentStatus, HostStatus};
    use nix_deploy_core::options::DeployOptions;

    #[tokio::test]
    async fn a_hosts_history_says_who_and_the_newest_evaluation_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        for (who, status) in [
            ("token:ci", HostStatus::Deployed),
            ("slack:ann", HostStatus::Skipped),
            ("slack:bob", HostStatus::RolledBack),
        ] {
            let id = store
                .create_deployment(&NewDeployment {
                    trigger: "api".into(),
                    requested_by: who.into(),
                    flake: ".".into(),
                    flake_rev: None,
                    strategy: "smart".into(),
                    options: DeployOptions::default(),
                    hosts: vec!["a".into()],
                    queued: false,
                })
                .await
                .unwrap();
            let mut run = HostRun::new(id, "a");
            run.status = status;
            run.time.started_at = Some(id * 1000);
            store.save_host_run(&run).await.unwrap();
            store
                .finish_deployment(id, DeploymentStatus::Succeeded, None)
                .await
                .unwrap();
        }
        let history = store.host_history("a", 10).await.unwrap();
        let who: Vec<&str> = history.iter().map(|e| e.requested_by.as_str()).collect();
        // Newest first; the skipped run left out.
        assert_eq!(who, ["slack:bob", "token:ci"]);
        assert_eq!(history[0].run.status, HostStatus::RolledBack);
        assert_eq!(store.host_history("a", 1).await.unwrap().len(), 1);
        assert!(store.host_history("b", 10).await.unwrap().is_empty());

        let entry = |key: &str, host: &str| CachedEvaluation {
            key: key.into(),
            host: Some(host.into()),
            value: format!("\"{key}\""),
        };
        store
            .cache_evaluations(".", &[entry("old", "a"), entry("b1", "b")])
            .await
            .unwrap();
        sqlx::query("UPDATE eval_cache SET created_at = created_at - 1000 WHERE key = 'old'")
            .execute(store.pool())
            .await
            .unwrap();
        store
            .cache_evaluations(".", &[entry("new", "a")])
            .await
            .unwrap();
        let latest = store.latest_evaluations().await.unwrap();
        let found: Vec<(&str, &str)> = latest
            .iter()
            .map(|e| (e.host.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(found, [("a", "\"new\""), ("b", "\"b1\"")]);
    }
}
