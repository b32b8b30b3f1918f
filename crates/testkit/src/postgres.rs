//! Throwaway PostgreSQL servers for tests: `initdb` into a fresh
//! `/tmp/ndpg-XXXXXX`, a server listening only on a unix socket in that
//! directory (no TCP at all), stopped by its pid and removed at the end.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the
//! directory belongs to the `postgres` user Debian's packages create, and
//! `initdb` and the server run as that user (`setpriv`). Clients connect as
//! the database user `postgres` with `trust` authentication: the socket is
//! in a directory only its owner and root can enter.
//!
//! [`Postgres::shared`] is one server per test process, kept while any test
//! holds it, with a database of its own per test ([`Postgres::database`]);
//! a test that stops or restarts its server starts its own
//! ([`Postgres::start`]). Like a fleet, each server has a reaper that stops
//! it and removes its directory if the test process dies without unwinding.
//!
//! Binaries: `NIX_DEPLOY_TEST_PG_BIN`, else the newest
//! `/usr/lib/postgresql/*/bin` (Debian's layout), else `initdb` on `PATH`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::sys::{checked_stdout, run_with_timeout, send_signal};

/// How long a server may take to start or stop.
const PG_TIMEOUT: Duration = Duration::from_secs(60);

/// One PostgreSQL server.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    /// The uid and gid it runs as (when we are root).
    run_as: Option<(u32, u32)>,
    server: Mutex<Option<Child>>,
    reaper: Mutex<Option<(Child, ChildStdin)>>,
    databases: AtomicU64,
}

/// A database of its own on a server, for one test.
pub struct PgDatabase {
    pub url: String,
    pub name: String,
    /// Keeps the (shared) server running while the database is in use.
    pub server: Arc<Postgres>,
}

impl Postgres {
    /// A new server of its own.
    pub fn start() -> Result<Postgres> {
        let bin = bin_dir()?;
        let run_as = postgres_user()?;
        let dir = tempfile::Builder::new()
            .prefix("ndpg-")
            .tempdir_in("/tmp")
            .context("creating the PostgreSQL directory")?
            .keep();
        let mut server = Postgres {
            dir,
            bin,
            run_as,
            server: Mutex::new(None),
            reaper: Mutex::new(None),
            databases: AtomicU64::new(0),
        };
        server.init().inspect_err(|_| server.remove())?;
        Ok(server)
    }

    /// The test process's shared server, started by the first caller and
    /// stopped when the last holder lets it go.
    pub fn shared() -> Result<Arc<Postgres>> {
        static SHARED: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(server) = slot.upgrade() {
            return Ok(server);
        }
        let server = Arc::new(Postgres::start()?);
        *slot = Arc::downgrade(&server);
        Ok(server)
    }

    /// A fresh, empty database on the shared server.
    pub fn database() -> Result<PgDatabase> {
        let server = Postgres::shared()?;
        let name = server.create_database()?;
        Ok(PgDatabase {
            url: server.url(&name),
            name,
            server,
        })
    }

    fn init(&mut self) -> Result<()> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&self.dir, Some(uid), Some(gid))
                .context("giving the PostgreSQL directory to the postgres user")?;
        }
        let data = self.data_dir();
        let mut initdb = self.command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        let out = run_with_timeout(initdb, PG_TIMEOUT).context("running initdb")?;
        checked_stdout(out).context("initdb")?;
        self.spawn_reaper()?;
        self.run()
    }

    /// The directory of the server's socket (and its data, log).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// The URL of database `name`, over the socket.
    pub fn url(&self, name: &str) -> String {
        let dir: String = self
            .dir
            .to_string_lossy()
            .bytes()
            .map(|b| match b {
                b'/' => "%2F".to_string(),
                b if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' => {
                    (b as char).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect();
        format!("postgresql://postgres@localhost/{name}?host={dir}")
    }

    /// Create a new database; returns its name.
    pub fn create_database(&self) -> Result<String> {
        let n = self.databases.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}_{n}", std::process::id());
        self.psql(&format!("CREATE DATABASE {name}"))?;
        Ok(name)
    }

    /// Run one SQL command on the `postgres` database (as its superuser).
    pub fn psql(&self, sql: &str) -> Result<String> {
        let mut psql = Command::new(self.bin.join("psql"));
        psql.arg("-h").arg(&self.dir).args([
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            sql,
        ]);
        let out = run_with_timeout(psql, PG_TIMEOUT).with_context(|| format!("psql -c {sql}"))?;
        checked_stdout(out).with_context(|| format!("psql -c {sql}"))
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner());
        server.as_ref().map(|c| c.id())
    }

    /// Start the server (again) on its data and socket.
    pub fn run(&self) -> Result<()> {
        let mut slot = self.server.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            bail!(
                "the PostgreSQL server in {} already runs",
                self.dir.display()
            );
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .context("opening the PostgreSQL log")?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(self.dir.join("postgres.log"), Some(uid), Some(gid))?;
        }
        let _ = fs::remove_file(self.data_dir().join("postmaster.pid"));
        let mut postgres = self.command("postgres");
        postgres
            .arg("-D")
            .arg(self.data_dir())
            .arg("-k")
            .arg(&self.dir)
            // No TCP at all: the unix socket only.
            .args(["-c", "listen_addresses="])
            .args(["-c", "max_connections=300"])
            // A throwaway server: nothing to make durable across crashes of
            // this machine.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = postgres.spawn().context("starting postgres")?;
        let started = Instant::now();
        loop {
            let pidfile =
                fs::read_to_string(self.data_dir().join("postmaster.pid")).unwrap_or_default();
            if pidfile.lines().nth(7).is_some_and(|l| l.trim() == "ready") {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "postgres exited ({status}) while starting; its log:\n{}",
                    crate::sys::tail(&self.log(), 20)
                );
            }
            if started.elapsed() > PG_TIMEOUT {
                send_signal(child.id() as i32, libc::SIGKILL);
                let _ = child.wait();
                bail!("postgres did not start in {PG_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *slot = Some(child);
        Ok(())
    }

    /// Stop the server (a fast shutdown: connections are closed, the data
    /// kept), waiting for it to exit.
    pub fn stop(&self) -> Result<()> {
        self.signal_and_wait(libc::SIGINT)
    }

    /// Kill the server at once (SIGKILL), as a crash would.
    pub fn kill(&self) -> Result<()> {
        self.signal_and_wait(libc::SIGKILL)
    }

    /// Stop and start again: every connection is lost, the data kept.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.run()
    }

    fn signal_and_wait(&self, signal: i32) -> Result<()> {
        let Some(mut child) = self.server.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        send_signal(child.id() as i32, signal);
        let started = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if started.elapsed() > PG_TIMEOUT {
                send_signal(child.id() as i32, libc::SIGKILL);
                child.wait()?;
                bail!("postgres did not stop in {PG_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A command running one of the server's binaries, as its user.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.run_as {
            Some((uid, gid)) => {
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(path);
                cmd
            }
            None => Command::new(path),
        }
    }

    fn spawn_reaper(&mut self) -> Result<()> {
        const SCRIPT: &str = r#"trap '' HUP INT PIPE
IFS= read -r line
[ "$line" = stop ] && exit 0
pid=$(/usr/bin/head -n 1 "$1/data/postmaster.pid" 2>/dev/null)
if [ -n "$pid" ]; then
  /bin/kill -INT "$pid" 2>/dev/null
  n=0
  while /bin/kill -0 "$pid" 2>/dev/null && [ $n -lt 50 ]; do /bin/sleep 0.1; n=$((n+1)); done
  /bin/kill -9 "$pid" 2>/dev/null
fi
/bin/rm -rf -- "$1"
"#;
        let mut child = Command::new("setsid")
            .args(["sh", "-c", SCRIPT, "testkit-pg-reaper"])
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning the PostgreSQL reaper")?;
        let stdin = child.stdin.take().context("reaper stdin")?;
        *self.reaper.lock().unwrap_or_else(|p| p.into_inner()) = Some((child, stdin));
        Ok(())
    }

    fn remove(&self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop();
        if let Some((mut child, mut stdin)) =
            self.reaper.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            let _ = writeln!(stdin, "stop");
            drop(stdin);
            let _ = child.wait();
        }
        self.remove();
    }
}

/// Where PostgreSQL's server binaries are.
fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("NIX_DEPLOY_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").exists())
        .context("no PostgreSQL server binaries (initdb): run scripts/setup.sh, or set NIX_DEPLOY_TEST_PG_BIN")
}

/// The `postgres` user's uid and gid when we are root (PostgreSQL refuses
/// root), else `None` (it runs as us).
fn postgres_user() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid(2) has no failure mode and touches no memory.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() > 3 && fields[0] == "postgres")
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .map(Some)
        .context("running as root, but there is no `postgres` user to run PostgreSQL as (scripts/setup.sh installs Debian's postgresql, which creates it)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_serves_databases_over_its_socket_and_survives_a_restart() {
        let server = Postgres::start().unwrap();
        let name = server.create_database().unwrap();
        assert!(
            server.url(&name).contains("host=%2Ftmp%2Fndpg-"),
            "{}",
            server.url(&name)
        );
        let list = server.psql("SELECT datname FROM pg_database").unwrap();
        assert!(list.lines().any(|l| l == name), "{list}");
        // Only a unix socket: nothing listens on TCP.
        let settings = server.psql("SHOW listen_addresses").unwrap();
        assert_eq!(settings.trim(), "");
        let pid = server.pid().unwrap();
        server.restart().unwrap();
        assert_ne!(server.pid(), Some(pid));
        assert!(server.psql("SELECT 1").unwrap().contains('1'));
        let dir = server.socket_dir().to_path_buf();
        drop(server);
        assert!(!dir.exists());
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
