//! Real, disposable "NixOS" test hosts on this machine, for integration tests,
//! the demo and benchmarks.
//!
//! ```ignore
//! use nix_deploy::testkit::{Fleet, HostSpec};
//!
//! let mut fleet = Fleet::start(vec![
//!     HostSpec::new("db").role("database").service("postgresql"),
//!     HostSpec::new("web").depends_on(&["db"]).service("nginx"),
//! ])?;
//! // Point the coordinator at fleet.flake_ref(), with fleet.env() and
//! // `ssh -F fleet.ssh_config()`; then look at what it did:
//! assert_eq!(fleet.generation("web"), Some(1));
//! fleet.update("web", |s| s.bump())?; // a new toplevel for web
//! ```
//!
//! # How a host works
//!
//! A [`Fleet`] starts one OpenSSH server per host. Each runs in its own
//! **mount namespace** in which the host's private directories `H/nix`,
//! `H/run` and `H/root` are bind-mounted over `/nix`, `/run` and `/root`:
//!
//! ```text
//! setsid unshare --mount --propagation private sh -c \
//!   'mount --bind H/nix /nix && mount --bind H/run /run && mount --bind H/root /root &&
//!    mkdir -p /run/sshd && echo $$ > /run/testkit-sshd.pid &&
//!    exec /usr/sbin/sshd -D -e -f H/sshd_config'
//! ```
//!
//! Every process reached over ssh thus sees the host's own, initially empty,
//! Nix store: `nix copy --to ssh://HOST` really copies closures into it,
//! `nix-env -p /nix/var/nix/profiles/system --set` creates real generations
//! (`H/nix/var/nix/profiles/system-N-link`) and activation sets
//! `H/run/current-system`, as on a NixOS machine. The private `/root` keeps
//! the build machine's `/root/.bashrc` from slowing down or changing commands
//! run over ssh. Sessions get `PATH=/run/current-system/sw/bin:...:/usr/bin:/bin`,
//! so the activated system's `systemctl` comes first and `nix-store` / `nix-env`
//! are the machine's, and `NIX_CONFIG="substituters ="`, so that nothing on a
//! host waits for a binary cache it cannot reach (the experimental `nix`
//! command is off there, as on a default NixOS). The coordinator itself keeps the machine's real `/nix`,
//! with [`nix_config`] (flakes on, no sandbox, no substituters: no network;
//! and no build users, which Debian's single-user `nix-bin` does not have).
//! `unshare` and `sh` exec, so the spawned pid *is* the listening sshd, and
//! `setsid` makes it the leader of a session and process group of its own.
//!
//! # Addresses
//!
//! Hosts listen on port 22 of their own **loopback** address `127.A.B.x`, one
//! random block `127.A.B.0/24` (A in 100..=199) per fleet, so that fleets of
//! tests running in parallel processes do not collide: an address is only
//! taken if it can be bound first, a host only counts as up once the SSH
//! banner on its address carries the host's own `VersionAddendum`, and a host
//! whose sshd finds its address taken moves to another one of the block.
//! No other addresses are ever used.
//!
//! # Files
//!
//! `FLEET` is a fresh `/tmp/ndfleet-XXXXXX` (short, for ssh control socket
//! paths), removed when the fleet stops:
//!
//! - `FLEET/ssh_config`: `Host NAME` entries with the address, user root, the
//!   client key `FLEET/id`, `FLEET/known_hosts` (pre-filled with the host
//!   keys), `BatchMode yes` and `ConnectTimeout 5`. Use it with `ssh -F`, and
//!   with `NIX_SSHOPTS="-F FLEET/ssh_config"` for nix ([`Fleet::env`]).
//! - `FLEET/flake/flake.nix`: a flake without inputs (no nixpkgs) with one
//!   `nixosConfigurations.NAME` per host, with `config.deployment` (the
//!   [`HostSpec`]'s metadata) and `config.system.build.toplevel`, a `/bin/sh`
//!   derivation that builds in milliseconds. The toplevel changes when the
//!   spec's version or behaviour fields change, not when its metadata does.
//!   Its scripts are files beside `flake.nix`, for easy reading.
//! - `FLEET/hosts/NAME/`: `nix/`, `run/`, `root/`, `sshd_config`, `hostkey`,
//!   `sshd.log` (the sshd's output, appended across restarts).
//!
//! A toplevel contains `nixos-version`, `testkit-packages` (fake package
//! names), `sw/bin/systemctl` (`is-active`, `is-failed`, `--version`) and
//! `bin/switch-to-configuration switch|boot|test|dry-activate`, which writes to
//! the host's `/run`:
//!
//! - `activations.log`: `TIME start ACTION PATH` and `TIME end ACTION PATH CODE`
//!   lines (TIME is Unix time with fractions), see [`Fleet::activations`];
//! - `current-system` (switch and test), pointing at the toplevel;
//! - `units/UNIT`: `active` or `failed` per [`HostSpec::units`] (switch, test);
//! - `boot.log`: `boot PATH` lines (boot).
//!
//! It sleeps [`HostSpec::activation_delay_ms`], kills the listening sshd for
//! [`HostSpec::kill_sshd`] and, for [`HostSpec::fail_switch`], prints
//! `error: the following units failed: ...` and exits 4 (after having switched
//! `current-system`, as NixOS does). `/run/testkit-host` holds the host name.
//!
//! # Processes and cleaning up
//!
//! A host is every process in its mount namespace: the listening sshd, the
//! per-connection sshd processes (which put themselves in sessions of their
//! own, rename themselves, and chroot before authentication) and whatever
//! runs over ssh. They are found by scanning `/proc/*/mountinfo` for the
//! host's bind mounts and `/proc/*/cmdline` for its `sshd_config`, plus their
//! descendants; that is how [`Fleet::stop_host`], [`Fleet::freeze_host`] and
//! [`Fleet::stop`] reach all of them. Dropping a fleet stops it, also when a
//! test panics. For a test process that dies without unwinding (SIGKILL,
//! Ctrl-C, abort, `process::exit`), each fleet has a reaper: a shell in a
//! session of its own that reads a pipe held open by the test process, and on
//! end of file without a `stop` line kills the fleet's processes and removes
//! its directory.
//!
//! Requires root, `nix`, `/usr/sbin/sshd`, `ssh`, `ssh-keygen`, `setsid`,
//! `unshare` and `mount`.

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};

/// The sshd binary every host runs.
const SSHD: &str = "/usr/sbin/sshd";
/// Port every host listens on (each host has an address of its own).
const SSH_PORT: u16 = 22;
/// How long a host may take to accept connections after being started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of all polling loops.
const POLL: Duration = Duration::from_millis(20);
/// Timeout of [`Fleet::ssh`].
const SSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of evaluations and builds run by the testkit itself.
const NIX_TIMEOUT: Duration = Duration::from_secs(300);
/// How long stopping waits after SIGTERM before sending SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// Attempts to start a host on a fresh address when its address was taken.
const BIND_ATTEMPTS: u32 = 8;
/// Version of the fake systemd, as printed by `systemctl --version`.
const SYSTEMD_VERSION: &str = "systemd 252 (testkit)";

/// The `NIX_CONFIG` the coordinator's own nix needs to evaluate, build and copy
/// the test flake on this machine: flakes on, no sandbox, no substituters, and
/// builds as the calling user (`build-users-group =`: Debian's single-user
/// `nix-bin` defaults to a `nixbld` group that does not exist). Set only for
/// our own invocations, so the machine's Nix configuration stays as it is.
pub fn nix_config() -> &'static str {
    "experimental-features = nix-command flakes\nsandbox = false\nsubstituters =\nbuild-users-group ="
}

/// The Nix system double of this machine, e.g. `x86_64-linux`.
pub fn nix_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

/// What one test host is: its deployment metadata and how its system behaves
/// when activated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSpec {
    /// Host name: `[A-Za-z0-9][A-Za-z0-9_-]*`, at most 32 characters. It is the
    /// `nixosConfigurations` attribute, the ssh host alias and `targetHost`.
    pub name: String,
    /// Bumping it makes a new toplevel (a "generation bump").
    pub version: u32,
    /// `deployment.role`, default `client`.
    pub role: String,
    /// `deployment.tags`.
    pub tags: Vec<String>,
    /// `deployment.dependencies`: names of hosts to deploy before this one.
    pub dependencies: Vec<String>,
    /// `deployment.healthChecks`: raw Nix attrsets, e.g. `{ service = "nginx"; }`.
    pub health_checks: Vec<String>,
    /// Units and whether each is active after activation. A name without a
    /// dot means `NAME.service`.
    pub units: Vec<(String, bool)>,
    /// `switch-to-configuration switch|test` exits 4 with
    /// `error: the following units failed: ...` (after having switched
    /// `/run/current-system`, as NixOS does).
    pub fail_switch: bool,
    /// Activation sleeps this long.
    pub activation_delay_ms: u64,
    /// `switch-to-configuration switch|test` kills the host's listening sshd:
    /// new connections are refused afterwards, established ones (including the
    /// one running the activation and ssh control masters) keep working.
    pub kill_sshd: bool,
    /// `deployment.rollbackOnFailure`, default true.
    pub rollback_on_failure: bool,
    /// Raw Nix attributes appended inside `deployment = { ... };`, e.g.
    /// `maxParallel = 2;`.
    pub deployment_extra: Option<String>,
    /// Kernel version; the toplevel's closure holds a `linux-<kernel>` path.
    pub kernel: String,
    /// Extra packages (`name-version`) in the closure, each a derivation of its own.
    pub extra_packages: Vec<String>,
}

impl HostSpec {
    /// Version 1, role `client`, no tags, dependencies, health checks or
    /// units, activation succeeds at once, rollback on failure.
    pub fn new(name: &str) -> Self {
        HostSpec {
            name: name.to_string(),
            version: 1,
            role: "client".to_string(),
            tags: Vec::new(),
            dependencies: Vec::new(),
            health_checks: Vec::new(),
            units: Vec::new(),
            fail_switch: false,
            activation_delay_ms: 0,
            kill_sshd: false,
            rollback_on_failure: true,
            deployment_extra: None,
            kernel: "6.6.1".to_string(),
            extra_packages: Vec::new(),
        }
    }

    /// Sets the kernel version.
    pub fn kernel(mut self, version: &str) -> Self {
        self.kernel = version.to_string();
        self
    }

    /// Adds a package (`name-version`) to the closure.
    pub fn package(mut self, name_version: &str) -> Self {
        self.extra_packages.push(name_version.to_string());
        self
    }

    /// Sets the version.
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets the role.
    pub fn role(mut self, role: &str) -> Self {
        self.role = role.to_string();
        self
    }

    /// Adds tags.
    pub fn tags(mut self, tags: &[&str]) -> Self {
        self.tags.extend(tags.iter().map(|t| t.to_string()));
        self
    }

    /// Adds dependencies (hosts deployed before this one).
    pub fn depends_on(mut self, hosts: &[&str]) -> Self {
        self.dependencies
            .extend(hosts.iter().map(|h| h.to_string()));
        self
    }

    /// Adds a raw Nix health check attrset.
    pub fn health_check(mut self, nix_attrs: &str) -> Self {
        self.health_checks.push(nix_attrs.to_string());
        self
    }

    /// Adds a unit and whether it is active after activation.
    pub fn unit(mut self, unit: &str, active: bool) -> Self {
        self.units.push((unit.to_string(), active));
        self
    }

    /// Adds an active unit `NAME.service` and the health check
    /// `{ service = "NAME"; }` for it.
    pub fn service(self, name: &str) -> Self {
        let check = format!("{{ service = {}; }}", nix_string(name));
        self.unit(name, true).health_check(&check)
    }

    /// Adds a unit `NAME.service` that is failed after activation, and the
    /// health check `{ service = "NAME"; }` for it.
    pub fn failing_service(self, name: &str) -> Self {
        let check = format!("{{ service = {}; }}", nix_string(name));
        self.unit(name, false).health_check(&check)
    }

    /// Sets [`HostSpec::fail_switch`].
    pub fn fail_switch(mut self, fail: bool) -> Self {
        self.fail_switch = fail;
        self
    }

    /// Sets [`HostSpec::activation_delay_ms`].
    pub fn activation_delay_ms(mut self, ms: u64) -> Self {
        self.activation_delay_ms = ms;
        self
    }

    /// Sets [`HostSpec::kill_sshd`].
    pub fn kill_sshd(mut self, kill: bool) -> Self {
        self.kill_sshd = kill;
        self
    }

    /// Sets [`HostSpec::rollback_on_failure`].
    pub fn rollback_on_failure(mut self, rollback: bool) -> Self {
        self.rollback_on_failure = rollback;
        self
    }

    /// Sets [`HostSpec::deployment_extra`].
    pub fn deployment_extra(mut self, nix_attrs: &str) -> Self {
        self.deployment_extra = Some(nix_attrs.to_string());
        self
    }

    /// Increments the version (a generation bump).
    pub fn bump(&mut self) {
        self.version += 1;
    }

    /// The NixOS version string of this spec's system, `25.05.VERSION`; the
    /// toplevel is named `nixos-system-NAME-25.05.VERSION`.
    pub fn version_string(&self) -> String {
        format!("25.05.{}", self.version)
    }

    fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        for (unit, _) in &self.units {
            let ok = !unit.is_empty()
                && unit
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.@:".contains(c));
            if !ok {
                bail!("host {}: invalid unit name {unit:?}", self.name);
            }
        }
        Ok(())
    }
}

/// One run of `switch-to-configuration`, parsed from the host's
/// `/run/activations.log`.
#[derive(Clone, Debug, PartialEq)]
pub struct Activation {
    /// Unix time the activation started, with fractional seconds.
    pub start: f64,
    /// Unix time it ended; `None` while running or if it was killed.
    pub end: Option<f64>,
    /// `switch`, `boot`, `test` or `dry-activate`.
    pub action: String,
    /// Store path of the activated system.
    pub path: String,
    /// Exit code of `switch-to-configuration`; `None` if it did not end.
    pub exit_code: Option<i32>,
}

/// One started test host.
#[derive(Debug)]
struct Host {
    name: String,
    addr: Ipv4Addr,
    dir: PathBuf,
    /// The listening sshd while the host runs.
    sshd: Option<Child>,
}

/// A set of running test hosts; see the module documentation.
///
/// Methods taking a host name panic if the fleet has no such host.
#[derive(Debug)]
pub struct Fleet {
    tempdir: Option<tempfile::TempDir>,
    dir: PathBuf,
    /// Base name of `dir`; unique, so it identifies the fleet's processes.
    tag: String,
    /// The fleet's address block `127.A.B.0/24`.
    block: (u8, u8),
    specs: Vec<HostSpec>,
    hosts: Vec<Host>,
    reaper: Option<(Child, ChildStdin)>,
}

impl Fleet {
    /// Starts one host per spec, then writes `ssh_config`, `known_hosts` and
    /// the flake. All hosts accept ssh connections when this returns.
    pub fn start(specs: Vec<HostSpec>) -> Result<Fleet> {
        for (i, spec) in specs.iter().enumerate() {
            spec.validate()?;
            if specs[..i].iter().any(|s| s.name == spec.name) {
                bail!("host {} is specified twice", spec.name);
            }
        }
        let tempdir = tempfile::Builder::new()
            .prefix("ndfleet-")
            .tempdir_in("/tmp")
            .context("creating the fleet directory")?;
        let dir = tempdir.path().to_path_buf();
        let tag = dir
            .file_name()
            .and_then(|n| n.to_str())
            .context("fleet directory name")?
            .to_string();
        let mut fleet = Fleet {
            tempdir: Some(tempdir),
            dir,
            tag,
            block: (0, 0),
            specs: Vec::new(),
            hosts: Vec::new(),
            reaper: None,
        };
        // From here on, dropping `fleet` on an error cleans up what was started.
        fleet.spawn_reaper()?;
        fs::create_dir(fleet.dir.join("hosts"))?;
        fs::create_dir(fleet.dir.join("flake"))?;
        let mut keygens = vec![keygen(&fleet.dir.join("id"))?];
        for spec in &specs {
            let dir = fleet.dir.join("hosts").join(&spec.name);
            create_host_dirs(&dir)?;
            keygens.push(keygen(&dir.join("hostkey"))?);
        }
        for (what, child) in keygens {
            wait_ok(child, &what)?;
        }
        fleet.block = choose_block(specs.len())?;
        for (i, spec) in specs.into_iter().enumerate() {
            let host = Host {
                addr: Ipv4Addr::new(127, fleet.block.0, fleet.block.1, i as u8 + 1),
                dir: fleet.dir.join("hosts").join(&spec.name),
                name: spec.name.clone(),
                sshd: None,
            };
            fleet.hosts.push(host);
            fleet.specs.push(spec);
        }
        let all: Vec<usize> = (0..fleet.hosts.len()).collect();
        fleet.start_hosts(&all)?;
        fleet.write_ssh_config()?;
        fleet.write_flake()?;
        Ok(fleet)
    }

    /// The fleet directory (`/tmp/ndfleet-XXXXXX`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `FLEET/ssh_config`, to be passed to ssh with `-F`.
    pub fn ssh_config(&self) -> PathBuf {
        self.dir.join("ssh_config")
    }

    /// The fleet's client private key, `FLEET/id`.
    pub fn identity(&self) -> PathBuf {
        self.dir.join("id")
    }

    /// The flake reference of the fleet's flake: `path:FLEET/flake`.
    pub fn flake_ref(&self) -> String {
        format!("path:{}", self.dir.join("flake").display())
    }

    /// Environment for the coordinator and any nix it runs: `NIX_CONFIG`
    /// ([`nix_config`]) and `NIX_SSHOPTS` (`-F FLEET/ssh_config`).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NIX_CONFIG".to_string(), nix_config().to_string()),
            (
                "NIX_SSHOPTS".to_string(),
                format!("-F {}", self.ssh_config().display()),
            ),
        ]
    }

    /// A command for `program` with [`Fleet::env`] set.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env());
        cmd
    }

    /// Host names, in the order the hosts were specified.
    pub fn host_names(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.name.clone()).collect()
    }

    /// The spec of a host.
    pub fn spec(&self, name: &str) -> &HostSpec {
        &self.specs[self.index(name)]
    }

    /// All specs, in host order.
    pub fn specs(&self) -> &[HostSpec] {
        &self.specs
    }

    /// The host's loopback address, e.g. `127.142.7.1` (port 22).
    pub fn address(&self, name: &str) -> String {
        self.host(name).addr.to_string()
    }

    /// The host's directory: `nix/` and `run/` are its `/nix` and `/run`,
    /// `sshd.log` is its sshd's output.
    pub fn host_dir(&self, name: &str) -> PathBuf {
        self.host(name).dir.clone()
    }

    /// The host's sshd log (empty if unreadable).
    pub fn sshd_log(&self, name: &str) -> String {
        fs::read_to_string(self.host(name).dir.join("sshd.log")).unwrap_or_default()
    }

    /// Pid of the host's listening sshd, if the host was started and not
    /// stopped (the process may have died since, e.g. by `kill_sshd`).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.host(name).sshd.as_ref().map(|c| c.id())
    }

    /// Whether the host's listening sshd is alive.
    pub fn is_running(&self, name: &str) -> bool {
        let Some(pid) = self.pid(name) else {
            return false;
        };
        // A zombie (exited, not yet reaped) has an empty command line.
        fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
    }

    /// Pids of all live processes of the host: its sshd, per-connection sshd
    /// processes and whatever runs over ssh.
    pub fn host_processes(&self, name: &str) -> Vec<u32> {
        find_processes(&[self.needles(self.index(name))])
    }

    /// Pids of all live processes of all hosts of the fleet.
    pub fn processes(&self) -> Vec<u32> {
        find_processes(&[self.fleet_needles()])
    }

    /// Edits a host's spec (the name cannot change) and rewrites the flake.
    pub fn update(&mut self, name: &str, f: impl FnOnce(&mut HostSpec)) -> Result<()> {
        let i = self.index(name);
        let mut spec = self.specs[i].clone();
        f(&mut spec);
        if spec.name != name {
            bail!("host {name}: update must not rename the host");
        }
        spec.validate()?;
        self.specs[i] = spec;
        self.write_flake()
    }

    /// Starts one more host (in the fleet's address block) and rewrites
    /// `ssh_config` and the flake.
    pub fn add_host(&mut self, spec: HostSpec) -> Result<()> {
        spec.validate()?;
        if self.specs.iter().any(|s| s.name == spec.name) {
            bail!("host {} already exists", spec.name);
        }
        let dir = self.dir.join("hosts").join(&spec.name);
        create_host_dirs(&dir)?;
        let (what, child) = keygen(&dir.join("hostkey"))?;
        wait_ok(child, &what)?;
        let addr = self
            .free_address()
            .with_context(|| format!("host {}: no free address", spec.name))?;
        self.hosts.push(Host {
            name: spec.name.clone(),
            addr,
            dir,
            sshd: None,
        });
        self.specs.push(spec);
        self.start_hosts(&[self.hosts.len() - 1])?;
        self.write_ssh_config()?;
        self.write_flake()
    }

    /// Writes `FLEET/flake/flake.nix` from the current specs.
    pub fn write_flake(&self) -> Result<()> {
        let flake = self.dir.join("flake");
        // flake.nix comes last, so it never refers to a script not yet written.
        for (file, contents) in flake_files(&self.specs) {
            let path = flake.join(file);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            write_atomic(&path, &contents)
                .with_context(|| format!("writing the fleet flake: {}", path.display()))?;
        }
        Ok(())
    }

    /// Stops the host like a power cut: SIGTERM to all its processes, SIGKILL
    /// after 2 s, and waits until they are gone. Its directories stay.
    pub fn stop_host(&mut self, name: &str) -> Result<()> {
        let i = self.index(name);
        self.kill_hosts(&[i])
            .with_context(|| format!("stopping host {name}"))
    }

    /// Starts a stopped host again with the same directories (its `/nix` and
    /// `/run` persist), normally on the same address. Restarts a running host.
    pub fn start_host(&mut self, name: &str) -> Result<()> {
        let i = self.index(name);
        if self.hosts[i].sshd.is_some() {
            self.kill_hosts(&[i])
                .with_context(|| format!("stopping host {name}"))?;
        }
        let old = self.hosts[i].addr;
        self.start_hosts(&[i])?;
        if self.hosts[i].addr != old {
            self.write_ssh_config()?;
        }
        Ok(())
    }

    /// Freezes the host like a hung machine: SIGSTOP to all its processes.
    /// TCP connections are still accepted by the kernel, but nothing answers.
    pub fn freeze_host(&self, name: &str) -> Result<()> {
        self.signal_host(name, libc::SIGSTOP)
    }

    /// Undoes [`Fleet::freeze_host`]: SIGCONT to all the host's processes.
    pub fn thaw_host(&self, name: &str) -> Result<()> {
        self.signal_host(name, libc::SIGCONT)
    }

    /// Kills the host's established ssh connections (and what runs over
    /// them, including ssh control masters' sessions) but not its listening
    /// sshd: a network blip.
    pub fn drop_connections(&self, name: &str) -> Result<()> {
        let listener = self.pid(name);
        for pid in self.host_processes(name) {
            if Some(pid) != listener {
                send_signal(pid as i32, libc::SIGKILL);
            }
        }
        Ok(())
    }

    /// Runs `ssh -F FLEET/ssh_config NAME -- script` (with a 30 s timeout) and
    /// returns its stdout; fails with its stderr if it exits non-zero.
    pub fn ssh(&self, name: &str, script: &str) -> Result<String> {
        self.assert_host(name);
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(self.ssh_config())
            .args([name, "--", script]);
        let out = run_with_timeout(cmd, SSH_TIMEOUT)
            .with_context(|| format!("host {name}: ssh {script:?}"))?;
        checked_stdout(out).with_context(|| format!("host {name}: ssh {script:?}"))
    }

    /// The system the host's `/run/current-system` points at, if any.
    pub fn current_system(&self, name: &str) -> Option<String> {
        let link = fs::read_link(self.host(name).dir.join("run/current-system")).ok()?;
        Some(link.to_string_lossy().into_owned())
    }

    /// The current generation number N of the host's system profile
    /// (`/nix/var/nix/profiles/system -> system-N-link`), if any.
    pub fn generation(&self, name: &str) -> Option<u32> {
        let link = fs::read_link(self.profiles_dir(name).join("system")).ok()?;
        parse_generation(link.file_name()?.to_str()?)
    }

    /// All generation numbers of the host's system profile, ascending.
    pub fn generations(&self, name: &str) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(self.profiles_dir(name)) else {
            return Vec::new();
        };
        let mut gens: Vec<u32> = entries
            .filter_map(|e| parse_generation(e.ok()?.file_name().to_str()?))
            .collect();
        gens.sort_unstable();
        gens
    }

    /// The store path generation `generation` of the host points at.
    pub fn generation_path(&self, name: &str, generation: u32) -> Option<String> {
        let link = self
            .profiles_dir(name)
            .join(format!("system-{generation}-link"));
        Some(fs::read_link(link).ok()?.to_string_lossy().into_owned())
    }

    /// The host's activations, oldest first.
    pub fn activations(&self, name: &str) -> Vec<Activation> {
        let log =
            fs::read_to_string(self.host(name).dir.join("run/activations.log")).unwrap_or_default();
        parse_activations(&log)
    }

    /// Systems `switch-to-configuration boot` was run with, oldest first.
    pub fn boots(&self, name: &str) -> Vec<String> {
        let log = fs::read_to_string(self.host(name).dir.join("run/boot.log")).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.strip_prefix("boot "))
            .map(str::to_string)
            .collect()
    }

    /// State of a unit after the last activation: `active`, `failed` or
    /// `inactive`, as the host's `systemctl is-active` says.
    pub fn unit_state(&self, name: &str, unit: &str) -> String {
        let path = self
            .host(name)
            .dir
            .join("run/units")
            .join(unit_file_name(unit));
        fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "inactive".to_string())
    }

    /// The host's toplevel store path as the flake evaluates it now.
    pub fn toplevel(&self, name: &str) -> Result<String> {
        self.assert_host(name);
        let attr = format!(
            "{}#nixosConfigurations.{name}.config.system.build.toplevel.outPath",
            self.flake_ref()
        );
        let mut cmd = self.command("nix");
        cmd.args(["eval", "--raw", &attr]);
        let out = run_with_timeout(cmd, NIX_TIMEOUT)
            .and_then(checked_stdout)
            .with_context(|| format!("host {name}: evaluating the toplevel"))?;
        Ok(out.trim().to_string())
    }

    /// Toplevel store paths of all hosts, by host name, in one evaluation.
    pub fn toplevels(&self) -> Result<BTreeMap<String, String>> {
        let mut cmd = self.command("nix");
        cmd.args([
            "eval",
            "--json",
            &format!("{}#nixosConfigurations", self.flake_ref()),
            "--apply",
            "cs: builtins.mapAttrs (n: c: c.config.system.build.toplevel.outPath) cs",
        ]);
        let out = run_with_timeout(cmd, NIX_TIMEOUT)
            .and_then(checked_stdout)
            .context("evaluating the toplevels")?;
        serde_json::from_str(&out).context("parsing the toplevels")
    }

    /// Builds the host's toplevel in the coordinator's store and returns its
    /// store path.
    pub fn build(&self, name: &str) -> Result<String> {
        self.assert_host(name);
        let attr = format!(
            "{}#nixosConfigurations.{name}.config.system.build.toplevel",
            self.flake_ref()
        );
        let mut cmd = self.command("nix");
        cmd.args(["build", "--no-link", "--json", &attr]);
        let out = run_with_timeout(cmd, NIX_TIMEOUT)
            .and_then(checked_stdout)
            .with_context(|| format!("host {name}: building the toplevel"))?;
        let json: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("host {name}: parsing nix build output {out:?}"))?;
        json[0]["outputs"]["out"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("host {name}: no out path in nix build output {out:?}"))
    }

    /// Deploys the host's current spec with plain nix and ssh, without the
    /// coordinator: build, `nix copy`, `nix-env --set` of the system profile,
    /// `switch-to-configuration switch`. Useful to set up a baseline. Returns
    /// the store path; fails if the activation fails.
    pub fn provision(&self, name: &str) -> Result<String> {
        let out = self.build(name)?;
        let mut cmd = self.command("nix");
        cmd.args(["copy", "--to", &format!("ssh://{name}"), &out]);
        run_with_timeout(cmd, NIX_TIMEOUT)
            .and_then(checked_stdout)
            .with_context(|| format!("host {name}: nix copy {out}"))?;
        self.ssh(
            name,
            &format!(
                "nix-env -p /nix/var/nix/profiles/system --set {out} && \
                 {out}/bin/switch-to-configuration switch"
            ),
        )?;
        Ok(out)
    }

    /// Stops all hosts, the reaper, and removes the fleet directory.
    /// Idempotent; errors are printed, not returned.
    pub fn stop(&mut self) {
        let all: Vec<usize> = (0..self.hosts.len()).collect();
        if let Err(e) = self.kill_hosts(&all) {
            eprintln!("testkit: stopping fleet {}: {e:#}", self.dir.display());
        }
        if let Some((mut child, mut stdin)) = self.reaper.take() {
            let _ = stdin.write_all(b"stop\n");
            drop(stdin);
            let _ = child.wait();
        }
        if let Some(tempdir) = self.tempdir.take() {
            make_removable(tempdir.path());
            if let Err(e) = tempdir.close() {
                eprintln!("testkit: removing {}: {e}", self.dir.display());
            }
        }
    }

    // ---- internals ----

    /// Panics unless the fleet has a host `name`.
    fn assert_host(&self, name: &str) {
        self.index(name);
    }

    fn index(&self, name: &str) -> usize {
        self.specs
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("testkit: the fleet has no host named {name:?}"))
    }

    fn host(&self, name: &str) -> &Host {
        &self.hosts[self.index(name)]
    }

    fn profiles_dir(&self, name: &str) -> PathBuf {
        self.host(name).dir.join("nix/var/nix/profiles")
    }

    /// (mountinfo needle, cmdline needle) identifying the processes of host `i`.
    fn needles(&self, i: usize) -> (String, String) {
        let name = &self.hosts[i].name;
        (
            format!("/{}/hosts/{name}/nix ", self.tag),
            format!("{}/hosts/{name}/sshd_config", self.tag),
        )
    }

    /// Needles identifying the processes of all hosts of the fleet.
    fn fleet_needles(&self) -> (String, String) {
        (
            format!("/{}/hosts/", self.tag),
            format!("{}/hosts/", self.tag),
        )
    }

    fn signal_host(&self, name: &str, signal: i32) -> Result<()> {
        let pids = self.host_processes(name);
        if pids.is_empty() {
            bail!("host {name} has no running processes");
        }
        for pid in pids {
            send_signal(pid as i32, signal);
        }
        Ok(())
    }

    /// The lowest address of the fleet's block that no host uses and that is
    /// free.
    fn free_address(&self) -> Result<Ipv4Addr> {
        let (a, b) = self.block;
        (1..=254)
            .map(|x| Ipv4Addr::new(127, a, b, x))
            .find(|addr| !self.hosts.iter().any(|h| h.addr == *addr) && address_free(*addr))
            .ok_or_else(|| anyhow!("no free address left in 127.{a}.{b}.0/24"))
    }

    /// Starts the sshd of each host in `idxs`, in parallel, and waits until
    /// each answers with its own banner. A host whose address turns out to
    /// be taken moves to another address of the block.
    fn start_hosts(&mut self, idxs: &[usize]) -> Result<()> {
        let mut pending: Vec<(usize, u32, Instant)> = Vec::new();
        for &i in idxs {
            self.spawn_sshd(i)?;
            pending.push((i, 1, Instant::now() + START_TIMEOUT));
        }
        while !pending.is_empty() {
            let mut still = Vec::new();
            for (i, attempt, deadline) in pending {
                let exited = {
                    let host = &mut self.hosts[i];
                    let child = host.sshd.as_mut().expect("spawned");
                    child
                        .try_wait()
                        .with_context(|| format!("host {}: waiting for sshd", host.name))?
                };
                if let Some(status) = exited {
                    self.hosts[i].sshd = None;
                    let log = self.sshd_log(&self.hosts[i].name.clone());
                    let taken = log.contains("Address already in use")
                        || log.contains("Cannot bind any address");
                    if taken && attempt < BIND_ATTEMPTS {
                        self.hosts[i].addr = self.free_address().with_context(|| {
                            format!("host {}: its address was taken", self.hosts[i].name)
                        })?;
                        self.spawn_sshd(i)?;
                        still.push((i, attempt + 1, Instant::now() + START_TIMEOUT));
                        continue;
                    }
                    bail!(
                        "host {}: sshd exited ({status}) instead of listening on {}:{SSH_PORT}; \
                         {}:\n{}",
                        self.hosts[i].name,
                        self.hosts[i].addr,
                        self.hosts[i].dir.join("sshd.log").display(),
                        tail(&log, 30)
                    );
                }
                let host = &self.hosts[i];
                if banner_is(host.addr, &self.banner_token(&host.name)) {
                    continue;
                }
                if Instant::now() > deadline {
                    bail!(
                        "host {}: sshd did not accept connections on {}:{SSH_PORT} within {:?}; \
                         {}:\n{}",
                        host.name,
                        host.addr,
                        START_TIMEOUT,
                        host.dir.join("sshd.log").display(),
                        tail(&self.sshd_log(&host.name), 30)
                    );
                }
                still.push((i, attempt, deadline));
            }
            pending = still;
            if !pending.is_empty() {
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }

    fn banner_token(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    /// Writes host `i`'s sshd_config and spawns its sshd in a new mount
    /// namespace (see the module documentation).
    fn spawn_sshd(&mut self, i: usize) -> Result<()> {
        let token = self.banner_token(&self.hosts[i].name);
        let authorized = fs::read(self.dir.join("id.pub")).context("reading FLEET/id.pub")?;
        let host = &mut self.hosts[i];
        let dir = host.dir.clone();
        fs::write(dir.join("authorized_keys"), authorized)
            .with_context(|| format!("host {}: writing authorized_keys", host.name))?;
        // Lets tests check over ssh which host they reached.
        fs::write(dir.join("run/testkit-host"), format!("{}\n", host.name))
            .with_context(|| format!("host {}: writing run/testkit-host", host.name))?;
        let config = format!(
            "ListenAddress {addr}\n\
             Port {SSH_PORT}\n\
             HostKey {dir}/hostkey\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             PidFile none\n\
             MaxStartups 100:30:200\n\
             MaxSessions 100\n\
             VersionAddendum {token}\n\
             SetEnv PATH=/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin \
             \"NIX_CONFIG=substituters =\"\n",
            addr = host.addr,
            dir = dir.display(),
        );
        write_atomic(&dir.join("sshd_config"), &config)
            .with_context(|| format!("host {}: writing sshd_config", host.name))?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("sshd.log"))
            .with_context(|| format!("host {}: opening sshd.log", host.name))?;
        let script = format!(
            "mount --bind \"$1/nix\" /nix && mount --bind \"$1/run\" /run && \
             mount --bind \"$1/root\" /root && \
             mkdir -p /run/sshd && echo $$ > /run/testkit-sshd.pid && \
             exec {SSHD} -D -e -f \"$1/sshd_config\""
        );
        let child = Command::new("setsid")
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sh", "-c", &script, "testkit-host"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("host {}: spawning sshd", host.name))?;
        host.sshd = Some(child);
        Ok(())
    }

    /// Kills all processes of the hosts `idxs` (TERM, then KILL after
    /// [`TERM_GRACE`]) and reaps their sshd.
    fn kill_hosts(&mut self, idxs: &[usize]) -> Result<()> {
        let needles: Vec<(String, String)> = if idxs.len() == self.hosts.len() {
            vec![self.fleet_needles()]
        } else {
            idxs.iter().map(|&i| self.needles(i)).collect()
        };
        let start = Instant::now();
        let mut signal = libc::SIGTERM;
        loop {
            let mut alive = 0;
            for &i in idxs {
                let Some(child) = self.hosts[i].sshd.as_mut() else {
                    continue;
                };
                if child.try_wait()?.is_some() {
                    self.hosts[i].sshd = None;
                    continue;
                }
                // Not reaped yet, so the pid (and process group) is still ours.
                alive += 1;
                let pgid = child.id() as i32;
                send_signal(-pgid, signal);
                send_signal(-pgid, libc::SIGCONT);
            }
            let stray = find_processes(&needles);
            for &pid in &stray {
                send_signal(pid as i32, signal);
                send_signal(pid as i32, libc::SIGCONT);
            }
            if alive == 0 && stray.is_empty() {
                return Ok(());
            }
            let elapsed = start.elapsed();
            if elapsed > TERM_GRACE {
                signal = libc::SIGKILL;
            }
            if elapsed > TERM_GRACE + Duration::from_secs(5) {
                bail!("{alive} sshd listener(s) and processes {stray:?} survived SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Spawns the fleet's reaper (see the module documentation).
    fn spawn_reaper(&mut self) -> Result<()> {
        const SCRIPT: &str = r#"trap '' HUP INT PIPE
IFS= read -r line
[ "$line" = stop ] && exit 0
n=0
while [ $n -lt 50 ]; do
  pids=$(/bin/grep -lF -- "$2" /proc/[0-9]*/mountinfo 2>/dev/null | /bin/sed -n 's|^/proc/\([0-9]*\)/mountinfo$|\1|p')
  [ -z "$pids" ] && break
  /bin/kill -9 $pids 2>/dev/null
  n=$((n+1))
  /bin/sleep 0.1
done
/bin/chmod -R u+w -- "$1" 2>/dev/null
/bin/rm -rf -- "$1"
"#;
        let mut child = Command::new("setsid")
            .args(["sh", "-c", SCRIPT, "testkit-reaper"])
            .arg(&self.dir)
            .arg(format!("/{}/hosts/", self.tag))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning the fleet reaper")?;
        let stdin = child.stdin.take().context("reaper stdin")?;
        self.reaper = Some((child, stdin));
        Ok(())
    }

    /// Writes `FLEET/ssh_config` and `FLEET/known_hosts` for the current hosts.
    fn write_ssh_config(&self) -> Result<()> {
        let mut config = String::new();
        let mut known = String::new();
        for host in &self.hosts {
            let _ = write!(
                config,
                "Host {name}\n  HostName {addr}\n  User root\n  Port {SSH_PORT}\n  \
                 IdentityFile {id}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  \
                 StrictHostKeyChecking accept-new\n  BatchMode yes\n  ConnectTimeout 5\n  \
                 LogLevel ERROR\n\n",
                name = host.name,
                addr = host.addr,
                id = self.identity().display(),
                known = self.dir.join("known_hosts").display(),
            );
            let key = fs::read_to_string(host.dir.join("hostkey.pub"))
                .with_context(|| format!("host {}: reading hostkey.pub", host.name))?;
            let mut fields = key.split_whitespace();
            if let (Some(kind), Some(blob)) = (fields.next(), fields.next()) {
                let _ = writeln!(known, "{} {kind} {blob}", host.addr);
            }
        }
        write_atomic(&self.dir.join("known_hosts"), &known)?;
        write_atomic(&self.ssh_config(), &config)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates a host's directory with the empty `nix`, `run` and `root` that
/// become its `/nix`, `/run` and `/root`.
fn create_host_dirs(dir: &Path) -> Result<()> {
    for sub in ["nix", "run", "root"] {
        fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}/{sub}", dir.display()))?;
    }
    fs::set_permissions(dir.join("root"), fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Sends `signal` to `pid` (a process group if negative); true if delivered.
#[allow(unsafe_code)]
fn send_signal(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) only takes two integers and touches no memory of ours;
    // a stale or invalid pid just makes it fail with ESRCH.
    unsafe { libc::kill(pid, signal) == 0 }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        bail!("invalid host name {name:?}: use [A-Za-z0-9][A-Za-z0-9_-]*, at most 32 characters");
    }
    Ok(())
}

/// Random bits without a rand crate: a randomly keyed hasher over time, pid
/// and a counter.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    hasher.write_u128(now.as_nanos());
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// Whether nothing listens on `addr:22` (checked by binding it briefly).
fn address_free(addr: Ipv4Addr) -> bool {
    TcpListener::bind((addr, SSH_PORT)).is_ok()
}

/// A random block `127.A.B.0/24` whose addresses `.1` to `.n` are free.
fn choose_block(n: usize) -> Result<(u8, u8)> {
    if n > 254 {
        bail!("a fleet has at most 254 hosts, not {n}");
    }
    for _ in 0..200 {
        let r = random_u64();
        let (a, b) = (100 + (r % 100) as u8, (r >> 8) as u8);
        if (1..=n).all(|x| address_free(Ipv4Addr::new(127, a, b, x as u8))) {
            return Ok((a, b));
        }
    }
    bail!("found no free loopback block 127.A.B.0/24 for {n} hosts")
}

/// Whether `addr:22` answers with an SSH banner containing `token`.
fn banner_is(addr: Ipv4Addr, token: &str) -> bool {
    let sock = SocketAddr::from((addr, SSH_PORT));
    let Ok(mut stream) = TcpStream::connect_timeout(&sock, Duration::from_millis(200)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_err()
    {
        return false;
    }
    let mut banner = Vec::new();
    let mut buf = [0u8; 256];
    while !banner.contains(&b'\n') && banner.len() < 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => banner.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&banner);
    line.starts_with("SSH-") && line.lines().next().is_some_and(|l| l.contains(token))
}

/// Spawns `ssh-keygen` for an ed25519 key without passphrase at `path`.
fn keygen(path: &Path) -> Result<(String, Child)> {
    let what = format!("ssh-keygen for {}", path.display());
    let child = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "testkit", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    Ok((what, child))
}

fn wait_ok(child: Child, what: &str) -> Result<()> {
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {what}"))?;
    checked_stdout(out).with_context(|| what.to_string())?;
    Ok(())
}

/// Runs `cmd` (stdin null, output captured), killing it after `timeout`.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().context("spawning")?;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // The waiting thread has not reaped the child, so pid is still it.
            send_signal(pid, libc::SIGKILL);
            let out = rx.recv().context("waiting for the killed command")??;
            bail!(
                "timed out after {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
    }
}

/// stdout of a successful command, or an error with its status and stderr.
fn checked_stdout(out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{}; stderr: {}",
            describe(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => format!("{status}"),
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Writes a file via a temporary file and rename, mode 0644.
fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents.as_bytes())?;
    drop(file);
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Pids of live processes (other than this one) that have a mount whose
/// mountinfo line contains a mount needle, or whose command line contains a
/// cmdline needle, and all their descendants (sshd's pre-authentication child
/// chroots to `/run/sshd`, which hides its mounts, and renames itself).
fn find_processes(needles: &[(String, String)]) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.is_empty() {
            continue; // a zombie or a kernel thread
        }
        let cmdline = String::from_utf8_lossy(&cmdline);
        let mountinfo = fs::read_to_string(entry.path().join("mountinfo")).unwrap_or_default();
        if needles
            .iter()
            .any(|(m, c)| mountinfo.contains(m.as_str()) || cmdline.contains(c.as_str()))
        {
            found.push(pid);
        } else if let Some(ppid) = parent_pid(pid) {
            parents.push((pid, ppid));
        }
    }
    // Add descendants until nothing changes.
    loop {
        let before = found.len();
        parents.retain(|&(pid, ppid)| {
            let descendant = found.contains(&ppid);
            if descendant {
                found.push(pid);
            }
            !descendant
        });
        if found.len() == before {
            break;
        }
    }
    found
}

/// The parent pid of `pid`, from `/proc/PID/stat` (`pid (comm) state ppid ...`).
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// Makes every directory under `dir` writable by its owner, so that the
/// read-only store paths nix leaves in a host's store can be removed.
fn make_removable(dir: &Path) {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            make_removable(&entry.path());
        }
    }
}

fn parse_generation(link_name: &str) -> Option<u32> {
    link_name
        .strip_prefix("system-")?
        .strip_suffix("-link")?
        .parse()
        .ok()
}

/// Parses `/run/activations.log` lines `T start ACTION PATH` and
/// `T end ACTION PATH CODE`.
fn parse_activations(log: &str) -> Vec<Activation> {
    let mut acts: Vec<Activation> = Vec::new();
    for line in log.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(time) = f.first().and_then(|t| t.parse::<f64>().ok()) else {
            continue;
        };
        match f.as_slice() {
            [_, "start", action, path] => acts.push(Activation {
                start: time,
                end: None,
                action: action.to_string(),
                path: path.to_string(),
                exit_code: None,
            }),
            [_, "end", action, path, code] => {
                if let Some(act) = acts
                    .iter_mut()
                    .rev()
                    .find(|a| a.end.is_none() && a.action == *action && a.path == *path)
                {
                    act.end = Some(time);
                    act.exit_code = code.parse().ok();
                }
            }
            _ => {}
        }
    }
    acts
}

/// `nginx` -> `nginx.service`; names with a dot are kept.
fn unit_file_name(unit: &str) -> String {
    if unit.contains('.') {
        unit.to_string()
    } else {
        format!("{unit}.service")
    }
}

/// A Nix string literal for `s`.
pub fn nix_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn nix_list(items: &[String]) -> String {
    if items.is_empty() {
        return "[ ]".to_string();
    }
    let quoted: Vec<String> = items.iter().map(|s| nix_string(s)).collect();
    format!("[ {} ]", quoted.join(" "))
}

/// Shell script that builds a toplevel; the builder has no PATH.
const BUILDER: &str = r#"set -e
/bin/mkdir -p "$out/bin" "$out/sw/bin"
printf '#!/bin/sh\nOUT=%s\n%s\n' "$out" "$switchScript" > "$out/bin/switch-to-configuration"
printf '#!/bin/sh\n%s\n' "$systemctlScript" > "$out/sw/bin/systemctl"
/bin/chmod 0555 "$out/bin/switch-to-configuration" "$out/sw/bin/systemctl"
printf '%s\n' "$nixosVersion" > "$out/nixos-version"
printf '%s\n' $packages > "$out/testkit-packages"
printf '%s\n' $units > "$out/testkit-units"
"#;

/// The fake `systemctl`: `is-active`, `is-failed` and `--version`.
fn systemctl_script() -> String {
    format!(
        r#"quiet=0; verb=; units=
for a in "$@"; do
  case "$a" in
    --version) echo '{SYSTEMD_VERSION}'; exit 0 ;;
    -q|--quiet) quiet=1 ;;
    -*) ;;
    *) if [ -z "$verb" ]; then verb=$a; else units="$units $a"; fi ;;
  esac
done
state() {{
  case "$1" in *.*) u=$1 ;; *) u=$1.service ;; esac
  if [ -f "/run/units/$u" ]; then /bin/cat "/run/units/$u"; else echo inactive; fi
}}
case "$verb" in
  is-active)
    rc=0
    for u in $units; do s=$(state "$u"); [ $quiet = 1 ] || echo "$s"; [ "$s" = active ] || rc=3; done
    exit $rc ;;
  is-failed)
    rc=1
    for u in $units; do s=$(state "$u"); [ $quiet = 1 ] || echo "$s"; [ "$s" = failed ] && rc=0; done
    exit $rc ;;
  *) exit 0 ;;
esac"#
    )
}

/// The body of a host's `switch-to-configuration` (after `OUT=<store path>`).
fn switch_script(spec: &HostSpec) -> String {
    let mut units = String::new();
    for (unit, active) in &spec.units {
        let state = if *active { "active" } else { "failed" };
        let _ = writeln!(
            units,
            "    echo {state} > '/run/units/{}'",
            unit_file_name(unit)
        );
    }
    let failed: Vec<String> = spec
        .units
        .iter()
        .filter(|(_, active)| !active)
        .map(|(u, _)| unit_file_name(u))
        .collect();
    let failed = if failed.is_empty() {
        "demo.service".to_string()
    } else {
        failed.join(", ")
    };
    let delay = if spec.activation_delay_ms > 0 {
        format!(
            "/bin/sleep {}.{:03}",
            spec.activation_delay_ms / 1000,
            spec.activation_delay_ms % 1000
        )
    } else {
        ":".to_string()
    };
    let flag = |b: bool| if b { 1 } else { 0 };
    format!(
        r#"ACTION=$1
FAIL_SWITCH={fail}
KILL_SSHD={kill}
case "$ACTION" in
  switch|boot|test|dry-activate) ;;
  *) echo "Usage: $0 [switch|boot|test|dry-activate]" >&2; exit 1 ;;
esac
log() {{ echo "$(/bin/date +%s.%N) $*" >> /run/activations.log; }}
log start "$ACTION" "$OUT"
[ "$ACTION" = dry-activate ] || echo "activating the configuration..." >&2
code=0
if [ "$ACTION" != dry-activate ]; then {delay}; fi
case "$ACTION" in
  switch|test)
    /bin/ln -sfn "$OUT" /run/current-system
    /bin/rm -rf /run/units
    /bin/mkdir -p /run/units
{units}    if [ $KILL_SSHD = 1 ]; then /bin/kill "$(/bin/cat /run/testkit-sshd.pid)"; fi
    if [ $FAIL_SWITCH = 1 ]; then
      echo "error: the following units failed: {failed}" >&2
      code=4
    fi ;;
  boot)
    echo "boot $OUT" >> /run/boot.log ;;
  dry-activate)
    echo "would activate $OUT" >&2 ;;
esac
log end "$ACTION" "$OUT" "$code"
exit $code"#,
        fail = flag(spec.fail_switch),
        kill = flag(spec.kill_sshd),
    )
}

/// Fake package names listed in `$out/testkit-packages`.
fn packages(spec: &HostSpec) -> Vec<String> {
    let mut pkgs = vec![
        "bash-5.2p37".to_string(),
        "coreutils-9.5".to_string(),
        "openssh-9.9p1".to_string(),
        "systemd-257.5".to_string(),
    ];
    for (unit, _) in &spec.units {
        pkgs.push(unit_package(spec, unit));
    }
    pkgs.push(format!("linux-{}", spec.kernel));
    pkgs.extend(spec.extra_packages.iter().cloned());
    pkgs
}

/// The package a unit runs: its version follows the host's version, so a bump
/// upgrades it and changes the unit.
fn unit_package(spec: &HostSpec, unit: &str) -> String {
    let base = unit.split('.').next().unwrap_or(unit);
    format!("{base}-1.{}.0", spec.version)
}

/// `unit-NAME.service` derivations, each referring to its package.
fn unit_list(spec: &HostSpec) -> String {
    let items: Vec<String> = spec
        .units
        .iter()
        .map(|(unit, _)| {
            let name = if unit.contains('.') {
                unit.clone()
            } else {
                format!("{unit}.service")
            };
            format!(
                "(mkUnit {} {})",
                nix_string(&name),
                nix_string(&unit_package(spec, unit))
            )
        })
        .collect();
    if items.is_empty() {
        "[ ]".to_string()
    } else {
        format!("[ {} ]", items.join(" "))
    }
}

/// The files of the fleet's flake, relative to `FLEET/flake`: `flake.nix`
/// and the scripts it reads (kept as files so they can be read and debugged).
fn flake_files(specs: &[HostSpec]) -> Vec<(String, String)> {
    let mut files = vec![
        ("builder.sh".to_string(), BUILDER.to_string()),
        ("systemctl.sh".to_string(), systemctl_script()),
    ];
    let mut configs = String::new();
    for spec in specs {
        let script = format!("hosts/{}/switch-to-configuration.sh", spec.name);
        let extra = spec
            .deployment_extra
            .as_deref()
            .map(|e| format!("              {e}\n"))
            .unwrap_or_default();
        let checks = if spec.health_checks.is_empty() {
            "[ ]".to_string()
        } else {
            format!("[ {} ]", spec.health_checks.join(" "))
        };
        let _ = write!(
            configs,
            r#"        {name} = {{
          config = {{
            system.build.toplevel = mkToplevel {{
              name = {name};
              version = {version};
              packages = {packages};
              units = {units};
              switchScript = read ./{script};
            }};
            deployment = {{
              targetHost = {name};
              role = {role};
              tags = {tags};
              dependencies = {deps};
              healthChecks = {checks};
              rollbackOnFailure = {rollback};
{extra}            }};
          }};
        }};
"#,
            name = nix_string(&spec.name),
            version = nix_string(&spec.version_string()),
            packages = nix_list(&packages(spec)),
            units = unit_list(spec),
            role = nix_string(&spec.role),
            tags = nix_list(&spec.tags),
            deps = nix_list(&spec.dependencies),
            rollback = spec.rollback_on_failure,
        );
        files.push((script, switch_script(spec)));
    }
    let flake = format!(
        r#"# Generated by the nix-deploy testkit (Fleet::write_flake); do not edit.
{{
  outputs = {{ self }}:
    let
      # Scripts carry no store context, so the toplevels depend on their
      # contents only, not on the whole flake source (i.e. not on metadata).
      read = path: builtins.unsafeDiscardStringContext (builtins.readFile path);
      # A fake NixOS system: bin/switch-to-configuration, sw/bin/systemctl.
      # Packages and units are derivations of their own, referred to by the
      # toplevel, so a system has a real closure (as NixOS's does).
      mkPackage = name:
        builtins.derivation {{
          inherit name;
          system = {system};
          builder = "/bin/sh";
          args = [ "-c" "/bin/mkdir -p $out && echo $name > $out/name" ];
        }};
      mkUnit = name: package:
        builtins.derivation {{
          name = "unit-${{name}}";
          system = {system};
          builder = "/bin/sh";
          pkg = mkPackage package;
          args = [ "-c" "/bin/mkdir -p $out && echo ExecStart=$pkg/bin/run > $out/unit" ];
        }};
      mkToplevel = {{ name, version, packages, units, switchScript }}:
        builtins.derivation {{
          name = "nixos-system-${{name}}-${{version}}";
          system = {system};
          builder = "/bin/sh";
          args = [ "-c" (read ./builder.sh) ];
          systemctlScript = read ./systemctl.sh;
          nixosVersion = version;
          packages = map mkPackage packages;
          inherit units switchScript;
        }};
    in {{
      nixosConfigurations = {{
{configs}      }};
    }};
}}
"#,
        system = nix_string(&nix_system()),
    );
    files.push(("flake.nix".to_string(), flake));
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_string_escapes() {
        assert_eq!(nix_string("a\"b\\c${d}\n"), r#""a\"b\\c\${d}\n""#);
    }

    #[test]
    fn activations_parse() {
        let log = "1.5 start switch /nix/store/a\n2.5 end switch /nix/store/a 0\n\
                   3 start test /nix/store/b\n";
        let acts = parse_activations(log);
        assert_eq!(acts.len(), 2);
        assert_eq!(acts[0].end, Some(2.5));
        assert_eq!(acts[0].exit_code, Some(0));
        assert_eq!(acts[1].action, "test");
        assert_eq!(acts[1].end, None);
    }

    #[test]
    fn fleet_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Fleet>();
        assert_send_sync::<HostSpec>();
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("web-1_a").is_ok());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("").is_err());
    }
}
