//! The history: deployments, host runs, events and the last known state of each
//! host, in one SQLite file (WAL) in the state directory.
//!
//! Invariant: whatever the engine reports (to a terminal, a stream or an API
//! client) has been written here first. Queries are checked at runtime and
//! covered by tests against a migrated database.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::events::{DeploymentStatus, Event, EventKind, HostStatus, SystemRef, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate the database {path}: {source}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("database error while {context}: {source}")]
    Query {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("stored JSON is corrupt in {context}: {source}")]
    Json {
        context: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

fn query_error(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { context, source }
}

/// A new deployment, as requested.
#[derive(Clone, Debug, Serialize)]
pub struct NewDeployment {
    pub trigger: String,
    pub requested_by: String,
    pub flake: String,
    pub flake_rev: Option<String>,
    pub strategy: String,
    pub options: serde_json::Value,
    pub hosts: Vec<String>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct DeploymentRow {
    pub id: i64,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub status: DeploymentStatus,
    pub trigger: String,
    pub requested_by: String,
    pub flake: String,
    pub flake_rev: Option<String>,
    pub strategy: String,
    pub options: serde_json::Value,
    pub hosts: Vec<String>,
    pub plan: Option<serde_json::Value>,
    pub error: Option<String>,
    pub pid: Option<i64>,
}

/// The timing of one step of a host run.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct StepTiming {
    pub step: crate::events::Step,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub ok: Option<bool>,
}

/// One host's part in a deployment.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct HostRun {
    pub deployment_id: i64,
    pub host: String,
    pub status: HostStatus,
    pub step: Option<String>,
    pub changed: Option<bool>,
    pub from: SystemRef,
    pub to: SystemRef,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub steps: Vec<StepTiming>,
    /// Why the host was skipped or what it waits for.
    pub reason: Option<String>,
    pub error: Option<String>,
    pub summary: Option<serde_json::Value>,
    /// The activation's token on the host (names the watchdog's files).
    pub token: Option<String>,
}

impl HostRun {
    pub fn new(deployment_id: i64, host: &str) -> Self {
        HostRun {
            deployment_id,
            host: host.to_string(),
            status: HostStatus::Pending,
            step: None,
            changed: None,
            from: SystemRef::default(),
            to: SystemRef::default(),
            started_at: None,
            finished_at: None,
            steps: Vec::new(),
            reason: None,
            error: None,
            summary: None,
            token: None,
        }
    }

    pub fn duration_ms(&self) -> Option<i64> {
        Some(self.finished_at? - self.started_at?)
    }
}

/// What we last knew about a host.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct HostStateRow {
    pub name: String,
    pub current_path: Option<String>,
    pub generation: Option<u32>,
    pub probed_at: Option<i64>,
    pub probe_error: Option<String>,
    pub last_deployment_id: Option<i64>,
    pub last_status: Option<String>,
    pub last_error: Option<String>,
    pub last_finished_at: Option<i64>,
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
}

pub const DB_FILE: &str = "nix-deploy.db";

impl Store {
    /// Open (creating if needed) the database in `state_dir` and apply migrations.
    pub async fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::CreateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(DB_FILE);
        let open_error = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(open_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // With WAL, NORMAL survives a killed process (only a power loss can
            // drop the last transactions).
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // Readers (API, CLI) never wait behind the engine's writes in WAL mode,
        // as long as they have a connection of their own.
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(open_error)?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                path: path.clone(),
                source,
            })?;
        Ok(Store { pool, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For read-only reporting queries (metrics) that live next to their users.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn create_deployment(&self, new: &NewDeployment) -> Result<i64, StoreError> {
        let json = |v: &dyn erased::Json| v.to_json();
        let id = sqlx::query(
            "INSERT INTO deployments
               (created_at, status, trigger, requested_by, flake, flake_rev, strategy, options, hosts, pid)
             VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(now_ms())
        .bind(&new.trigger)
        .bind(&new.requested_by)
        .bind(&new.flake)
        .bind(&new.flake_rev)
        .bind(&new.strategy)
        .bind(json(&new.options))
        .bind(json(&new.hosts))
        .bind(std::process::id() as i64)
        .execute(&self.pool)
        .await
        .map_err(query_error("creating a deployment"))?
        .last_insert_rowid();
        Ok(id)
    }

    pub async fn set_plan(&self, id: i64, plan: &serde_json::Value) -> Result<(), StoreError> {
        sqlx::query("UPDATE deployments SET plan = ? WHERE id = ?")
            .bind(plan.to_string())
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

    fn deployment_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<DeploymentRow, StoreError> {
        let parse_json = |text: Option<String>| -> Result<Option<serde_json::Value>, StoreError> {
            text.map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|source| StoreError::Json {
                    context: "deployments",
                    source,
                })
        };
        let status: String = row.get("status");
        let hosts: String = row.get("hosts");
        Ok(DeploymentRow {
            id: row.get("id"),
            created_at: row.get("created_at"),
            finished_at: row.get("finished_at"),
            status: DeploymentStatus::parse(&status).unwrap_or(DeploymentStatus::Interrupted),
            trigger: row.get("trigger"),
            requested_by: row.get("requested_by"),
            flake: row.get("flake"),
            flake_rev: row.get("flake_rev"),
            strategy: row.get("strategy"),
            options: parse_json(Some(row.get("options")))?.unwrap_or_default(),
            hosts: serde_json::from_str(&hosts).map_err(|source| StoreError::Json {
                context: "deployments.hosts",
                source,
            })?,
            plan: parse_json(row.get("plan"))?,
            error: row.get("error"),
            pid: row.get("pid"),
        })
    }

    pub async fn deployment(&self, id: i64) -> Result<Option<DeploymentRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM deployments WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a deployment"))?;
        row.as_ref().map(Self::deployment_from_row).transpose()
    }

    /// The newest deployments first.
    pub async fn deployments(&self, limit: i64) -> Result<Vec<DeploymentRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM deployments ORDER BY id DESC LIMIT ?")
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing deployments"))?;
        rows.iter().map(Self::deployment_from_row).collect()
    }

    /// Insert or replace a host run as a whole.
    pub async fn save_host_run(&self, run: &HostRun) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO host_runs (deployment_id, host, status, step, changed, old_path, old_generation,
                 new_path, new_generation, started_at, finished_at, steps, reason, error, summary, token)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (deployment_id, host) DO UPDATE SET
                 status = excluded.status, step = excluded.step, changed = excluded.changed,
                 old_path = excluded.old_path, old_generation = excluded.old_generation,
                 new_path = excluded.new_path, new_generation = excluded.new_generation,
                 started_at = excluded.started_at, finished_at = excluded.finished_at,
                 steps = excluded.steps, reason = excluded.reason, error = excluded.error,
                 summary = excluded.summary, token = excluded.token",
        )
        .bind(run.deployment_id)
        .bind(&run.host)
        .bind(run.status.as_str())
        .bind(&run.step)
        .bind(run.changed)
        .bind(&run.from.path)
        .bind(run.from.generation.map(i64::from))
        .bind(&run.to.path)
        .bind(run.to.generation.map(i64::from))
        .bind(run.started_at)
        .bind(run.finished_at)
        .bind(serde_json::to_string(&run.steps).unwrap_or_else(|_| "[]".into()))
        .bind(&run.reason)
        .bind(&run.error)
        .bind(run.summary.as_ref().map(|s| s.to_string()))
        .bind(&run.token)
        .execute(&self.pool)
        .await
        .map_err(query_error("saving a host run"))?;
        Ok(())
    }

    pub async fn host_runs(&self, deployment_id: i64) -> Result<Vec<HostRun>, StoreError> {
        let rows = sqlx::query("SELECT * FROM host_runs WHERE deployment_id = ? ORDER BY host")
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
            "SELECT * FROM host_runs WHERE host = ? AND finished_at IS NOT NULL
               AND status NOT IN ('skipped', 'pending', 'running', 'cancelled')
             ORDER BY finished_at DESC LIMIT ?",
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
             ORDER BY finished_at DESC LIMIT ?",
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

    fn host_runs_from_rows(rows: &[sqlx::sqlite::SqliteRow]) -> Result<Vec<HostRun>, StoreError> {
        rows.iter()
            .map(|row| {
                let status: String = row.get("status");
                let steps: String = row.get("steps");
                let summary: Option<String> = row.get("summary");
                let generation = |col: &str| row.get::<Option<i64>, _>(col).map(|g| g as u32);
                Ok(HostRun {
                    deployment_id: row.get("deployment_id"),
                    host: row.get("host"),
                    status: HostStatus::parse(&status).unwrap_or(HostStatus::Failed),
                    step: row.get("step"),
                    changed: row.get("changed"),
                    from: SystemRef {
                        path: row.get("old_path"),
                        generation: generation("old_generation"),
                    },
                    to: SystemRef {
                        path: row.get("new_path"),
                        generation: generation("new_generation"),
                    },
                    started_at: row.get("started_at"),
                    finished_at: row.get("finished_at"),
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
        let mut event = Event {
            id: 0,
            deployment_id,
            at: now_ms(),
            host: host.map(str::to_string),
            kind,
        };
        let data = serde_json::to_string(&event.kind).map_err(|source| StoreError::Json {
            context: "events",
            source,
        })?;
        event.id = sqlx::query(
            "INSERT INTO events (deployment_id, at, host, kind, data) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(deployment_id)
        .bind(event.at)
        .bind(host)
        .bind(event.kind.name())
        .bind(data)
        .execute(&self.pool)
        .await
        .map_err(query_error("recording an event"))?
        .last_insert_rowid();
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
             WHERE deployment_id = ? AND id > ? ORDER BY id",
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
             VALUES (?, ?, ?, ?, ?)
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

    /// Remember how a host's last deployment ended (and what it runs now, if known).
    pub async fn record_host_result(&self, run: &HostRun) -> Result<(), StoreError> {
        let now_running = match run.status {
            HostStatus::Deployed => Some(&run.to),
            HostStatus::RolledBack | HostStatus::Failed => Some(&run.from),
            _ => None,
        };
        sqlx::query(
            "INSERT INTO hosts (name, current_path, generation, last_deployment_id, last_status, last_error, last_finished_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET
                 current_path = COALESCE(?, hosts.current_path),
                 generation = COALESCE(?, hosts.generation),
                 last_deployment_id = excluded.last_deployment_id,
                 last_status = excluded.last_status,
                 last_error = excluded.last_error,
                 last_finished_at = excluded.last_finished_at",
        )
        .bind(&run.host)
        .bind(now_running.and_then(|s| s.path.clone()))
        .bind(now_running.and_then(|s| s.generation).map(i64::from))
        .bind(run.deployment_id)
        .bind(run.status.as_str())
        .bind(&run.error)
        .bind(run.finished_at.unwrap_or_else(now_ms))
        .bind(now_running.and_then(|s| s.path.clone()))
        .bind(now_running.and_then(|s| s.generation).map(i64::from))
        .execute(&self.pool)
        .await
        .map_err(query_error("recording a host result"))?;
        Ok(())
    }

    pub async fn host_states(&self) -> Result<Vec<HostStateRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM hosts ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading host states"))?;
        Ok(rows
            .iter()
            .map(|row| HostStateRow {
                name: row.get("name"),
                current_path: row.get("current_path"),
                generation: row.get::<Option<i64>, _>("generation").map(|g| g as u32),
                probed_at: row.get("probed_at"),
                probe_error: row.get("probe_error"),
                last_deployment_id: row.get("last_deployment_id"),
                last_status: row.get("last_status"),
                last_error: row.get("last_error"),
                last_finished_at: row.get("last_finished_at"),
            })
            .collect())
    }
}

/// Who holds a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub host: String,
    pub owner: String,
    pub deployment_id: Option<i64>,
    pub pid: i64,
    pub expires_at: i64,
}

impl std::fmt::Display for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.deployment_id {
            Some(id) => write!(f, "deployment #{id} (pid {})", self.pid),
            None => write!(f, "another nix-deploy run (pid {})", self.pid),
        }
    }
}

/// Whether a local process is alive and is a nix-deploy (pids get reused).
pub fn process_alive(pid: i64) -> bool {
    if pid <= 0 {
        return false;
    }
    if pid == std::process::id() as i64 {
        return true;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => String::from_utf8_lossy(&cmdline).contains("nix-deploy"),
        Err(_) => false,
    }
}

impl Store {
    fn lease_from_row(row: &sqlx::sqlite::SqliteRow) -> Lease {
        Lease {
            host: row.get("host"),
            owner: row.get("owner"),
            deployment_id: row.get("deployment_id"),
            pid: row.get("pid"),
            expires_at: row.get("expires_at"),
        }
    }

    pub async fn lease(&self, host: &str) -> Result<Option<Lease>, StoreError> {
        let row = sqlx::query("SELECT * FROM leases WHERE host = ?")
            .bind(host)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a lease"))?;
        Ok(row.as_ref().map(Self::lease_from_row))
    }

    /// Take the lease of `host` for `owner`, or say who holds it. A lease that
    /// expired, or whose process is gone, is taken over. Compare-and-swap on
    /// the old row, so two racing owners cannot both win.
    pub async fn try_lease(
        &self,
        host: &str,
        owner: &str,
        deployment_id: Option<i64>,
        ttl: Duration,
    ) -> Result<Result<(), Lease>, StoreError> {
        let now = now_ms();
        let expires = now + ttl.as_millis() as i64;
        let pid = std::process::id() as i64;
        let changed = match self.lease(host).await? {
            None => sqlx::query(
                "INSERT INTO leases (host, owner, deployment_id, pid, acquired_at, expires_at)
                 VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (host) DO NOTHING",
            )
            .bind(host)
            .bind(owner)
            .bind(deployment_id)
            .bind(pid)
            .bind(now)
            .bind(expires)
            .execute(&self.pool)
            .await
            .map_err(query_error("taking a lease"))?
            .rows_affected(),
            Some(held) => {
                let ours = held.owner == owner;
                let dead = held.expires_at < now || !process_alive(held.pid);
                if !ours && !dead {
                    return Ok(Err(held));
                }
                sqlx::query(
                    "UPDATE leases SET owner = ?, deployment_id = ?, pid = ?, acquired_at = ?, expires_at = ?
                     WHERE host = ? AND owner = ? AND expires_at = ?",
                )
                .bind(owner)
                .bind(deployment_id)
                .bind(pid)
                .bind(now)
                .bind(expires)
                .bind(host)
                .bind(&held.owner)
                .bind(held.expires_at)
                .execute(&self.pool)
                .await
                .map_err(query_error("taking over a lease"))?
                .rows_affected()
            }
        };
        if changed == 1 {
            Ok(Ok(()))
        } else {
            // Somebody else won the race; report them.
            Ok(Err(self.lease(host).await?.unwrap_or(Lease {
                host: host.to_string(),
                owner: "unknown".into(),
                deployment_id: None,
                pid: 0,
                expires_at: now,
            })))
        }
    }

    /// Extend every lease of `owner` (and name its deployment once known).
    pub async fn renew_leases(
        &self,
        owner: &str,
        deployment_id: Option<i64>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE leases SET expires_at = ?, deployment_id = COALESCE(?, deployment_id) WHERE owner = ?",
        )
        .bind(now_ms() + ttl.as_millis() as i64)
        .bind(deployment_id)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(query_error("renewing leases"))?;
        Ok(())
    }

    pub async fn release_leases(&self, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE owner = ?")
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(query_error("releasing leases"))?;
        Ok(())
    }

    /// Ask a running deployment to stop starting hosts.
    /// Ids of deployments marked running (cheap: no JSON decoding).
    pub async fn running_deployments(&self) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query("SELECT id FROM deployments WHERE status = 'running' ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing running deployments"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn request_cancel(&self, id: i64) -> Result<bool, StoreError> {
        let changed = sqlx::query(
            "UPDATE deployments SET cancel_requested = 1 WHERE id = ? AND status = 'running'",
        )
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_error("requesting a cancel"))?
        .rows_affected();
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
                 cancel_requested = 0, pid = ? WHERE id = ?",
        )
        .bind(std::process::id() as i64)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_error("reopening a deployment"))?;
        Ok(())
    }

    /// Deployments marked running whose coordinator is gone become
    /// `interrupted`, with their unfinished host runs; returns their ids.
    pub async fn mark_interrupted(&self) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query("SELECT id, pid FROM deployments WHERE status = 'running'")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("finding running deployments"))?;
        let mut interrupted = Vec::new();
        for row in rows {
            let id: i64 = row.get("id");
            let pid: Option<i64> = row.get("pid");
            if pid.is_some_and(process_alive) {
                continue;
            }
            let message = format!(
                "the coordinator (pid {}) stopped while this deployment was running",
                pid.unwrap_or(0)
            );
            sqlx::query(
                "UPDATE deployments SET status = 'interrupted', finished_at = ?, error = ? WHERE id = ? AND status = 'running'",
            )
            .bind(now_ms())
            .bind(&message)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_error("marking a deployment interrupted"))?;
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
            interrupted.push(id);
        }
        Ok(interrupted)
    }
}

/// Serialising the few JSON columns without a fallible path at every call site.
mod erased {
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|_| "null".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Step;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        (dir, store)
    }

    fn new_deployment() -> NewDeployment {
        NewDeployment {
            trigger: "cli".into(),
            requested_by: "tester".into(),
            flake: "path:/fleet".into(),
            flake_rev: None,
            strategy: "smart".into(),
            options: serde_json::json!({ "parallel_limit": 4 }),
            hosts: vec!["web1".into(), "web2".into()],
        }
    }

    #[tokio::test]
    async fn deployments_runs_and_events_round_trip() {
        let (dir, store) = store().await;
        let id = store.create_deployment(&new_deployment()).await.unwrap();
        let mut run = HostRun::new(id, "web1");
        run.status = HostStatus::Deployed;
        run.from = SystemRef {
            path: Some("/nix/store/a".into()),
            generation: Some(1),
        };
        run.to = SystemRef {
            path: Some("/nix/store/b".into()),
            generation: Some(2),
        };
        run.steps.push(StepTiming {
            step: Step::Build,
            started_at: 1,
            finished_at: Some(2),
            ok: Some(true),
        });
        store.save_host_run(&run).await.unwrap();
        run.error = Some("none".into());
        store.save_host_run(&run).await.unwrap();
        store.record_host_result(&run).await.unwrap();
        let first = store
            .append_event(
                id,
                None,
                EventKind::Log {
                    message: "a".into(),
                },
            )
            .await
            .unwrap();
        let second = store
            .append_event(
                id,
                Some("web1"),
                EventKind::StepStarted { step: Step::Copy },
            )
            .await
            .unwrap();
        assert!(second.id > first.id);
        store
            .finish_deployment(id, DeploymentStatus::Succeeded, None)
            .await
            .unwrap();
        store.close().await;

        // Everything is still there after reopening.
        let store = Store::open(dir.path()).await.unwrap();
        let deployment = store.deployment(id).await.unwrap().unwrap();
        assert_eq!(deployment.status, DeploymentStatus::Succeeded);
        assert_eq!(deployment.hosts, ["web1", "web2"]);
        assert!(deployment.finished_at.is_some());
        assert_eq!(store.host_runs(id).await.unwrap(), vec![run]);
        let events = store.events(id, 0).await.unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].kind, EventKind::StepStarted { step: Step::Copy });
        assert_eq!(store.events(id, first.id).await.unwrap().len(), 1);
        let hosts = store.host_states().await.unwrap();
        assert_eq!(hosts[0].generation, Some(2));
        assert_eq!(hosts[0].last_status.as_deref(), Some("deployed"));
        assert_eq!(store.deployments(10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn leases_refuse_a_live_holder_and_take_over_expired_ones() {
        let (_dir, store) = store().await;
        let ttl = Duration::from_secs(60);
        assert_eq!(
            store.try_lease("h", "one", Some(1), ttl).await.unwrap(),
            Ok(())
        );
        // Same owner: renewal.
        assert_eq!(
            store.try_lease("h", "one", Some(1), ttl).await.unwrap(),
            Ok(())
        );
        // Another owner while this (live) process holds it: refused, naming the holder.
        let held = store
            .try_lease("h", "two", Some(2), ttl)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(held.deployment_id, Some(1));
        assert!(held.to_string().contains("deployment #1"));
        // An expired lease is taken over.
        store
            .renew_leases("one", None, Duration::ZERO)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            store.try_lease("h", "two", Some(2), ttl).await.unwrap(),
            Ok(())
        );
        assert_eq!(store.lease("h").await.unwrap().unwrap().owner, "two");
        store.release_leases("two").await.unwrap();
        assert_eq!(store.lease("h").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_dead_coordinators_deployment_becomes_interrupted() {
        let (_dir, store) = store().await;
        let id = store.create_deployment(&new_deployment()).await.unwrap();
        let mut run = HostRun::new(id, "web1");
        run.status = HostStatus::Running;
        store.save_host_run(&run).await.unwrap();
        // Our own process is alive: nothing happens.
        assert!(store.mark_interrupted().await.unwrap().is_empty());
        sqlx::query("UPDATE deployments SET pid = 999999999 WHERE id = ?")
            .bind(id)
            .execute(&store.pool)
            .await
            .unwrap();
        assert_eq!(store.mark_interrupted().await.unwrap(), vec![id]);
        let d = store.deployment(id).await.unwrap().unwrap();
        assert_eq!(d.status, DeploymentStatus::Interrupted);
        assert_eq!(
            store.host_runs(id).await.unwrap()[0].status,
            HostStatus::Interrupted
        );
        assert!(
            !store.request_cancel(id).await.unwrap(),
            "not running any more"
        );
    }

    #[tokio::test]
    async fn unreachable_probe_keeps_last_known_system() {
        let (_dir, store) = store().await;
        let sys = SystemRef {
            path: Some("/nix/store/a".into()),
            generation: Some(3),
        };
        store.record_probe("h", &sys, None).await.unwrap();
        store
            .record_probe("h", &SystemRef::default(), Some("connection refused"))
            .await
            .unwrap();
        let state = &store.host_states().await.unwrap()[0];
        assert_eq!(state.generation, Some(3));
        assert_eq!(state.probe_error.as_deref(), Some("connection refused"));
    }
}
