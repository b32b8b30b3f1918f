//! The campaign's world: the test fleet and what it was told (the flake's
//! versions and service faults), the coordinator's state directory, a
//! daemon on it, running the real binary, and what every host runs and
//! boots, read from the host itself.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix_deploy_testkit::{Fleet, HostSpec};
use serde_json::Value;

use crate::generator::{HOSTS, Interrupt, NON_ROOT_USER, ServiceFault};

/// How long one run of the coordinator may take before it counts as hung.
pub const CLI_DEADLINE: Duration = Duration::from_secs(300);
/// `--confirm-timeout` of every deployment: how long a watchdog waits.
pub const CONFIRM_TIMEOUT_SECS: u64 = 3;

/// What a host runs and boots, read from its own `/run` and profile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub running: Option<String>,
    pub boot: Option<String>,
}

/// One key as configured: its owner and mode.
pub struct KeySpec {
    pub user: &'static str,
    pub group: &'static str,
    pub mode: u32,
}

/// Host `i`'s key's owner and mode (each host differs, the non-root host's
/// key belongs to another user).
pub fn key_spec(i: usize) -> KeySpec {
    match i {
        0 => KeySpec {
            user: "root",
            group: "root",
            mode: 0o600,
        },
        1 => KeySpec {
            user: "root",
            group: "nogroup",
            mode: 0o640,
        },
        2 => KeySpec {
            user: "nobody",
            group: "nogroup",
            mode: 0o400,
        },
        _ => KeySpec {
            user: "nobody",
            group: "nogroup",
            mode: 0o600,
        },
    }
}

/// The key's name on host `name`.
pub fn key_name(name: &str) -> String {
    format!("chaos-{name}")
}

/// The key's contents for a host at a version.
pub fn key_text(name: &str, version: u32) -> String {
    format!("the chaos secret of {name}, generation {version}")
}

/// A finished (or interrupted) run of the coordinator.
pub struct CliRun {
    /// Exit code; `None` when it was killed.
    pub code: Option<i32>,
    pub json: Value,
    pub stderr: String,
    /// It was killed (SIGKILL) at the requested moment.
    pub killed: bool,
    /// `cancel` was run at the requested moment.
    pub cancelled: bool,
    /// It ran past [`CLI_DEADLINE`] and was killed.
    pub hung: bool,
}

pub struct Daemon {
    child: Child,
    pub url: String,
    pub token: String,
}

pub struct World {
    pub fleet: Fleet,
    state: tempfile::TempDir,
    /// Where each run's output goes (`NNN-what.out`, `.err`).
    logs: PathBuf,
    runs: u32,
    pub versions: Vec<u32>,
    pub faults: Vec<ServiceFault>,
    /// What the flake evaluates to now, by host.
    pub toplevels: BTreeMap<String, String>,
    /// Each deployment a `Deploy` started: the systems planned for its hosts.
    pub deployments: BTreeMap<i64, BTreeMap<String, String>>,
    /// The last deployment a `Deploy` started.
    pub last_deployment: Option<i64>,
    /// Every system any operation planned for each host, and what it ran
    /// at the start.
    pub ever_planned: BTreeMap<String, BTreeSet<String>>,
    /// Systems a host may still go back to by itself: a watchdog that has
    /// not decided yet.
    pub carry: BTreeMap<String, BTreeSet<String>>,
    /// Hosts changed behind the coordinator's back since it last probed
    /// them: what `status` says of them cannot be held against it.
    pub stale: BTreeSet<String>,
    /// When all of a host's processes were killed (stopped, rebooted,
    /// restarted), Unix seconds.
    pub kills: BTreeMap<String, Vec<f64>>,
    /// Every key text configured for each host so far.
    pub key_texts: BTreeMap<String, BTreeSet<String>>,
    pub swapped: Option<(String, String)>,
    /// Hosts frozen or stopped.
    pub down: BTreeSet<String>,
    /// History entries already checked by I3, per host.
    pub i3_seen: BTreeMap<String, usize>,
    daemon: Option<Daemon>,
    runtime: tokio::runtime::Runtime,
}

/// The binary under test: this build's, or `NIX_DEPLOY_TEST_BIN`.
pub fn binary() -> PathBuf {
    std::env::var_os("NIX_DEPLOY_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_nix-deploy")))
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn spec(i: usize, version: u32, fault: ServiceFault) -> HostSpec {
    let name = HOSTS[i];
    let key = key_spec(i);
    let keys = format!(
        "keys.{} = {{ text = \"{}\"; user = \"{}\"; group = \"{}\"; permissions = \"0{:o}\"; }};",
        key_name(name),
        key_text(name, version),
        key.user,
        key.group,
        key.mode
    );
    let mut spec = HostSpec::new(name).version(version).deployment_extra(&keys);
    spec = match fault {
        ServiceFault::Healthy => spec.service("app"),
        ServiceFault::Slow(ms) => spec.slow_service("app", ms),
        ServiceFault::Failing => spec.failing_service("app"),
        ServiceFault::FailSwitch => spec.service("app").fail_switch(true),
    };
    if i == HOSTS.len() - 1 {
        spec = spec.user(NON_ROOT_USER);
    }
    spec
}

impl World {
    /// A fleet of [`HOSTS`], every host deployed once by the coordinator.
    pub fn start() -> anyhow::Result<World> {
        let specs = (0..HOSTS.len())
            .map(|i| spec(i, 1, ServiceFault::Healthy))
            .collect();
        let fleet = Fleet::start(specs)?;
        let state = tempfile::tempdir()?;
        let logs = state.path().join("logs");
        std::fs::create_dir(&logs)?;
        let mut world = World {
            fleet,
            state,
            logs,
            runs: 0,
            versions: vec![1; HOSTS.len()],
            faults: vec![ServiceFault::Healthy; HOSTS.len()],
            toplevels: BTreeMap::new(),
            deployments: BTreeMap::new(),
            last_deployment: None,
            ever_planned: BTreeMap::new(),
            carry: BTreeMap::new(),
            stale: BTreeSet::new(),
            kills: BTreeMap::new(),
            key_texts: HOSTS
                .iter()
                .map(|h| (h.to_string(), BTreeSet::from([key_text(h, 1)])))
                .collect(),
            swapped: None,
            down: BTreeSet::new(),
            i3_seen: BTreeMap::new(),
            daemon: None,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        };
        world.toplevels = world.fleet.toplevels()?;
        for (host, path) in &world.toplevels {
            world
                .ever_planned
                .entry(host.clone())
                .or_default()
                .insert(path.clone());
        }
        let run = world.cli(
            "setup",
            &["deploy".into(), "--parallel-limit".into(), "8".into()],
            None,
        );
        anyhow::ensure!(
            run.code == Some(0),
            "the first deployment failed:\n{}",
            run.stderr
        );
        world.daemon = Some(world.start_daemon()?);
        Ok(world)
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Rewrites a host's spec in the flake and re-evaluates the toplevels.
    pub fn respec(&mut self, i: usize) -> anyhow::Result<()> {
        let new = spec(i, self.versions[i], self.faults[i]);
        self.fleet.update(HOSTS[i], |s| *s = new)?;
        self.key_texts
            .entry(HOSTS[i].to_string())
            .or_default()
            .insert(key_text(HOSTS[i], self.versions[i]));
        self.toplevels = self.fleet.toplevels()?;
        Ok(())
    }

    pub fn observe(&self, host: &str) -> Observed {
        Observed {
            running: self.fleet.current_system(host),
            boot: self
                .fleet
                .generation(host)
                .and_then(|g| self.fleet.generation_path(host, g)),
        }
    }

    pub fn observe_all(&self) -> BTreeMap<String, Observed> {
        HOSTS
            .iter()
            .map(|h| (h.to_string(), self.observe(h)))
            .collect()
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("--flake")
            .arg(self.fleet.flake_ref())
            .arg("--ssh-config")
            .arg(self.fleet.ssh_config())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--connect-timeout", "5", "--command-timeout", "20"])
            .stdin(Stdio::null());
        for (k, v) in self.fleet.env() {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `nix-deploy --json ARGS` to the end, serving the reboots hosts
    /// ask for, and interrupting it at `interrupt`'s moment.
    pub fn cli(&mut self, what: &str, args: &[String], interrupt: Option<&Interrupt>) -> CliRun {
        self.runs += 1;
        let base = self.logs.join(format!("{:03}-{what}", self.runs));
        let (out, err) = (base.with_extension("out"), base.with_extension("err"));
        let mut cmd = self.command(&binary());
        cmd.arg("--json")
            .args(args)
            .stdout(std::fs::File::create(&out).expect("run output file"))
            .stderr(std::fs::File::create(&err).expect("run error file"));
        let mut child = cmd.spawn().expect("spawning nix-deploy");
        let deadline = Instant::now() + CLI_DEADLINE;
        let (mut killed, mut cancelled, mut hung) = (false, false, false);
        let mut pending = interrupt.cloned();
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for nix-deploy") {
                break Some(status);
            }
            if let Err(e) = self.fleet.serve_reboots() {
                eprintln!("chaos: serving a reboot: {e:#}");
            }
            if let Some(interrupt) = &pending {
                let moment = match interrupt {
                    Interrupt::Kill(m) | Interrupt::Cancel(m) => m,
                };
                let stderr = std::fs::read_to_string(&err).unwrap_or_default();
                let seen = stderr
                    .lines()
                    .filter(|l| l.contains(&format!(": {}", moment.word)))
                    .count();
                if seen >= moment.nth {
                    match interrupt {
                        Interrupt::Kill(_) => {
                            let _ = child.kill();
                            let _ = child.wait();
                            killed = true;
                            break None;
                        }
                        Interrupt::Cancel(_) => {
                            let _ = self.command(&binary()).arg("cancel").output();
                            cancelled = true;
                        }
                    }
                    pending = None;
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                hung = true;
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = std::fs::read_to_string(&out).unwrap_or_default();
        CliRun {
            code: status.and_then(|s| s.code()),
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stderr: std::fs::read_to_string(&err).unwrap_or_default(),
            killed,
            cancelled,
            hung,
        }
    }

    /// `nix-deploy --json ARGS`, for reading: exit code, document, stderr.
    pub fn read(&mut self, what: &str, args: &[&str]) -> CliRun {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        self.cli(what, &args, None)
    }

    /// The id of the newest deployment in the history.
    pub fn latest_deployment(&mut self) -> Option<i64> {
        let run = self.read("history", &["history", "--limit", "1"]);
        run.json["deployments"][0]["id"].as_i64()
    }

    /// Waits until no activation on an up host waits for a decision (a
    /// killed coordinator's watchdogs have decided and switched back), up
    /// to a deadline. Returns the hosts still undecided.
    pub fn settle_watchdogs(&self) -> BTreeSet<String> {
        let deadline = Instant::now() + Duration::from_secs(CONFIRM_TIMEOUT_SECS * 4 + 60);
        loop {
            let undecided = self.undecided();
            let waiting: BTreeSet<String> = undecided
                .iter()
                .filter(|h| !self.down.contains(*h))
                .cloned()
                .collect();
            if waiting.is_empty() || Instant::now() > deadline {
                return undecided;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Hosts with an activation still undecided, or a watchdog switching back.
    pub fn undecided(&self) -> BTreeSet<String> {
        HOSTS
            .iter()
            .filter(|h| {
                let dir = self.fleet.host_dir(h).join("run/nix-deploy");
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    return false;
                };
                entries.filter_map(|e| e.ok()).any(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let Some(token) = name.strip_suffix(".pid") else {
                        return false;
                    };
                    let decided = dir.join(format!("{token}.decision")).exists();
                    let result = std::fs::read_to_string(dir.join(format!("{token}.result")))
                        .unwrap_or_default();
                    let alive = std::fs::read_to_string(e.path())
                        .ok()
                        .and_then(|p| p.trim().parse::<u32>().ok())
                        .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
                    alive && (!decided || result.trim() == "reverting")
                })
            })
            .map(|h| h.to_string())
            .collect()
    }

    fn start_daemon(&self) -> anyhow::Result<Daemon> {
        let dir = self.state_dir().join("daemon");
        std::fs::create_dir_all(&dir)?;
        let token = "chaos-read-token-0123456789abcdef".to_string();
        std::fs::write(dir.join("read.token"), format!("{token}\n"))?;
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n\n[[tokens]]\nname = \"chaos\"\nfile = \"{}\"\nscope = \"read\"\n",
                dir.join("read.token").display()
            ),
        )?;
        let mut child = self
            .command(&binary())
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("daemon.log"))?)
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let Some(url) = line.trim().strip_prefix("nix-deploy: listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the daemon did not start: {line:?}");
        };
        Ok(Daemon {
            url: url.to_string(),
            child,
            token,
        })
    }

    /// `GET PATH` from the daemon, as JSON.
    pub fn api(&self, path: &str) -> anyhow::Result<Value> {
        let daemon = self
            .daemon
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no daemon"))?;
        let url = format!("{}{path}", daemon.url);
        self.runtime.block_on(async {
            let response = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?
                .get(&url)
                .bearer_auth(&daemon.token)
                .send()
                .await?
                .error_for_status()?;
            Ok(response.json::<Value>().await?)
        })
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.child.kill();
            let _ = daemon.child.wait();
        }
        if std::env::var_os("NIX_DEPLOY_CHAOS_KEEP").is_some() {
            let kept = std::mem::replace(&mut self.state, tempfile::tempdir().expect("tempdir"));
            eprintln!("chaos: state directory kept: {}", kept.keep().display());
        }
    }
}
