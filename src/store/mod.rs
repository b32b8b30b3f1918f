//! The history: deployments, host runs, events and the last known state of each
//! host, leases, the coordinators, the evaluation cache, and the watch's
//! state (each host's drift, the fleet's events, alerts to send), in SQLite
//! (one file, WAL, in the state directory: the default) or PostgreSQL
//! (shared by several coordinators), through the same queries ([`database`]).
//!
//! Invariant: whatever the engine reports (to a terminal, a stream or an API
//! client) has been written here first. Every write of a deployment's state
//! is fenced by the epoch its holder took it at ([`fence`]). Queries are
//! checked at runtime and covered by tests against both backends, migrated.
//!
//! Portable SQL only: `$N` placeholders, `BIGINT` integers (times are Unix
//! milliseconds), `RETURNING id`, `ON CONFLICT`, `COALESCE`; the database's
//! clock is `(SELECT now_ms FROM db_clock)`, a view each backend defines.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sqlx::AnyPool;

mod audit;
mod chat_requests;
mod cluster;
mod dashboard;
mod database;
mod deployments;
mod eval_cache;
mod fence;
mod gates;
mod handoff;
mod hooks;
mod leases;
mod listen;
mod liveness;
mod profiles;
mod provenance;
mod runs;
mod schedules;
mod stats;
#[cfg(test)]
mod tests;
mod watch;

pub use chat_requests::{ChatDecision, ChatRequest, NewChatRequest};
pub use cluster::{Heartbeat, Leader, Released, Role};
pub use dashboard::{HostHistoryEntry, LatestEvaluation};
pub use database::{
    Backend, DB_FILE, Database, DatabaseUrl, LeaseTiming, StoreOptions, schema_version,
};
pub use deployments::NewDeployment;
pub use eval_cache::{CachedEvaluation, EVAL_CACHE_ENTRIES};
pub use fence::Lost;
pub use gates::Decision;
pub use hooks::BranchHead;
pub use leases::Lease;
pub use listen::{EventListener, Notice};
pub use schedules::ScheduleRun;
pub use stats::{STEP_BUCKETS, StepHistogram};
pub use watch::{NewAlert, WatchChange, WatchRow};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the database {location}: {source}")]
    Open {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate the database {location}: {source}")]
    Migrate {
        location: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error(
        "the database {location} is at schema version {database}, newer than this nix-deploy knows (up to {known}): upgrade nix-deploy"
    )]
    SchemaTooNew {
        location: String,
        database: i64,
        known: i64,
    },
    #[error(
        "the database {location} is at schema version {database}, older than this nix-deploy's {known}, and migrating is turned off (`migrate = false`)"
    )]
    SchemaTooOld {
        location: String,
        database: i64,
        known: i64,
    },
    #[error("{}", superseded_message(*deployment_id, *epoch, *lost))]
    Superseded {
        deployment_id: i64,
        epoch: i64,
        lost: Lost,
    },
    #[error("deployment #{deployment_id} is not held by this coordinator")]
    NotHeld { deployment_id: i64 },
    #[error(
        "this coordinator is not the elected leader (any more): it does not write the fleet watch's state"
    )]
    NotLeader,
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

fn superseded_message(id: i64, epoch: i64, lost: Lost) -> String {
    match lost {
        Lost::Superseded => format!(
            "deployment #{id} was taken over by another coordinator (this one held epoch {epoch}): this coordinator no longer acts on it"
        ),
        Lost::Expired => format!(
            "deployment #{id}'s lease (epoch {epoch}) could not be renewed in time (the database was unreachable): this coordinator stopped acting on it"
        ),
    }
}

impl StoreError {
    /// Whether the database may well work again soon: locked by another
    /// writer, the disk full, an I/O error, no free connection, a server
    /// restarting. (A corrupt row, a failed migration or a lost lease will
    /// not get better by waiting.)
    pub fn is_transient(&self) -> bool {
        let StoreError::Query { source, .. } = self else {
            return false;
        };
        match source {
            sqlx::Error::Database(e) => {
                let code = e.code().unwrap_or_default();
                match code.parse::<i32>() {
                    // SQLite's primary result codes: BUSY 5, LOCKED 6, IOERR
                    // 10, FULL 13, CANTOPEN 14, PROTOCOL 15.
                    Ok(n) if code.len() < 5 => matches!(n & 0xff, 5 | 6 | 10 | 13 | 14 | 15),
                    // PostgreSQL's SQLSTATE classes: connection exceptions (08),
                    // serialization failures and deadlocks (40), insufficient
                    // resources (53), the server shutting down or starting (57P).
                    _ => {
                        code.starts_with("08")
                            || code.starts_with("40")
                            || code.starts_with("53")
                            || code.starts_with("57P")
                    }
                }
            }
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
            _ => false,
        }
    }

    /// Whether this coordinator lost the deployment it wrote to: it must
    /// stop working on it at once and touch no host again.
    pub fn is_superseded(&self) -> bool {
        matches!(self, StoreError::Superseded { .. })
    }
}

fn query_error(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { context, source }
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    database: Database,
    /// How errors name the database: a path, or the URL without password.
    location: String,
    state_dir: PathBuf,
    /// This process's liveness lock: held while any handle is open. Its id
    /// is this coordinator's, in deployments, leases and `coordinators`.
    lock: Arc<liveness::ProcessLock>,
    /// Processes found dead when this one opened the history.
    dead_holders: Arc<Vec<String>>,
    /// What opening had to make owner-only (see [`Store::tightened`]).
    tightened: Arc<Vec<String>>,
    /// The deployments this process holds, at their epochs.
    ownership: Arc<fence::Ownership>,
    leases: LeaseTiming,
}

impl Store {
    /// Open (creating if needed) the SQLite history in `state_dir` and apply
    /// migrations.
    pub async fn open(state_dir: &Path) -> Result<Self, StoreError> {
        Self::connect(&StoreOptions::sqlite(state_dir)).await
    }

    /// Open the history `options` names, check its schema version and
    /// migrate it as allowed.
    pub async fn connect(options: &StoreOptions) -> Result<Self, StoreError> {
        let state_dir = &options.state_dir;
        // The state directory is made owner-only first, and everything in it
        // tightened ([`crate::paths::secure_state_dir`]; see
        // [`Store::tightened`]); a SQLite database is created 0600, so its
        // WAL and shared memory, which SQLite creates with the database's
        // mode, are too.
        let create_error = |source| StoreError::CreateDir {
            path: state_dir.to_path_buf(),
            source,
        };
        let tightened = crate::paths::secure_state_dir(state_dir).map_err(create_error)?;
        if matches!(options.database, Database::Sqlite) {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(state_dir.join(DB_FILE))
                .map_err(create_error)?;
        }
        let location = match &options.database {
            Database::Sqlite => state_dir.join(DB_FILE).display().to_string(),
            Database::Postgres(url) => url.to_string(),
        };
        let pool = database::open_pool(options, &location).await?;
        let lock = liveness::ProcessLock::acquire(state_dir)?;
        let dead = liveness::remove_dead(state_dir);
        Ok(Store {
            pool,
            database: options.database.clone(),
            location,
            state_dir: state_dir.to_path_buf(),
            lock: Arc::new(lock),
            dead_holders: Arc::new(dead),
            tightened: Arc::new(tightened),
            ownership: Arc::default(),
            leases: options.leases,
        })
    }

    /// Coordinators of this history found dead when it was opened: what they
    /// left behind (ssh control masters) can be cleaned up.
    pub fn dead_holders(&self) -> &[String] {
        &self.dead_holders
    }

    /// Paths in the state directory that were readable by others when this
    /// history was opened and are owner-only now, one line each, for the
    /// caller to say.
    pub fn tightened(&self) -> &[String] {
        &self.tightened
    }

    /// This process, as deployments, leases and the coordinators table name it.
    pub fn holder(&self) -> &str {
        self.lock.holder()
    }

    pub fn backend(&self) -> Backend {
        self.database.backend()
    }

    /// The database, as errors and the API name it (never with a password).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// How this process holds its leases.
    pub fn lease_timing(&self) -> LeaseTiming {
        self.leases
    }

    /// Whether a holder's liveness is its lease's expiry (PostgreSQL: the
    /// coordinators may be on different machines) rather than its flock in
    /// the state directory (SQLite: one machine).
    fn liveness_by_lease(&self) -> bool {
        self.backend() == Backend::Postgres
    }

    /// Whether the process behind `holder` still runs, for SQLite, where
    /// every coordinator is on this machine. Rows written before holders
    /// existed (none) fall back to "is there such a pid at all".
    pub fn holder_alive(&self, holder: Option<&str>, pid: Option<i64>) -> bool {
        match holder {
            Some(holder) => liveness::alive(&self.state_dir, holder),
            None => pid.is_some_and(|pid| {
                pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
            }),
        }
    }

    /// The state directory (home of the SQLite file, the coordinator's GC
    /// roots and liveness locks).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// For read-only reporting queries (metrics) that live next to their users.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The epoch this process holds deployment `id` at (what an activation
    /// token carries), or why it holds none.
    pub fn epoch(&self, id: i64) -> Result<i64, StoreError> {
        self.ownership.epoch(id)
    }

    /// Cancelled when this process loses deployment `id` (superseded, or its
    /// lease not renewed in time): stop working on it at once. `None` when
    /// this process does not hold it.
    pub fn lost_signal(&self, id: i64) -> Option<tokio_util::sync::CancellationToken> {
        self.ownership.signal(id)
    }

    /// A transaction that may write deployment `id`'s state: its row locked
    /// at the epoch this process holds it at. Refused (and the deployment
    /// marked lost here) when another coordinator took it.
    async fn fenced(
        &self,
        id: i64,
        context: &'static str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        let epoch = self.ownership.epoch(id)?;
        let mut tx = self.pool.begin().await.map_err(query_error(context))?;
        if !fence::guard(&mut tx, id, epoch)
            .await
            .map_err(query_error(context))?
        {
            drop(tx);
            self.ownership.lose(id, epoch, Lost::Superseded);
            return Err(StoreError::Superseded {
                deployment_id: id,
                epoch,
                lost: Lost::Superseded,
            });
        }
        Ok(tx)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A document as the JSON text of its column. Our types always serialise.
fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// `$first, $first+1, …` for `n` values: a parameter list for `IN (…)`,
/// the same text for both backends (callers keep `n` bounded: both limit
/// the parameters of a query).
fn parameters(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How many values one `IN (…)` list holds at most.
const IN_LIST: usize = 500;
