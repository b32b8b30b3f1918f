//! The history: deployments, host runs, events and the last known state of each
//! host, and the evaluation cache, in one SQLite file (WAL) in the state
//! directory.
//!
//! Invariant: whatever the engine reports (to a terminal, a stream or an API
//! client) has been written here first. Queries are checked at runtime and
//! covered by tests against a migrated database.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

mod dashboard;
mod deployments;
mod eval_cache;
mod hooks;
mod leases;
mod liveness;
mod runs;
mod stats;

use std::sync::Arc;

pub use dashboard::{HostHistoryEntry, LatestEvaluation};
pub use deployments::NewDeployment;
pub use eval_cache::{CachedEvaluation, EVAL_CACHE_ENTRIES};
pub use hooks::BranchHead;
pub use leases::Lease;
pub use stats::{STEP_BUCKETS, StepHistogram};

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

impl StoreError {
    /// Whether the database may well work again soon: locked by another
    /// writer, the disk full, an I/O error, no free connection. (A corrupt
    /// row or a failed migration will not get better by waiting.)
    pub fn is_transient(&self) -> bool {
        let StoreError::Query { source, .. } = self else {
            return false;
        };
        match source {
            sqlx::Error::Database(e) => {
                // SQLite's primary result codes: BUSY 5, LOCKED 6, IOERR 10,
                // FULL 13, CANTOPEN 14, PROTOCOL 15.
                let code = e.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0) & 0xff;
                matches!(code, 5 | 6 | 10 | 13 | 14 | 15)
            }
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
            _ => false,
        }
    }
}

fn query_error(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { context, source }
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
    state_dir: PathBuf,
    /// This process's liveness lock: held while any handle is open.
    lock: Arc<liveness::ProcessLock>,
    /// Processes found dead when this one opened the history.
    dead_holders: Arc<Vec<String>>,
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
            // FULL: what was reported survives a power loss too (NORMAL
            // only survives a killed process).
            .synchronous(SqliteSynchronous::Full)
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
        let lock = liveness::ProcessLock::acquire(state_dir)?;
        let dead = liveness::remove_dead(state_dir);
        Ok(Store {
            pool,
            path,
            state_dir: state_dir.to_path_buf(),
            lock: Arc::new(lock),
            dead_holders: Arc::new(dead),
        })
    }

    /// Coordinators of this history found dead when it was opened: what they
    /// left behind (ssh control masters) can be cleaned up.
    pub fn dead_holders(&self) -> &[String] {
        &self.dead_holders
    }

    /// This process, as deployments and leases name it.
    pub fn holder(&self) -> &str {
        self.lock.holder()
    }

    /// Whether the process behind `holder` still runs. Rows written before
    /// holders existed (none) fall back to "is there such a pid at all".
    pub fn holder_alive(&self, holder: Option<&str>, pid: Option<i64>) -> bool {
        match holder {
            Some(holder) => liveness::alive(&self.state_dir, holder),
            None => pid.is_some_and(|pid| {
                pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state directory the database lives in (also home of the
    /// coordinator's GC roots and liveness locks).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// For read-only reporting queries (metrics) that live next to their users.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A document as the JSON text of its column. Our types always serialise.
fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix_deploy_core::events::{DeploymentStatus, EventKind, HostStatus, Step, SystemRef};
    use nix_deploy_core::options::DeployOptions;
    use nix_deploy_core::run::{HostRun, StepTiming};

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
            options: DeployOptions::default(),
            hosts: vec!["web1".into(), "web2".into()],
            queued: false,
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
        assert_eq!(deployment.selected, ["web1", "web2"]);
        assert_eq!(deployment.hosts, vec![run.clone()]);
        assert!(deployment.time.finished_at.is_some());
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
    async fn leases_refuse_a_live_holder_and_take_over_a_dead_ones() {
        let (dir, store) = store().await;
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
        // Expired, but its holder lives: still refused.
        store
            .renew_leases("one", None, Duration::ZERO)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            store
                .try_lease("h", "two", Some(2), ttl)
                .await
                .unwrap()
                .is_err()
        );
        // Another process (another store handle, its own lock) sees the same.
        let other = Store::open(dir.path()).await.unwrap();
        assert!(
            other
                .try_lease("h", "three", None, ttl)
                .await
                .unwrap()
                .is_err()
        );
        // The holder is gone (its lock released): taken over.
        sqlx::query("UPDATE leases SET holder = 'deadbeef'")
            .execute(&store.pool)
            .await
            .unwrap();
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
        sqlx::query("UPDATE deployments SET pid = 999999999, holder = 'deadbeef' WHERE id = ?")
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
            !store.request_cancel(id, "tester").await.unwrap(),
            "not running any more"
        );
    }

    #[tokio::test]
    async fn exec_runs_goals_outputs_and_reboots_round_trip() {
        use nix_deploy_core::exec::{CommandOutput, ExecSpec};
        use nix_deploy_core::goal::Goal;
        use nix_deploy_core::run::{RebootRecord, RunKind};
        let (_dir, store) = store().await;
        let spec = ExecSpec {
            command: vec!["uptime".into()],
            parallel_limit: 3,
            timeout: Duration::from_secs(30),
        };
        let id = store
            .create_run(&new_deployment(), RunKind::Exec, Some(&spec))
            .await
            .unwrap();
        let mut run = HostRun::new(id, "web1");
        run.status = HostStatus::Succeeded;
        run.output = Some(CommandOutput {
            exit_code: Some(0),
            stdout: "up 3 days".into(),
            stderr: String::new(),
        });
        store.save_host_run(&run).await.unwrap();
        let exec = store.deployment(id).await.unwrap().unwrap();
        assert_eq!(exec.kind, RunKind::Exec);
        assert_eq!(exec.exec, Some(spec));
        assert_eq!(exec.hosts, vec![run]);
        // Plain deployments are still deployments, and an exec is no one's
        // history for estimates.
        let deploy = store.create_deployment(&new_deployment()).await.unwrap();
        assert_eq!(
            store.deployment(deploy).await.unwrap().unwrap().kind,
            RunKind::Deploy
        );
        let mut failed = HostRun::new(id, "web2");
        failed.status = HostStatus::Failed;
        failed.time.finished_at = Some(1);
        store.save_host_run(&failed).await.unwrap();
        assert!(store.recent_host_runs("web2", 10).await.unwrap().is_empty());

        // A boot deployment: the host keeps running the old system and
        // boots the new one next: pending a reboot.
        let mut boot = HostRun::new(deploy, "db1");
        boot.status = HostStatus::Deployed;
        boot.goal = Some(Goal::Boot);
        boot.from = SystemRef {
            path: Some("/nix/store/old".into()),
            generation: Some(1),
        };
        boot.to = SystemRef {
            path: Some("/nix/store/new".into()),
            generation: Some(2),
        };
        store.save_host_run(&boot).await.unwrap();
        store.record_host_result(&boot).await.unwrap();
        let state = &store.host_states().await.unwrap()[0];
        assert_eq!(state.current_path.as_deref(), Some("/nix/store/old"));
        assert_eq!(state.generation, Some(2));
        assert_eq!(state.boot_path.as_deref(), Some("/nix/store/new"));
        assert!(state.pending_reboot);
        // Rebooted into it: nothing pending.
        boot.reboot = Some(RebootRecord {
            boot_id_before: Some("a".into()),
            boot_id_after: Some("b".into()),
            system: Some("/nix/store/new".into()),
        });
        store.save_host_run(&boot).await.unwrap();
        store.record_host_result(&boot).await.unwrap();
        let state = &store.host_states().await.unwrap()[0];
        assert_eq!(state.current_path.as_deref(), Some("/nix/store/new"));
        assert!(!state.pending_reboot);
        let back = store.host_runs(deploy).await.unwrap();
        assert_eq!(back, vec![boot]);
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

    #[tokio::test]
    async fn hosts_touched_since_a_moment_are_the_ones_with_runs_after_it() {
        let (_dir, store) = store().await;
        let id = store.create_deployment(&new_deployment()).await.unwrap();
        let mut old = HostRun::new(id, "web1");
        old.time.started_at = Some(100);
        old.time.finished_at = Some(200);
        store.save_host_run(&old).await.unwrap();
        let mut unfinished = HostRun::new(id, "web2");
        unfinished.time.started_at = Some(100);
        store.save_host_run(&unfinished).await.unwrap();
        let hosts = ["web1".to_string(), "web2".to_string(), "web3".to_string()];
        assert_eq!(
            store.hosts_touched_since(&hosts, 300).await.unwrap(),
            ["web2"]
        );
        assert_eq!(
            store.hosts_touched_since(&hosts, 150).await.unwrap(),
            ["web1", "web2"]
        );
    }
}
