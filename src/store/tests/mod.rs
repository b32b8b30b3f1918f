//! The store's tests, each run against both backends: SQLite in a temporary
//! state directory, and a database of its own on the test process's real
//! PostgreSQL server (`nix_deploy_testkit::Postgres`).

use std::time::Duration;

use nix_deploy_core::options::DeployOptions;
use nix_deploy_testkit::{PgDatabase, Postgres};

use super::*;

mod cluster;
mod dashboard;
mod history;
mod ops;
mod watch;

/// One history for a test, on one backend.
pub(super) struct Db {
    backend: Backend,
    dir: tempfile::TempDir,
    pg: Option<PgDatabase>,
    pub leases: LeaseTiming,
}

impl Db {
    pub async fn new(backend: Backend) -> Db {
        let pg = (backend == Backend::Postgres).then(|| Postgres::database().unwrap());
        Db {
            backend,
            dir: tempfile::tempdir().unwrap(),
            pg,
            leases: LeaseTiming::default(),
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn options(&self) -> StoreOptions {
        let mut options = StoreOptions::sqlite(self.dir.path());
        options.leases = self.leases;
        if let Some(pg) = &self.pg {
            options.database = Database::Postgres(DatabaseUrl::parse(&pg.url).unwrap());
        }
        options
    }

    /// A coordinator on this history: a store handle of its own (its own
    /// holder id, as another process has).
    pub async fn open(&self) -> Store {
        Store::connect(&self.options()).await.unwrap()
    }

    /// Run SQL that only a test may run (simulating what the store never does).
    pub async fn sql(&self, store: &Store, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(store.pool())
            .await
            .unwrap();
    }
}

/// Each test twice: `NAME::sqlite` and `NAME::postgres`.
macro_rules! on_both_backends {
    ($(async fn $name:ident($db:ident) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                #[tokio::test]
                async fn sqlite() {
                    #[allow(unused_mut)]
                    let mut $db = Db::new(Backend::Sqlite).await;
                    $body
                }

                #[tokio::test]
                async fn postgres() {
                    #[allow(unused_mut)]
                    let mut $db = Db::new(Backend::Postgres).await;
                    $body
                }
            }
        )*
    };
}
pub(super) use on_both_backends;

pub(super) fn new_deployment() -> NewDeployment {
    NewDeployment {
        trigger: "cli".into(),
        requested_by: "tester".into(),
        flake: "path:/fleet".into(),
        flake_rev: None,
        strategy: "smart".into(),
        options: DeployOptions::default(),
        hosts: vec!["web1".into(), "web2".into()],
        queued: false,
        source: None,
    }
}

/// Wait for `what`, polling, up to a deadline.
pub(super) async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
