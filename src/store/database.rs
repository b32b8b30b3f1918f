//! Where the history lives, and opening it: SQLite (a file in the state
//! directory, the default) or PostgreSQL (a URL, shared by several
//! coordinators). Both are reached through sqlx's `Any` driver with the same
//! queries (`$N` placeholders, integers as `BIGINT`); each has its own
//! migrations (`migrations/sqlite/`, `migrations/postgres/`, the same
//! versions), and a database at another schema version than ours is refused
//! with both versions named, never half-migrated.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migrate, Migrator};
use sqlx::{AnyConnection, AnyPool};

use super::StoreError;

/// The two backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgresql",
        }
    }
}

/// The history's migrations, per backend: the same versions, each file in
/// the dialect of its backend.
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

pub(super) fn migrator(backend: Backend) -> &'static Migrator {
    match backend {
        Backend::Sqlite => &SQLITE_MIGRATIONS,
        Backend::Postgres => &POSTGRES_MIGRATIONS,
    }
}

/// The newest schema version this build knows.
pub fn schema_version(backend: Backend) -> i64 {
    migrator(backend)
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0)
}

/// A PostgreSQL URL. It may carry a password: it prints (in errors, logs,
/// the API) without it, and is only ever handed to the driver.
#[derive(Clone)]
pub struct DatabaseUrl(url::Url);

impl DatabaseUrl {
    /// `postgres://` or `postgresql://` URLs only; anything else is bad input
    /// (named without its password).
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = url::Url::parse(text.trim()).map_err(|e| {
            format!("the database URL is not a URL ({e}); expected postgresql://USER@HOST/DATABASE")
        })?;
        match url.scheme() {
            "postgres" | "postgresql" => Ok(DatabaseUrl(url)),
            other => Err(format!(
                "unsupported database URL scheme `{other}` in {}: expected postgresql:// (leave `database` unset for SQLite in the state directory)",
                DatabaseUrl(url.clone())
            )),
        }
    }

    /// The URL with `password` set (read from a file or a credential, so it
    /// is never written in a configuration).
    pub fn with_password(mut self, password: &str) -> Self {
        let _ = self.0.set_password(Some(password));
        self
    }

    /// Whether the URL itself carries a password.
    pub fn has_password(&self) -> bool {
        self.0.password().is_some() || self.0.query_pairs().any(|(k, _)| k == "password")
    }

    /// The whole URL, password included: for the driver only.
    pub(super) fn expose(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for DatabaseUrl {
    /// The URL without its password (neither in the user part nor as a
    /// `password=` parameter).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        if shown.query_pairs().any(|(k, _)| k == "password") {
            let pairs: Vec<(String, String)> = shown
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "password" { "***".into() } else { v };
                    (k.into_owned(), v.into_owned())
                })
                .collect();
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
        f.write_str(shown.as_str())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// Where the history lives.
#[derive(Clone, Debug)]
pub enum Database {
    /// `nix-deploy.db` in the state directory.
    Sqlite,
    Postgres(DatabaseUrl),
}

impl Database {
    pub fn backend(&self) -> Backend {
        match self {
            Database::Sqlite => Backend::Sqlite,
            Database::Postgres(_) => Backend::Postgres,
        }
    }
}

/// How a process holds its leases: how often it renews them, and how long
/// one lasts unrenewed (by the database's clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    pub heartbeat: Duration,
    pub ttl: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            heartbeat: Duration::from_secs(5),
            ttl: Duration::from_secs(15),
        }
    }
}

impl LeaseTiming {
    pub const MIN_HEARTBEAT: Duration = Duration::from_millis(200);
    pub const MAX_TTL: Duration = Duration::from_secs(600);

    /// Bounds: a heartbeat of at least 200 ms, a TTL of at most 10 minutes
    /// and at least three heartbeats (a lease survives two lost renewals).
    pub fn check(&self) -> Result<(), String> {
        if self.heartbeat < Self::MIN_HEARTBEAT {
            return Err(format!(
                "the lease heartbeat must be at least {:?}, not {:?}",
                Self::MIN_HEARTBEAT,
                self.heartbeat
            ));
        }
        if self.ttl > Self::MAX_TTL {
            return Err(format!(
                "the lease TTL must be at most {:?}, not {:?}",
                Self::MAX_TTL,
                self.ttl
            ));
        }
        if self.ttl < self.heartbeat * 3 {
            return Err(format!(
                "the lease TTL ({:?}) must be at least three heartbeats ({:?} each)",
                self.ttl, self.heartbeat
            ));
        }
        Ok(())
    }

    /// How long after the start of its last successful renewal a holder may
    /// still act: one heartbeat short of the TTL, so it stops before anyone
    /// else may take over (the database counts the TTL from a later moment).
    pub fn valid_for(&self) -> Duration {
        self.ttl.saturating_sub(self.heartbeat)
    }
}

/// What [`super::Store::connect`] needs.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub database: Database,
    /// Home of the SQLite file, the liveness locks and the GC roots.
    pub state_dir: PathBuf,
    /// Apply pending migrations (false: an older schema is refused).
    pub migrate: bool,
    pub leases: LeaseTiming,
}

impl StoreOptions {
    pub fn sqlite(state_dir: &Path) -> Self {
        StoreOptions {
            database: Database::Sqlite,
            state_dir: state_dir.to_path_buf(),
            migrate: true,
            leases: LeaseTiming::default(),
        }
    }
}

pub const DB_FILE: &str = "nix-deploy.db";

/// A pool on `database`, its schema checked and migrated as allowed.
/// `location` names it in errors (a path, or the URL without password).
pub(super) async fn open_pool(
    options: &StoreOptions,
    location: &str,
) -> Result<AnyPool, StoreError> {
    sqlx::any::install_default_drivers();
    let open_error = |source| StoreError::Open {
        location: location.to_string(),
        source,
    };
    let pool = match &options.database {
        Database::Sqlite => {
            let path = options.state_dir.join(DB_FILE);
            let url = url::Url::from_file_path(&path)
                .map_err(|()| {
                    open_error(sqlx::Error::Configuration(
                        format!("{} is not an absolute path", path.display()).into(),
                    ))
                })?
                .as_str()
                .replacen("file://", "sqlite://", 1);
            // Readers (API, CLI) never wait behind the engine's writes in WAL
            // mode, as long as they have a connection of their own.
            AnyPoolOptions::new()
                .max_connections(8)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // FULL: what was reported survives a power loss too
                        // (NORMAL only survives a killed process).
                        sqlx::query(
                            "PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL",
                        )
                        .execute(conn)
                        .await?;
                        Ok(())
                    })
                })
                .connect(&format!("{url}?mode=rwc"))
                .await
                .map_err(open_error)?
        }
        Database::Postgres(url) => AnyPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url.expose())
            .await
            .map_err(open_error)?,
    };
    if options.database.backend() == Backend::Sqlite {
        // Persistent in the file: set once.
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&pool)
            .await
            .map_err(open_error)?;
    }
    // sqlx's migration lock is PostgreSQL's advisory lock and nothing on
    // SQLite: two processes opening a new history at once would both apply
    // a migration (and one fail). On SQLite one checks and migrates while
    // the others wait on an flock beside the database.
    let migrating = match options.database.backend() {
        Backend::Sqlite => Some(migration_lock(&options.state_dir, location).await?),
        Backend::Postgres => None,
    };
    check_schema(&pool, options, location).await?;
    migrator(options.database.backend())
        .run(&pool)
        .await
        .map_err(|source| StoreError::Migrate {
            location: location.to_string(),
            source,
        })?;
    drop(migrating);
    Ok(pool)
}

/// An exclusive `flock` on `STATE/migrate.lock`, held while this process
/// checks and migrates a SQLite history (waited for on a blocking thread).
async fn migration_lock(state_dir: &Path, location: &str) -> Result<std::fs::File, StoreError> {
    let path = state_dir.join("migrate.lock");
    let error = |source| StoreError::Open {
        location: location.to_string(),
        source: sqlx::Error::Io(source),
    };
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(error)?
    };
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(|e| error(std::io::Error::other(e)))?
        .map_err(error)
}

/// Refuse a database whose schema is newer than ours (a newer nix-deploy
/// wrote it), or older when migrating is not allowed, naming both versions.
async fn check_schema(
    pool: &AnyPool,
    options: &StoreOptions,
    location: &str,
) -> Result<(), StoreError> {
    let migrate_error = |source| StoreError::Migrate {
        location: location.to_string(),
        source,
    };
    let backend = options.database.backend();
    let known = schema_version(backend);
    let mut conn = pool.acquire().await.map_err(|source| StoreError::Open {
        location: location.to_string(),
        source,
    })?;
    let conn: &mut AnyConnection = &mut conn;
    conn.lock().await.map_err(migrate_error)?;
    let applied = async {
        conn.ensure_migrations_table("_sqlx_migrations").await?;
        conn.list_applied_migrations("_sqlx_migrations").await
    }
    .await;
    conn.unlock().await.map_err(migrate_error)?;
    let applied = applied.map_err(migrate_error)?;
    let database = applied.iter().map(|m| m.version).max().unwrap_or(0);
    let unknown = applied
        .iter()
        .any(|m| !migrator(backend).version_exists(m.version));
    if database > known || unknown {
        return Err(StoreError::SchemaTooNew {
            location: location.to_string(),
            database,
            known,
        });
    }
    let pending = migrator(backend)
        .iter()
        .any(|m| !applied.iter().any(|a| a.version == m.version));
    if pending && !options.migrate && database > 0 {
        return Err(StoreError::SchemaTooOld {
            location: location.to_string(),
            database,
            known,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_print_without_their_password() {
        let url = DatabaseUrl::parse("postgresql://deploy:s3cret@db.example:5432/fleet").unwrap();
        assert_eq!(
            url.to_string(),
            "postgresql://deploy:***@db.example:5432/fleet"
        );
        assert!(!format!("{url:?}").contains("s3cret"));
        let url =
            DatabaseUrl::parse("postgres:///fleet?host=/run/postgresql&password=s3cret").unwrap();
        assert!(!url.to_string().contains("s3cret"), "{url}");
        assert!(
            url.to_string().contains("host=%2Frun%2Fpostgresql"),
            "{url}"
        );
        let url = DatabaseUrl::parse("postgresql://deploy@db/fleet")
            .unwrap()
            .with_password("from-a-file");
        assert!(url.expose().contains("from-a-file"));
        assert!(!url.to_string().contains("from-a-file"));
        let refused = DatabaseUrl::parse("mysql://root:s3cret@db/fleet").unwrap_err();
        assert!(refused.contains("mysql"), "{refused}");
        assert!(!refused.contains("s3cret"), "{refused}");
        assert!(DatabaseUrl::parse("not a url").is_err());
    }

    #[test]
    fn lease_timing_is_bounded() {
        assert!(LeaseTiming::default().check().is_ok());
        let timing = |heartbeat, ttl| LeaseTiming {
            heartbeat: Duration::from_millis(heartbeat),
            ttl: Duration::from_millis(ttl),
        };
        assert!(timing(100, 1000).check().is_err());
        assert!(timing(5000, 10_000).check().is_err());
        assert!(timing(5000, 3_600_000).check().is_err());
        assert!(timing(1000, 3000).check().is_ok());
        assert_eq!(timing(5000, 15_000).valid_for(), Duration::from_secs(10));
    }

    #[test]
    fn sqlite_migrations_keep_the_checksums_older_histories_applied() {
        // As stored in `_sqlx_migrations` by nix-deploy before PostgreSQL
        // (a changed byte would make every existing history refuse to open).
        let applied = [
            "e6d2c9cadd191bd9cf7138a27c51ac368cbdabde4a82e01c8af27dfd539c7137a2a0b1536b79038ffe2fa2c5e7f2c5d6",
            "c2dfdd8b4919b977a21b0e8a5b735366ae21594d518db418665cdf1f92bd86e2f842ecf025196159f9d9b658d306340c",
            "15913fe085b670655369505aeb3c4f0f4efb8944d872dcf35611bf5bc56c43100c281d7fc2c36d0f58faf79ee0bcecfc",
            "ea6e9f9e9e35e1b4a29a3fcf14d60dbb9abba31bbcdcaa1d4d30f119d90a4bdc78abce080c0d1dfd2ae6e5d9e32e894e",
            "bd9b0fa1b83436cb269fa2d7e1ba86a7e3be9021de4818f3d18dcaad7cb1f19667e815777837f2a19ba4b1afb6562cd9",
            "22a2b10a7f1bf72c820427e69abdc6f483f81f23ec44b1f2d4b8dc776e9d26e6797977dd17f904ba3eee35baa8d74a28",
        ];
        for (version, checksum) in (1..).zip(applied) {
            let migration = migrator(Backend::Sqlite)
                .iter()
                .find(|m| m.version == version)
                .unwrap();
            assert_eq!(
                hex::encode(&*migration.checksum),
                checksum,
                "migration {version}"
            );
        }
    }

    #[test]
    fn both_backends_have_the_same_migrations() {
        let versions = |backend| {
            migrator(backend)
                .iter()
                .map(|m| (m.version, m.description.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(versions(Backend::Sqlite), versions(Backend::Postgres));
        // Nothing at the top of `migrations/`: each file belongs to a backend.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let stray: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        assert!(
            stray.is_empty(),
            "migrations {stray:?} belong in migrations/sqlite/ and migrations/postgres/ (see ARCHITECTURE.md)"
        );
    }
}
