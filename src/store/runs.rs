//! Host runs, events and the last known state of each host.

use sqlx::Row;
use sqlx::any::AnyRow;

use nix_deploy_core::events::{Event, EventKind, HostStatus, SystemRef};
use nix_deploy_core::goal::{self, Goal};
use nix_deploy_core::run::{HostRecord, HostRun, Span};

use sqlx::AssertSqlSafe;

use super::{IN_LIST, Store, StoreError, parameters, query_error, to_json};
use crate::now_ms;

impl Store {
    /// Insert or replace a host run as a whole.
    pub async fn save_host_run(&self, run: &HostRun) -> Result<(), StoreError> {
        let context = "saving a host run";
        let mut tx = self.fenced(run.deployment_id, context).await?;
        upsert_host_run(run)
            .execute(&mut *tx)
            .await
            .map_err(query_error(context))?;
        tx.commit().await.map_err(query_error(context))
    }

    /// Save a host run, record an event about it and, when a step ended,
    /// count its duration: one transaction, so one durable write where there
    /// were three (a step's start and end are the most frequent writes of a
    /// deployment).
    pub async fn save_host_run_with_event(
        &self,
        run: &HostRun,
        kind: EventKind,
        finished_step: Option<(&str, f64)>,
    ) -> Result<Event, StoreError> {
        let context = "saving a host run and its event";
        let mut tx = self.fenced(run.deployment_id, context).await?;
        upsert_host_run(run)
            .execute(&mut *tx)
            .await
            .map_err(query_error(context))?;
        let mut event = new_event(run.deployment_id, Some(&run.host), kind);
        event.id = insert_event(&mut tx, &event).await?;
        if let Some((step, seconds)) = finished_step {
            super::stats::count_step(&mut tx, step, seconds).await?;
        }
        tx.commit().await.map_err(query_error(context))?;
        Ok(event)
    }

    /// Every host run of a deployment, by host name.
    pub async fn host_runs(&self, deployment_id: i64) -> Result<Vec<HostRun>, StoreError> {
        let rows = sqlx::query("SELECT * FROM host_runs WHERE deployment_id = $1 ORDER BY host")
            .bind(deployment_id)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading host runs"))?;
        Self::host_runs_from_rows(&rows)
    }

    /// A host's most recent finished runs that did something (newest first):
    /// the history behind estimates and risk.
    pub async fn recent_host_runs(
        &self,
        host: &str,
        limit: i64,
    ) -> Result<Vec<HostRun>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM host_runs WHERE host = $1 AND finished_at IS NOT NULL
               AND status NOT IN ('skipped', 'pending', 'running', 'cancelled')
               AND deployment_id IN (SELECT id FROM deployments WHERE kind = 'deploy')
             ORDER BY finished_at DESC LIMIT $2",
        )
        .bind(host)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading a host's history"))?;
        Self::host_runs_from_rows(&rows)
    }

    /// Durations (ms) of the fleet's most recent successful host runs.
    pub async fn recent_successful_durations(&self, limit: i64) -> Result<Vec<u64>, StoreError> {
        let rows = sqlx::query(
            "SELECT finished_at - started_at FROM host_runs
             WHERE status = 'deployed' AND finished_at IS NOT NULL AND started_at IS NOT NULL
             ORDER BY finished_at DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading the fleet's history"))?;
        Ok(rows
            .iter()
            .map(|row| row.get::<i64, _>(0).max(0) as u64)
            .collect())
    }

    pub(super) fn host_runs_from_rows(rows: &[AnyRow]) -> Result<Vec<HostRun>, StoreError> {
        rows.iter()
            .map(|row| {
                let status: String = row.get("status");
                let steps: String = row.get("steps");
                let summary: Option<String> = row.get("summary");
                let goal: Option<String> = row.get("goal");
                let output: Option<String> = row.get("output");
                let reboot: Option<String> = row.get("reboot");
                let after: Option<String> = row.get("after");
                let keys: Option<String> = row.get("key_changes");
                let generation = |col: &str| row.get::<Option<i64>, _>(col).map(|g| g as u32);
                fn json<T: serde::de::DeserializeOwned>(
                    text: Option<String>,
                    context: &'static str,
                ) -> Result<Option<T>, StoreError> {
                    text.map(|t| serde_json::from_str(&t))
                        .transpose()
                        .map_err(|source| StoreError::Json { context, source })
                }
                Ok(HostRun {
                    deployment_id: row.get("deployment_id"),
                    host: row.get("host"),
                    status: HostStatus::parse(&status).unwrap_or(HostStatus::Failed),
                    step: row.get("step"),
                    changed: row.get::<Option<i64>, _>("changed").map(|c| c != 0),
                    from: SystemRef {
                        path: row.get("old_path"),
                        generation: generation("old_generation"),
                    },
                    to: SystemRef {
                        path: row.get("new_path"),
                        generation: generation("new_generation"),
                    },
                    time: Span {
                        started_at: row.get("started_at"),
                        finished_at: row.get("finished_at"),
                    },
                    steps: serde_json::from_str(&steps).map_err(|source| StoreError::Json {
                        context: "host_runs.steps",
                        source,
                    })?,
                    reason: row.get("reason"),
                    error: row.get("error"),
                    summary: summary
                        .map(|s| serde_json::from_str(&s))
                        .transpose()
                        .map_err(|source| StoreError::Json {
                            context: "host_runs.summary",
                            source,
                        })?,
                    token: row.get("token"),
                    goal: goal.and_then(|g| Goal::parse(&g).ok()),
                    output: json(output, "host_runs.output")?,
                    reboot: json(reboot, "host_runs.reboot")?,
                    after: json(after, "host_runs.after")?,
                    keys: json(keys, "host_runs.key_changes")?,
                })
            })
            .collect()
    }

    /// Record an event; returns it with its id (its position in the history).
    pub async fn append_event(
        &self,
        deployment_id: i64,
        host: Option<&str>,
        kind: EventKind,
    ) -> Result<Event, StoreError> {
        let context = "recording an event";
        let mut tx = self.fenced(deployment_id, context).await?;
        let mut event = new_event(deployment_id, host, kind);
        event.id = insert_event(&mut tx, &event).await?;
        tx.commit().await.map_err(query_error(context))?;
        Ok(event)
    }

    /// Events of a deployment after `after_id`, in order.
    pub async fn events(
        &self,
        deployment_id: i64,
        after_id: i64,
    ) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, deployment_id, at, host, data FROM events
             WHERE deployment_id = $1 AND id > $2 ORDER BY id",
        )
        .bind(deployment_id)
        .bind(after_id)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading events"))?;
        rows.iter()
            .map(|row| {
                let data: String = row.get("data");
                Ok(Event {
                    id: row.get("id"),
                    deployment_id: row.get("deployment_id"),
                    at: row.get("at"),
                    host: row.get("host"),
                    kind: serde_json::from_str(&data).map_err(|source| StoreError::Json {
                        context: "events.data",
                        source,
                    })?,
                })
            })
            .collect()
    }

    /// Remember what a probe found on a host.
    pub async fn record_probe(
        &self,
        host: &str,
        current: &SystemRef,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        // An unreachable host keeps its last known system.
        sqlx::query(
            "INSERT INTO hosts (name, current_path, generation, probed_at, probe_error)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO UPDATE SET
                 current_path = CASE WHEN excluded.probe_error IS NULL THEN excluded.current_path ELSE hosts.current_path END,
                 generation = CASE WHEN excluded.probe_error IS NULL THEN excluded.generation ELSE hosts.generation END,
                 probed_at = excluded.probed_at, probe_error = excluded.probe_error",
        )
        .bind(host)
        .bind(&current.path)
        .bind(current.generation.map(i64::from))
        .bind(now_ms())
        .bind(error)
        .execute(&self.pool)
        .await
        .map_err(query_error("recording a probe"))?;
        Ok(())
    }

    /// Remember what a probe found to be the host's boot default (its
    /// profile's system), when it found one.
    pub async fn record_boot_default(
        &self,
        host: &str,
        boot_path: Option<&str>,
    ) -> Result<(), StoreError> {
        if boot_path.is_none() {
            return Ok(());
        }
        sqlx::query("UPDATE hosts SET boot_path = $1 WHERE name = $2")
            .bind(boot_path)
            .bind(host)
            .execute(&self.pool)
            .await
            .map_err(query_error("recording a boot default"))?;
        Ok(())
    }

    /// Remember how a host's last deployment ended, and what it runs and
    /// boots now: as read from the host when its part ended, else as far as
    /// its goal and result tell. A host the deployment never started
    /// (nothing to do, blocked, cancelled) keeps its last result: what it
    /// runs was recorded by its probe.
    pub async fn record_host_result(&self, run: &HostRun) -> Result<(), StoreError> {
        if matches!(run.status, HostStatus::Skipped | HostStatus::Cancelled) {
            return Ok(());
        }
        let (running, generation, boot) = after_run(run);
        let context = "recording a host result";
        let mut tx = self.fenced(run.deployment_id, context).await?;
        sqlx::query(
            "INSERT INTO hosts (name, current_path, generation, last_deployment_id, last_status, last_error, last_finished_at, boot_path)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (name) DO UPDATE SET
                 current_path = COALESCE($2, hosts.current_path),
                 generation = COALESCE($3, hosts.generation),
                 boot_path = COALESCE($8, hosts.boot_path),
                 last_deployment_id = excluded.last_deployment_id,
                 last_status = excluded.last_status,
                 last_error = excluded.last_error,
                 last_finished_at = excluded.last_finished_at",
        )
        .bind(&run.host)
        .bind(running)
        .bind(generation.map(i64::from))
        .bind(run.deployment_id)
        .bind(run.status.as_str())
        .bind(&run.error)
        .bind(run.time.finished_at.unwrap_or_else(now_ms))
        .bind(boot)
        .execute(&mut *tx)
        .await
        .map_err(query_error(context))?;
        tx.commit().await.map_err(query_error(context))
    }

    pub async fn host_states(&self) -> Result<Vec<HostRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM hosts ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading host states"))?;
        Ok(rows
            .iter()
            .map(|row| HostRecord {
                name: row.get("name"),
                current_path: row.get("current_path"),
                generation: row.get::<Option<i64>, _>("generation").map(|g| g as u32),
                probed_at: row.get("probed_at"),
                probe_error: row.get("probe_error"),
                last_deployment_id: row.get("last_deployment_id"),
                last_status: row.get("last_status"),
                last_error: row.get("last_error"),
                last_finished_at: row.get("last_finished_at"),
                pending_reboot: goal::pending_reboot(
                    row.get::<Option<String>, _>("current_path").as_deref(),
                    row.get::<Option<String>, _>("boot_path").as_deref(),
                ),
                boot_path: row.get("boot_path"),
            })
            .collect())
    }

    /// Which of `hosts` any deployment, rollback or resume may have changed
    /// since `since_ms`: a run of theirs started after it, ended after it, or
    /// has not ended. A probe taken at `since_ms` is stale for them.
    pub async fn hosts_touched_since(
        &self,
        hosts: &[String],
        since_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut touched = Vec::new();
        // A bounded list of parameters per query (both backends limit them).
        for chunk in hosts.chunks(IN_LIST) {
            let sql = format!(
                "SELECT DISTINCT host FROM host_runs
                 WHERE (started_at >= $1 OR finished_at IS NULL OR finished_at >= $1)
                   AND host IN ({})",
                parameters(2, chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).bind(since_ms);
            for host in chunk {
                query = query.bind(host.clone());
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(query_error("reading recent host runs"))?;
            touched.extend(rows.iter().map(|r| r.get::<String, _>("host")));
        }
        touched.sort();
        touched.dedup();
        Ok(touched)
    }
}

/// What a host runs, which generation its profile is on, and what it boots,
/// after a host run (`None`: unchanged, as far as this run knows).
fn after_run(run: &HostRun) -> (Option<&str>, Option<u32>, Option<&str>) {
    // Read from the host when its part ended: that is what it runs.
    if let Some(after) = &run.after {
        return (
            after.running.as_deref(),
            after.boot_generation,
            after.boot.as_deref(),
        );
    }
    let goal = run.goal.unwrap_or_default();
    let to = run.to.path.as_deref();
    match run.status {
        HostStatus::Deployed => match goal {
            Goal::Switch => (to, run.to.generation, to),
            // The running system changes only with the reboot.
            Goal::Boot if run.reboot.is_some() => (to, run.to.generation, to),
            Goal::Boot => (run.from.path.as_deref(), run.to.generation, to),
            // The profile (and so the boot default) never changed.
            Goal::Test => (to, None, None),
            Goal::DryActivate | Goal::Push => (None, None, None),
        },
        HostStatus::RolledBack | HostStatus::Failed => {
            (run.from.path.as_deref(), run.from.generation, None)
        }
        _ => (None, None, None),
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// The statement that inserts or replaces `run`.
fn upsert_host_run(run: &HostRun) -> Query<'_> {
    sqlx::query(
        "INSERT INTO host_runs (deployment_id, host, status, step, changed, old_path, old_generation,
             new_path, new_generation, started_at, finished_at, steps, reason, error, summary, token,
             goal, output, reboot, after, key_changes)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
             $21)
         ON CONFLICT (deployment_id, host) DO UPDATE SET
             status = excluded.status, step = excluded.step, changed = excluded.changed,
             old_path = excluded.old_path, old_generation = excluded.old_generation,
             new_path = excluded.new_path, new_generation = excluded.new_generation,
             started_at = excluded.started_at, finished_at = excluded.finished_at,
             steps = excluded.steps, reason = excluded.reason, error = excluded.error,
             summary = excluded.summary, token = excluded.token,
             goal = excluded.goal, output = excluded.output, reboot = excluded.reboot,
             after = excluded.after, key_changes = excluded.key_changes",
    )
    .bind(run.deployment_id)
    .bind(&run.host)
    .bind(run.status.as_str())
    .bind(&run.step)
    .bind(run.changed.map(i64::from))
    .bind(&run.from.path)
    .bind(run.from.generation.map(i64::from))
    .bind(&run.to.path)
    .bind(run.to.generation.map(i64::from))
    .bind(run.time.started_at)
    .bind(run.time.finished_at)
    .bind(serde_json::to_string(&run.steps).unwrap_or_else(|_| "[]".into()))
    .bind(&run.reason)
    .bind(&run.error)
    .bind(run.summary.as_ref().map(to_json))
    .bind(&run.token)
    .bind(run.goal.map(|g| g.as_str()))
    .bind(run.output.as_ref().map(to_json))
    .bind(run.reboot.as_ref().map(to_json))
    .bind(run.after.as_ref().map(to_json))
    .bind(run.keys.as_ref().map(to_json))
}

/// An event to record now.
pub(super) fn new_event(deployment_id: i64, host: Option<&str>, kind: EventKind) -> Event {
    Event {
        id: 0,
        deployment_id,
        at: now_ms(),
        host: host.map(str::to_string),
        kind,
    }
}

/// Insert `event` in the caller's transaction, which holds its
/// deployment's row (see `fence`); returns its id.
pub(super) async fn insert_event(
    conn: &mut sqlx::AnyConnection,
    event: &Event,
) -> Result<i64, StoreError> {
    let data = serde_json::to_string(&event.kind).map_err(|source| StoreError::Json {
        context: "events",
        source,
    })?;
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO events (deployment_id, at, host, kind, data) VALUES ($1, $2, $3, $4, $5)
         RETURNING id",
    )
    .bind(event.deployment_id)
    .bind(event.at)
    .bind(event.host.clone())
    .bind(event.kind.name())
    .bind(data)
    .fetch_one(&mut *conn)
    .await
    .map_err(query_error("recording an event"))?;
    Ok(id)
}
