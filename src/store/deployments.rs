//! Deployments: created when a request is valid, finished with their
//! status, cancelled on request, marked interrupted when their coordinator
//! died.

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use nix_deploy_core::events::{DeploymentStatus, EventKind};
use nix_deploy_core::exec::ExecSpec;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::plan::Plan;
use nix_deploy_core::run::{Deployment, Pinned, RunKind, Span};

use super::{Lost, Store, StoreError, query_error, to_json};
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
        // Held by this process from the start, at epoch 1.
        let (id, epoch): (i64, i64) = sqlx::query_as(
            "INSERT INTO deployments
               (created_at, started_at, status, trigger, requested_by, flake, flake_rev, strategy, options, hosts, pid, holder, kind, exec,
                source, epoch, lease_expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
                $15, 1, (SELECT now_ms FROM db_clock) + $16)
             RETURNING id, epoch",
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
        .bind(self.ttl_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(query_error("creating a deployment"))?;
        self.ownership.took(id, epoch);
        Ok(id)
    }

    /// A queued deployment starts: running, with the hosts it resolved to.
    pub async fn start_deployment(
        &self,
        id: i64,
        hosts: &[String],
        flake_rev: Option<&str>,
    ) -> Result<(), StoreError> {
        let context = "starting a deployment";
        let mut tx = self.fenced(id, context).await?;
        sqlx::query(
            "UPDATE deployments SET status = 'running', started_at = $1, hosts = $2,
                 flake_rev = COALESCE($3, flake_rev), pid = $4 WHERE id = $5",
        )
        .bind(now_ms())
        .bind(to_json(hosts))
        .bind(flake_rev)
        .bind(std::process::id() as i64)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(query_error(context))?;
        tx.commit().await.map_err(query_error(context))
    }

    /// A queued deployment knows the hosts it waits for.
    pub async fn set_waiting_for(&self, id: i64, hosts: &[String]) -> Result<(), StoreError> {
        sqlx::query("UPDATE deployments SET waiting_for = $1 WHERE id = $2 AND status = 'queued'")
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
             WHERE status = 'queued' AND id < $1 AND superseded_by IS NULL AND cancel_requested = 0
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
            "UPDATE deployments SET superseded_by = $1
             WHERE source = $2 AND id < $3 AND status = 'queued' AND superseded_by IS NULL
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
        let row = sqlx::query("SELECT superseded_by FROM deployments WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading whether a deployment was superseded"))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// Fix what deployment `id` deploys. Written once, when it starts:
    /// never overwritten by `resume`.
    pub async fn pin_deployment(&self, id: i64, pinned: &Pinned) -> Result<(), StoreError> {
        let context = "pinning what a deployment deploys";
        let mut tx = self.fenced(id, context).await?;
        sqlx::query("UPDATE deployments SET pinned = $1 WHERE id = $2 AND pinned IS NULL")
            .bind(to_json(pinned))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(query_error(context))?;
        tx.commit().await.map_err(query_error(context))
    }

    pub async fn set_plan(&self, id: i64, plan: &Plan) -> Result<(), StoreError> {
        let context = "storing a plan";
        let mut tx = self.fenced(id, context).await?;
        sqlx::query("UPDATE deployments SET plan = $1 WHERE id = $2")
            .bind(to_json(plan))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(query_error(context))?;
        tx.commit().await.map_err(query_error(context))
    }

    pub async fn finish_deployment(
        &self,
        id: i64,
        status: DeploymentStatus,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let context = "finishing a deployment";
        let mut tx = self.fenced(id, context).await?;
        sqlx::query(
            "UPDATE deployments SET status = $1, finished_at = $2, error = $3, lease_expires_at = NULL
             WHERE id = $4",
        )
        .bind(status.as_str())
        .bind(now_ms())
        .bind(error)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(query_error(context))?;
        tx.commit().await.map_err(query_error(context))
    }

    fn deployment_from_row(row: &AnyRow) -> Result<Deployment, StoreError> {
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
        let row = sqlx::query("SELECT * FROM deployments WHERE id = $1")
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

    /// A deployment's status alone (cheap: no JSON, no host runs).
    pub async fn deployment_status(&self, id: i64) -> Result<Option<DeploymentStatus>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT status FROM deployments WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a deployment's status"))?;
        Ok(row.and_then(|(status,)| DeploymentStatus::parse(&status)))
    }

    /// The newest deployments first, each with its host runs.
    pub async fn deployments(&self, limit: i64) -> Result<Vec<Deployment>, StoreError> {
        let rows = sqlx::query("SELECT * FROM deployments ORDER BY id DESC LIMIT $1")
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
        // Anyone may ask, whoever holds the deployment: the request and its
        // event are one transaction that holds the deployment's row (events
        // of a deployment are inserted in order, see `fence`).
        let context = "requesting a cancel";
        let mut tx = self.pool.begin().await.map_err(query_error(context))?;
        let changed = sqlx::query(
            "UPDATE deployments SET cancel_requested = 1 WHERE id = $1 AND status IN ('queued', 'running', 'waiting-for-window', 'awaiting-approval')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(query_error(context))?
        .rows_affected();
        if changed == 1 {
            let kind = EventKind::Log {
                message: format!("cancel requested by {by}"),
            };
            super::runs::insert_event(&mut tx, &super::runs::new_event(id, None, kind)).await?;
        }
        tx.commit().await.map_err(query_error(context))?;
        Ok(changed == 1)
    }

    pub async fn cancel_requested(&self, id: i64) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT cancel_requested FROM deployments WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a cancel request"))?;
        Ok(row.map(|r| r.get::<i64, _>(0) != 0).unwrap_or(false))
    }

    /// Take a deployment that is not running (cancelled, failed,
    /// interrupted) for a resume: running again, held by this process at a
    /// new epoch. Refused when another coordinator took it meanwhile.
    pub async fn reopen_deployment(&self, id: i64) -> Result<(), StoreError> {
        let row: Option<(i64,)> = sqlx::query_as(
            "UPDATE deployments SET status = 'running', finished_at = NULL, error = NULL,
                 cancel_requested = 0, pid = $1, holder = $2, epoch = epoch + 1,
                 lease_expires_at = (SELECT now_ms FROM db_clock) + $3
             WHERE id = $4 AND status NOT IN ('queued', 'running', 'waiting-for-window', 'awaiting-approval')
             RETURNING epoch",
        )
        .bind(std::process::id() as i64)
        .bind(self.holder())
        .bind(self.ttl_ms())
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("reopening a deployment"))?;
        match row {
            Some((epoch,)) => {
                self.ownership.took(id, epoch);
                Ok(())
            }
            None => Err(StoreError::Superseded {
                deployment_id: id,
                epoch: self.ownership.epoch(id).unwrap_or(0),
                lost: Lost::Superseded,
            }),
        }
    }

    /// Deployments marked running whose coordinator is gone become
    /// `interrupted`, with their unfinished host runs; returns their ids.
    ///
    /// Gone: on SQLite, its process's flock is free; on PostgreSQL, its
    /// lease expired (by the database's clock) and no live coordinator takes
    /// deployments over (one that does resumes it instead, see
    /// [`Store::take_over`]; the caller counts as one when it does, however
    /// late its heartbeat); a queued deployment is never taken over.
    /// Each is taken (a new epoch) before it is written.
    pub async fn mark_interrupted(&self) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, pid, holder, epoch, status FROM deployments
             WHERE status IN ('queued', 'running', 'waiting-for-window', 'awaiting-approval')
               AND ($1 = 0 OR (COALESCE(lease_expires_at, 0) < (SELECT now_ms FROM db_clock)
                   AND (status = 'queued' OR NOT EXISTS (
                       SELECT 1 FROM coordinators WHERE takeover = 1
                         AND (heartbeat_at > (SELECT now_ms FROM db_clock) - $2 OR id = $3)))))",
        )
        .bind(i64::from(self.liveness_by_lease()))
        .bind(self.ttl_ms())
        // This process, when it takes deployments over, is one that does,
        // even while its own heartbeat is late (the database was away): it
        // resumes the deployment rather than ending it.
        .bind(self.holder())
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("finding running deployments"))?;
        let mut interrupted = Vec::new();
        for row in rows {
            let id: i64 = row.get("id");
            let pid: Option<i64> = row.get("pid");
            let holder: Option<String> = row.get("holder");
            let epoch: i64 = row.get("epoch");
            if !self.liveness_by_lease() && self.holder_alive(holder.as_deref(), pid) {
                continue;
            }
            let message = format!(
                "the coordinator (pid {}) stopped while this deployment was running",
                pid.unwrap_or(0)
            );
            if self.interrupt(id, epoch, &message).await? {
                interrupted.push(id);
            }
        }
        Ok(interrupted)
    }

    /// Take deployment `id` from its dead holder (who held it at `epoch`)
    /// and end it `interrupted`; false when someone else got there first.
    async fn interrupt(&self, id: i64, epoch: i64, message: &str) -> Result<bool, StoreError> {
        let taken: Option<(i64,)> = sqlx::query_as(
            "UPDATE deployments SET status = 'interrupted', finished_at = $1, error = $2,
                 holder = $3, epoch = epoch + 1, lease_expires_at = NULL
             WHERE id = $4 AND epoch = $5 AND status IN ('queued', 'running', 'waiting-for-window', 'awaiting-approval')
             RETURNING epoch",
        )
        .bind(now_ms())
        .bind(message)
        .bind(self.holder())
        .bind(id)
        .bind(epoch)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("marking a deployment interrupted"))?;
        let Some((epoch,)) = taken else {
            return Ok(false);
        };
        self.ownership.took(id, epoch);
        let context = "marking a deployment interrupted";
        let result = async {
            let mut tx = self.fenced(id, context).await?;
            end_interrupted(&mut tx, id, message).await?;
            tx.commit().await.map_err(query_error(context))
        }
        .await;
        self.ownership.released(id);
        result.map(|()| true)
    }
}

/// In the caller's fenced transaction: deployment `id`'s unfinished host
/// runs are interrupted, with `message` as their error unless they have one.
pub(super) async fn interrupt_host_runs(
    tx: &mut sqlx::AnyConnection,
    id: i64,
    message: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE host_runs SET status = 'interrupted', finished_at = $1,
             error = COALESCE(error, $2) WHERE deployment_id = $3 AND status IN ('pending', 'running')",
    )
    .bind(now_ms())
    .bind(message)
    .bind(id)
    .execute(&mut *tx)
    .await
    .map_err(query_error("marking host runs interrupted"))?;
    Ok(())
}

/// In the caller's fenced transaction: deployment `id` ends `interrupted`
/// for `message`: its unfinished host runs too, its leases released, the
/// message and its final event recorded (its event streams end there).
pub(super) async fn end_interrupted(
    tx: &mut sqlx::AnyConnection,
    id: i64,
    message: &str,
) -> Result<(), StoreError> {
    let context = "ending a deployment interrupted";
    sqlx::query(
        "UPDATE deployments SET status = 'interrupted', finished_at = $1, error = $2,
             lease_expires_at = NULL WHERE id = $3",
    )
    .bind(now_ms())
    .bind(message)
    .bind(id)
    .execute(&mut *tx)
    .await
    .map_err(query_error(context))?;
    interrupt_host_runs(tx, id, message).await?;
    sqlx::query("DELETE FROM leases WHERE deployment_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(query_error(context))?;
    let log = EventKind::Log {
        message: message.to_string(),
    };
    let finished = EventKind::DeploymentFinished {
        status: DeploymentStatus::Interrupted,
    };
    for kind in [log, finished] {
        super::runs::insert_event(tx, &super::runs::new_event(id, None, kind)).await?;
    }
    Ok(())
}
