//! Deployments: created when a request is valid, finished with their
//! status, cancelled on request, marked interrupted when their coordinator
//! died.

use serde::Serialize;
use sqlx::Row;

use nix_deploy_core::events::{DeploymentStatus, EventKind};
use nix_deploy_core::exec::ExecSpec;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::plan::Plan;
use nix_deploy_core::run::{Deployment, Pinned, RunKind, Span};

use super::{Store, StoreError, query_error, to_json};
use crate::now_ms;

/// A new deployment, as requested.
#[derive(Clone, Debug, Serialize)]
pub struct NewDeployment {
    pub trigger: String,
    pub requested_by: String,
    pub flake: String,
    pub flake_rev: Option<String>,
    pub strategy: String,
    pub options: DeployOptions,
    pub hosts: Vec<String>,
    /// Recorded before it can start: validated and leased later, then
    /// [`Store::start_deployment`].
    pub queued: bool,
    /// Where a pushed deployment comes from (`github:main`); the commit is
    /// `flake_rev`.
    pub source: Option<String>,
}

impl Store {
    pub async fn create_deployment(&self, new: &NewDeployment) -> Result<i64, StoreError> {
        self.create_run(new, RunKind::Deploy, None).await
    }

    /// A new run of any kind: a deployment, an `exec` (with its command) or
    /// an `upload-keys`.
    pub async fn create_run(
        &self,
        new: &NewDeployment,
        kind: RunKind,
        exec: Option<&ExecSpec>,
    ) -> Result<i64, StoreError> {
        let id = sqlx::query(
            "INSERT INTO deployments
               (created_at, started_at, status, trigger, requested_by, flake, flake_rev, strategy, options, hosts, pid, holder, kind, exec, source)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(now_ms())
        .bind((!new.queued).then(now_ms))
        .bind(if new.queued { "queued" } else { "running" })
        .bind(&new.trigger)
        .bind(&new.requested_by)
        .bind(&new.flake)
        .bind(&new.flake_rev)
        .bind(&new.strategy)
        .bind(to_json(&new.options))
        .bind(to_json(&new.hosts))
        .bind(std::process::id() as i64)
        .bind(self.holder())
        .bind(kind.as_str())
        .bind(exec.map(to_json))
        .bind(&new.source)
        .execute(&self.pool)
        .await
        .map_err(query_error("creating a deployment"))?
        .last_insert_rowid();
        Ok(id)
    }

    /// A queued deployment starts: running, with the hosts it resolved to.
    pub async fn start_deployment(
        &self,
        id: i64,
        hosts: &[String],
        flake_rev: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE deployments SET status = 'running', started_at = ?, hosts = ?,
                 flake_rev = COALESCE(?, flake_rev), pid = ?, holder = ? WHERE id = ?",
        )
        .bind(now_ms())
        .bind(to_json(hosts))
        .bind(flake_rev)
        .bind(std::process::id() as i64)
        .bind(self.holder())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_error("starting a deployment"))?;
        Ok(())
    }

    /// A queued deployment knows the hosts it waits for.
    pub async fn set_waiting_for(&self, id: i64, hosts: &[String]) -> Result<(), StoreError> {
        sqlx::query("UPDATE deployments SET waiting_for = ? WHERE id = ? AND status = 'queued'")
            .bind(to_json(hosts))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_error("recording what a queued deployment waits for"))?;
        Ok(())
    }

    /// The oldest deployment queued before `id` that waits for one of
    /// `hosts`, or whose hosts are not known yet: `id` starts after it
    /// (first come, first served per host).
    pub async fn queued_ahead(&self, id: i64, hosts: &[String]) -> Result<Option<i64>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, waiting_for FROM deployments
             WHERE status = 'queued' AND id < ? AND superseded_by IS NULL AND cancel_requested = 0
             ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading the queue"))?;
        for row in rows {
            let waiting: Option<String> = row.get(1);
            let theirs: Option<Vec<String>> = waiting.and_then(|w| serde_json::from_str(&w).ok());
            let overlaps = match theirs {
                None => true,
                Some(theirs) => theirs.iter().any(|h| hosts.contains(h)),
            };
            if overlaps {
                return Ok(Some(row.get(0)));
            }
        }
        Ok(None)
    }

    /// Queued deployments from `source` older than `newer` will never
    /// start: a newer push came. Returns them.
    pub async fn supersede_queued(
        &self,
        source: &str,
        newer: i64,
        why: &str,
    ) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query(
            "UPDATE deployments SET superseded_by = ?
             WHERE source = ? AND id < ? AND status = 'queued' AND superseded_by IS NULL
             RETURNING id",
        )
        .bind(why)
        .bind(source)
        .bind(newer)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("superseding queued deployments"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Why queued deployment `id` will never start, if a newer one
    /// superseded it.
    pub async fn superseded_by(&self, id: i64) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT superseded_by FROM deployments WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading whether a deployment was superseded"))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// Fix what deployment `id` deploys. Written once, when it starts:
    /// never overwritten by `resume`.
    pub async fn pin_deployment(&self, id: i64, pinned: &Pinned) -> Result<(), StoreError> {
        sqlx::query("UPDATE deployments SET pinned = ? WHERE id = ? AND pinned IS NULL")
            .bind(to_json(pinned))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_error("pinning what a deployment deploys"))?;
        Ok(())
    }

    pub async fn set_plan(&self, id: i64, plan: &Plan) -> Result<(), StoreError> {
        sqlx::query("UPDATE deployments SET plan = ? WHERE id = ?")
            .bind(to_json(plan))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_error("storing a plan"))?;
        Ok(())
    }

    pub async fn finish_deployment(
        &self,
        id: i64,
        status: DeploymentStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE deployments SET status = ?, finished_at = ?, error = ? WHERE id = ?")
            .bind(status.as_str())
            .bind(now_ms())
            .bind(error)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_error("finishing a deployment"))?;
        Ok(())
    }

    fn deployment_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Deployment, StoreError> {
        fn parse<T: serde::de::DeserializeOwned>(
            text: &str,
            context: &'static str,
        ) -> Result<T, StoreError> {
            serde_json::from_str(text).map_err(|source| StoreError::Json { context, source })
        }
        let status: String = row.get("status");
        let options: String = row.get("options");
        let hosts: String = row.get("hosts");
        let plan: Option<String> = row.get("plan");
        let created_at: i64 = row.get("created_at");
        let started_at: Option<i64> = row.get("started_at");
        let kind: String = row.get("kind");
        let exec: Option<String> = row.get("exec");
        let pinned: Option<String> = row.get("pinned");
        Ok(Deployment {
            id: row.get("id"),
            kind: RunKind::parse(&kind),
            exec: exec.map(|e| parse(&e, "deployments.exec")).transpose()?,
            created_at,
            time: Span {
                // Older rows and deployments that never waited: as created.
                started_at: Some(started_at.unwrap_or(created_at)),
                finished_at: row.get("finished_at"),
            },
            status: DeploymentStatus::parse(&status).unwrap_or(DeploymentStatus::Interrupted),
            trigger: row.get("trigger"),
            requested_by: row.get("requested_by"),
            flake: row.get("flake"),
            flake_rev: row.get("flake_rev"),
            strategy: row.get("strategy"),
            options: parse(&options, "deployments.options")?,
            selected: parse(&hosts, "deployments.hosts")?,
            plan: plan.map(|p| parse(&p, "deployments.plan")).transpose()?,
            error: row.get("error"),
            pid: row.get("pid"),
            pinned: pinned
                .map(|p| parse(&p, "deployments.pinned"))
                .transpose()?,
            hosts: Vec::new(),
            events: None,
            gates: Vec::new(),
            waiting: None,
        })
    }

    /// A deployment and its host runs.
    pub async fn deployment(&self, id: i64) -> Result<Option<Deployment>, StoreError> {
        let row = sqlx::query("SELECT * FROM deployments WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a deployment"))?;
        let Some(mut deployment) = row.as_ref().map(Self::deployment_from_row).transpose()? else {
            return Ok(None);
        };
        self.complete(&mut deployment).await?;
        Ok(Some(deployment))
    }

    /// The newest deployments first, each with its host runs.
    pub async fn deployments(&self, limit: i64) -> Result<Vec<Deployment>, StoreError> {
        let rows = sqlx::query("SELECT * FROM deployments ORDER BY id DESC LIMIT ?")
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing deployments"))?;
        let mut list = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut deployment = Self::deployment_from_row(row)?;
            self.complete(&mut deployment).await?;
            list.push(deployment);
        }
        Ok(list)
    }

    /// A deployment's host runs, gates and, while it waits for a window,
    /// what for and until when.
    async fn complete(&self, deployment: &mut Deployment) -> Result<(), StoreError> {
        deployment.hosts = self.host_runs(deployment.id).await?;
        deployment.gates = self.gates(deployment.id).await?;
        if deployment.status == DeploymentStatus::WaitingForWindow {
            deployment.waiting = self.window_wait(deployment.id).await?;
        }
        Ok(())
    }

    /// Ids of deployments marked running (cheap: no JSON decoding).
    pub async fn running_deployments(&self) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM deployments WHERE status IN ('queued', 'running', 'waiting-for-window', 'awaiting-approval') ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("listing running deployments"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Ask a running deployment to stop starting hosts; recorded in its
    /// events with who asked. False when it is not running.
    pub async fn request_cancel(&self, id: i64, by: &str) -> Result<bool, StoreError> {
        let changed = sqlx::query(
            "UPDATE deployments SET cancel_requested = 1 WHERE id = ? AND status IN ('queued', 'running', 'waiting-for-window', 'awaiting-approval')",
        )
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_error("requesting a cancel"))?
        .rows_affected();
        if changed == 1 {
            self.append_event(
                id,
                None,
                EventKind::Log {
                    message: format!("cancel requested by {by}"),
                },
            )
            .await?;
        }
        Ok(changed == 1)
    }

    pub async fn cancel_requested(&self, id: i64) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT cancel_requested FROM deployments WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a cancel request"))?;
        Ok(row.map(|r| r.get::<i64, _>(0) != 0).unwrap_or(false))
    }

    /// Take over a deployment for a resume: running again, by this process.
    pub async fn reopen_deployment(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE deployments SET status = 'running', finished_at = NULL, error = NULL,
                 cancel_requested = 0, pid = ?, holder = ? WHERE id = ?",
        )
        .bind(std::process::id() as i64)
        .bind(self.holder())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_error("reopening a deployment"))?;
        Ok(())
    }

    /// Deployments marked running whose coordinator is gone become
    /// `interrupted`, with their unfinished host runs; returns their ids.
    pub async fn mark_interrupted(&self) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, pid, holder FROM deployments WHERE status IN ('queued', 'running', 'waiting-for-window', 'awaiting-approval')",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("finding running deployments"))?;
        let mut interrupted = Vec::new();
        for row in rows {
            let id: i64 = row.get("id");
            let pid: Option<i64> = row.get("pid");
            let holder: Option<String> = row.get("holder");
            if self.holder_alive(holder.as_deref(), pid) {
                continue;
            }
            let message = format!(
                "the coordinator (pid {}) stopped while this deployment was running",
                pid.unwrap_or(0)
            );
            let marked = sqlx::query(
                "UPDATE deployments SET status = 'interrupted', finished_at = ?, error = ? WHERE id = ? AND status IN ('queued', 'running', 'waiting-for-window', 'awaiting-approval')",
            )
            .bind(now_ms())
            .bind(&message)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_error("marking a deployment interrupted"))?
            .rows_affected();
            // Another process got there first.
            if marked == 0 {
                continue;
            }
            sqlx::query(
                "UPDATE host_runs SET status = 'interrupted', finished_at = ?,
                     error = COALESCE(error, ?) WHERE deployment_id = ? AND status IN ('pending', 'running')",
            )
            .bind(now_ms())
            .bind(&message)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_error("marking host runs interrupted"))?;
            sqlx::query("DELETE FROM leases WHERE deployment_id = ?")
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(query_error("releasing an interrupted deployment's leases"))?;
            self.append_event(id, None, EventKind::Log { message })
                .await?;
            // Its event streams end here, as any deployment's do.
            self.append_event(
                id,
                None,
                EventKind::DeploymentFinished {
                    status: DeploymentStatus::Interrupted,
                },
            )
            .await?;
            interrupted.push(id);
        }
        Ok(interrupted)
    }
}
