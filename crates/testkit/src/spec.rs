//! What a test host is ([`HostSpec`]) and what it recorded ([`Activation`]).

use anyhow::{Result, bail};

use crate::*;

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
    /// Units and how each behaves after activation. A name without a dot
    /// means `NAME.service`.
    pub units: Vec<(String, UnitState)>,
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
    /// `deployment.targetUser`: a non-root user that logs in with the fleet's
    /// key and has passwordless `sudo`, and a `nix-daemon` in the host that
    /// trusts it, as on NixOS. `None`: root logs in.
    pub user: Option<String>,
    /// Extra packages (`name-version`) in the closure, each a derivation of its own.
    pub extra_packages: Vec<String>,
    /// The host's Nix `substituters` (e.g. a binary cache on loopback,
    /// `http://127.0.0.1:PORT?trusted=1`); none by default.
    pub substituters: Option<String>,
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
            user: None,
            substituters: None,
        }
    }

    /// Sets [`HostSpec::substituters`] (read when the host starts).
    pub fn substituters(mut self, substituters: &str) -> Self {
        self.substituters = Some(substituters.to_string());
        self
    }

    /// Deploy as the non-root `user` (see [`HostSpec::user`]).
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
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
        let state = if active {
            UnitState::Active
        } else {
            UnitState::Failed
        };
        self.units.push((unit.to_string(), state));
        self
    }

    /// Adds a unit `NAME.service` that comes up `ms` after the switch (it is
    /// `activating` until then), and the health check for it.
    pub fn slow_service(mut self, name: &str, ms: u64) -> Self {
        self.units
            .push((name.to_string(), UnitState::ActiveAfter(ms)));
        let check = format!("{{ service = {}; period = 0.5; }}", nix_string(name));
        self.health_check(&check)
    }

    /// Adds a unit `NAME.service` that flaps: active for `period_ms`, failed
    /// for `period_ms`, and so on from the switch; and the health check.
    pub fn flapping_service(mut self, name: &str, period_ms: u64) -> Self {
        self.units
            .push((name.to_string(), UnitState::Flapping(period_ms)));
        let check = format!("{{ service = {}; period = 0.5; }}", nix_string(name));
        self.health_check(&check)
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

    pub(crate) fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if let Some(user) = &self.user {
            validate_name(user)?;
            if user == "root" {
                bail!("host {}: user root is the default; set no user", self.name);
            }
        }
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

/// How a unit behaves after the switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitState {
    Active,
    Failed,
    /// `activating` until this many milliseconds after the switch, then active.
    ActiveAfter(u64),
    /// Active and failed in turn, each for this many milliseconds.
    Flapping(u64),
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

pub(crate) fn parse_generation(link_name: &str) -> Option<u32> {
    link_name
        .strip_prefix("system-")?
        .strip_suffix("-link")?
        .parse()
        .ok()
}

/// Parses `/run/activations.log` lines `T start ACTION PATH` and
/// `T end ACTION PATH CODE`.
pub(crate) fn parse_activations(log: &str) -> Vec<Activation> {
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

/// One run of `switch-to-configuration` from the host's activation history
/// (on its disk: it survives reboots), see [`Fleet::activation_history`].
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    /// When it started and what it was, as in `activations.log`.
    pub activation: Activation,
    /// The pid of the `switch-to-configuration` process (the host shares
    /// this machine's pid namespace).
    pub pid: u32,
    /// `deployer` (anyone over ssh) or `boot` (the host's boot activating
    /// its boot generation, [`Fleet::reboot_host`]).
    pub by: String,
}

/// Parses the history lines `T start ACTION PATH PID BY` and
/// `T end ACTION PATH CODE PID BY`.
pub(crate) fn parse_history(log: &str) -> Vec<HistoryEntry> {
    let mut entries: Vec<HistoryEntry> = Vec::new();
    for line in log.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(time) = f.first().and_then(|t| t.parse::<f64>().ok()) else {
            continue;
        };
        match f.as_slice() {
            [_, "start", action, path, pid, by] => entries.push(HistoryEntry {
                activation: Activation {
                    start: time,
                    end: None,
                    action: action.to_string(),
                    path: path.to_string(),
                    exit_code: None,
                },
                pid: pid.parse().unwrap_or(0),
                by: by.to_string(),
            }),
            [_, "end", _, _, code, pid, _] => {
                let pid: u32 = pid.parse().unwrap_or(0);
                if let Some(entry) = entries
                    .iter_mut()
                    .rev()
                    .find(|e| e.activation.end.is_none() && e.pid == pid)
                {
                    entry.activation.end = Some(time);
                    entry.activation.exit_code = code.parse().ok();
                }
            }
            _ => {}
        }
    }
    entries
}
