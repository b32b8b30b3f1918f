//! The fleet as the flake describes it, whatever its source
//! ([`crate::source`]: `nixosConfigurations`, a colmena hive, deploy-rs
//! nodes): every host's metadata ([`HostMeta`]: how to reach it and treat
//! it; schema and defaults in `nix/module.nix` and the README, keys in
//! [`crate::keys`]), its evaluated system when it is wanted ([`Host`]), and
//! host selection (`web1 web2`, `--all`, `--on 'web-*'`, `--on @tag`,
//! `--exclude`; the syntax is in [`crate::select`]).
//!
//! Everything read from the flake is validated here, once: host names, SSH
//! destinations, users, store paths and unit names that later reach a remote
//! command line are known to be well-formed past this point. Errors name the
//! attribute at fault and never repeat its value ([`crate::attrs`]), and are
//! one host's own: the others are read all the same.

mod deploy_rs;
mod deployment;
mod inventory;

pub use inventory::{Inventory, Selection};

use std::ops::Deref;
use std::time::Duration;

use serde::Serialize;

use crate::keys::Key;
use crate::shell;
use crate::source::FleetSource;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("the flake's fleet could not be read: {0}")]
    Malformed(String),
    #[error("host `{host}`: {message}")]
    BadHost { host: String, message: String },
    /// `hint`: what the word may have meant ([`crate::select::unknown_host`]).
    #[error("unknown host `{name}`{hint}")]
    UnknownHost { name: String, hint: String },
    #[error("no host has tag `{tag}`{hint}")]
    UnknownTag { tag: String, hint: String },
    #[error("`{selector}` matches no host")]
    NoMatch { selector: String },
    #[error("invalid selector `{selector}`: {reason}")]
    BadSelector { selector: String, reason: String },
    #[error("no host is left to select after --exclude {excluded}")]
    NothingLeft { excluded: String },
    #[error("the flake's fleet has no hosts")]
    Empty,
    #[error("the fleet's meta.allowApplyAll is false: name the hosts to deploy (HOSTS, --on SEL)")]
    ApplyAllRefused,
}

/// Where and as whom we reach a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Target {
    /// SSH destination: a host name, address or alias from the ssh config;
    /// `None` when `deployment.targetHost = null`: the host is not deployed
    /// over SSH, only by `apply-local` on itself.
    pub destination: Option<String>,
    /// `None` (`targetUser = null`): the ssh config decides.
    pub user: Option<String>,
    pub port: Option<u16>,
    /// Extra ssh options (`deployment.sshOptions`), as ssh's arguments.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ssh_options: Vec<String>,
    /// What runs privileged steps when we are not root
    /// (`deployment.privilegeEscalationCommand`), an argument vector.
    pub escalation: Vec<String>,
}

/// `sudo -n --`: never waits for a password.
pub fn default_escalation() -> Vec<String> {
    ["sudo", "-n", "--"].map(String::from).to_vec()
}

impl Target {
    /// Whether privileged steps go through [`Target::escalation`]: unless
    /// we log in as root by name (a user the ssh config chooses may be anyone).
    pub fn needs_sudo(&self) -> bool {
        self.user.as_deref() != Some("root")
    }

    /// `ssh://[user@]destination` for `nix copy`; `None` without a destination.
    pub fn store_uri(&self) -> Option<String> {
        let destination = self.destination.as_deref()?;
        Some(match &self.user {
            Some(user) => format!("ssh://{user}@{destination}"),
            None => format!("ssh://{destination}"),
        })
    }

    /// The destination, for messages (`-` when there is none).
    pub fn describe(&self) -> &str {
        self.destination.as_deref().unwrap_or("-")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum CheckKind {
    /// `systemctl is-active UNIT` on the host.
    Service { unit: String },
    /// A GET from the coordinator.
    Http {
        url: String,
        status: u16,
        body_contains: Option<String>,
    },
    /// A command run on the host through `sh -c`; passes on exit 0.
    Command { command: String },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HealthCheck {
    #[serde(flatten)]
    pub kind: CheckKind,
    /// Per attempt.
    pub timeout: Duration,
    /// Between attempts.
    pub period: Duration,
}

impl HealthCheck {
    pub fn describe(&self) -> String {
        match &self.kind {
            CheckKind::Service { unit } => format!("service {unit}"),
            CheckKind::Http { url, status, .. } => format!("http {url} ({status})"),
            CheckKind::Command { command } => format!("command `{command}`"),
        }
    }
}

/// One host of the fleet as its metadata describes it: how to reach it and
/// how to treat it. Cheap to read for every host; its system is evaluated
/// only when it is deployed or planned ([`Host`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostMeta {
    pub name: String,
    pub target: Target,
    pub role: String,
    /// Host names or `@tag`s that must be deployed and healthy first.
    pub dependencies: Vec<String>,
    pub tags: Vec<String>,
    pub health_checks: Vec<HealthCheck>,
    pub rollback_on_failure: bool,
    /// `deployment.keys`: secrets uploaded outside the store, by file name.
    /// Never their contents (see [`crate::keys`]).
    pub keys: Vec<Key>,
    /// `allowLocalDeployment`: `apply-local` may deploy it on itself.
    pub allow_local_deployment: bool,
    /// `buildOnTarget`: the host builds its own system from the derivation.
    pub build_on_target: bool,
    /// `substituteOnDestination` (deploy-rs: `fastConnection = false`):
    /// `None` takes the deployment's setting (on unless `--no-substitute`).
    pub substitute_on_destination: Option<bool>,
    /// `replaceUnknownProfiles`: deploy over a system nix-deploy never
    /// deployed to this host.
    pub replace_unknown_profiles: bool,
    /// The confirmation watchdog (magic rollback) is armed on activation;
    /// deploy-rs's `magicRollback = false` turns it off for a host.
    pub magic_rollback: bool,
    /// This host's confirm and activation timeouts (deploy-rs's
    /// `confirmTimeout`, `activationTimeout`), over the deployment's.
    #[serde(
        with = "crate::duration::human::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub confirm_timeout: Option<Duration>,
    #[serde(
        with = "crate::duration::human::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub activation_timeout: Option<Duration>,
    /// What an operator should know about this host's metadata (never a
    /// value): logged with the plan and the deployment.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// `deployment.promotionKey`: pairs this host with its counterpart in
    /// another environment (`nix-deploy promote`, see [`crate::promote`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub promotion_key: Option<String>,
}

impl HostMeta {
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// Defaults for a host `name` reached at `name` as root.
    pub(crate) fn new(name: &str) -> Self {
        HostMeta {
            name: name.to_string(),
            target: Target {
                destination: Some(name.to_string()),
                user: Some("root".to_string()),
                port: None,
                ssh_options: Vec::new(),
                escalation: default_escalation(),
            },
            role: "client".to_string(),
            dependencies: Vec::new(),
            tags: Vec::new(),
            health_checks: Vec::new(),
            rollback_on_failure: true,
            keys: Vec::new(),
            allow_local_deployment: false,
            build_on_target: false,
            substitute_on_destination: None,
            replace_unknown_profiles: true,
            magic_rollback: true,
            confirm_timeout: None,
            activation_timeout: None,
            warnings: Vec::new(),
            promotion_key: None,
        }
    }

    /// Checks every source's metadata gets, once it is read.
    fn check(&self) -> Result<(), String> {
        if let Some(destination) = &self.target.destination
            && !shell::is_valid_ssh_destination(destination)
        {
            return Err("deployment.targetHost is not a valid SSH destination (letters, digits, `-_.:[]%`, not starting with `-`)".into());
        }
        if let Some(user) = &self.target.user
            && !shell::is_valid_user(user)
        {
            return Err("deployment.targetUser is not a valid user name".into());
        }
        if self.target.port == Some(0) {
            return Err("deployment.targetPort must not be 0".into());
        }
        crate::sshopts::config_lines(&self.target.ssh_options)
            .map_err(|e| format!("deployment.sshOptions: {e}"))?;
        match self.target.escalation.first() {
            Some(program) if !program.is_empty() && !program.starts_with('-') => {}
            _ => {
                return Err(
                    "deployment.privilegeEscalationCommand must start with a program (e.g. [ \"sudo\" \"-n\" \"--\" ])"
                        .into(),
                );
            }
        }
        if self
            .target
            .escalation
            .iter()
            .any(|w| w.chars().any(char::is_control))
        {
            return Err("deployment.privilegeEscalationCommand holds control characters".into());
        }
        for dep in &self.dependencies {
            let bare = dep.strip_prefix('@').unwrap_or(dep);
            if !shell::is_valid_host_name(bare) {
                return Err("deployment.dependencies: an entry is not a host name or @tag".into());
            }
        }
        for tag in &self.tags {
            if !shell::is_valid_host_name(tag) {
                return Err(format!(
                    "deployment.tags: tag `{tag}` is not valid (letters, digits, `-`, `_`, `.`)"
                ));
            }
        }
        if let Some(key) = &self.promotion_key
            && !shell::is_valid_host_name(key)
        {
            return Err(format!(
                "deployment.promotionKey `{key}` is not valid (letters, digits, `-`, `_`, `.`)"
            ));
        }
        crate::keys::check_unique_paths(&self.keys)
    }
}

/// A host's evaluated system.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct System {
    /// What the host runs once deployed (`/run/current-system`) and its
    /// profile points at.
    pub toplevel: String,
    /// The derivation whose build gives it.
    pub drv_path: String,
    /// What building `drv_path` gives when that is not `toplevel` itself:
    /// deploy-rs's `activate.nixos` wrapper, which holds the toplevel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub built_path: Option<String>,
}

impl System {
    /// What a build of [`System::drv_path`] must produce.
    pub fn build_output(&self) -> &str {
        self.built_path.as_deref().unwrap_or(&self.toplevel)
    }
}

/// A host to deploy or plan: its metadata and its evaluated system. It reads
/// as its metadata (`host.name`, `host.target`, ...).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Host {
    #[serde(flatten)]
    pub meta: HostMeta,
    #[serde(flatten)]
    pub system: System,
}

impl Deref for Host {
    type Target = HostMeta;
    fn deref(&self) -> &HostMeta {
        &self.meta
    }
}

impl Host {
    /// The evaluated `config.system.build.toplevel` (or deploy-rs's system profile).
    pub fn toplevel(&self) -> &str {
        &self.system.toplevel
    }
}

/// What one host's evaluation gave: its metadata, and its system when it
/// was wanted.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluated {
    pub meta: HostMeta,
    pub system: Option<System>,
}

pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CHECK_PERIOD: Duration = Duration::from_secs(2);

fn store_path(path: &str, what: &str) -> Result<String, String> {
    if shell::is_valid_store_path(path) {
        Ok(path.to_string())
    } else {
        Err(format!("{what} is not a store path"))
    }
}

/// One host from its entry of the evaluation of `source` (`{ deployment;
/// toplevel?; drvPath?; builtPath?; }`), validated.
pub fn parse_host(
    source: FleetSource,
    name: &str,
    value: serde_json::Value,
) -> Result<Evaluated, InventoryError> {
    let bad = |message: String| InventoryError::BadHost {
        host: name.to_string(),
        message,
    };
    if !shell::is_valid_host_name(name) {
        return Err(bad(
            "not a valid host name (letters, digits, `-`, `_`, `.`)".into(),
        ));
    }
    let mut entry = crate::attrs::Attrs::new("the evaluation", value).map_err(bad)?;
    let deployment = entry.value("deployment").unwrap_or_default();
    let toplevel = entry.string("toplevel").map_err(bad)?;
    let drv_path = entry.string("drvPath").map_err(bad)?;
    let built_path = entry.string("builtPath").map_err(bad)?;
    entry.finish().map_err(bad)?;
    let meta = match source {
        FleetSource::Nixos | FleetSource::Colmena => deployment::parse(name, deployment),
        FleetSource::DeployRs => deploy_rs::parse(name, deployment),
    }
    .and_then(|meta| meta.check().map(|()| meta))
    .map_err(bad)?;
    let system = match (toplevel, drv_path) {
        (Some(toplevel), Some(drv_path)) => {
            let toplevel = store_path(&toplevel, "the toplevel").map_err(bad)?;
            if !(shell::is_valid_store_path(&drv_path) && drv_path.ends_with(".drv")) {
                return Err(bad("the drvPath is not a derivation path".into()));
            }
            let built_path = built_path
                .map(|p| store_path(&p, "the built path"))
                .transpose()
                .map_err(bad)?;
            Some(System {
                toplevel,
                drv_path,
                built_path,
            })
        }
        (None, None) => None,
        _ => {
            return Err(bad(
                "the evaluation gave a toplevel without its derivation".into()
            ));
        }
    };
    Ok(Evaluated { meta, system })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system";
    const D: &str = "/nix/store/c7syrkx06plw1dwvs86ny93v9ivpjlw3-nixos-system.drv";

    fn fleet_json() -> String {
        serde_json::json!({
            "p620": { "toplevel": P, "drvPath": D, "deployment": {
                "role": "infrastructure", "tags": ["monitoring"],
                "healthChecks": [ { "service": "prometheus" },
                                  { "http": "http://p620:9090/-/healthy", "timeout": 5 } ] } },
            "razer": { "toplevel": P, "drvPath": D, "deployment": {
                "targetHost": "razer.lan", "targetUser": "deploy", "targetPort": 2222,
                "dependencies": ["p620"], "tags": ["laptop"], "rollbackOnFailure": false } },
            "samsung": { "toplevel": P, "drvPath": D, "deployment": { "tags": ["laptop"],
                "targetHost": null, "targetPort": null } },
            "bare": { "toplevel": P, "drvPath": D },
        })
        .to_string()
    }

    #[test]
    fn applies_design_defaults() {
        let inv = Inventory::from_eval_json(FleetSource::Nixos, &fleet_json()).unwrap();
        let bare = inv.get("bare").unwrap();
        assert_eq!(bare.target.destination.as_deref(), Some("bare"));
        assert_eq!(bare.target.user.as_deref(), Some("root"));
        assert_eq!(bare.target.port, None);
        assert_eq!(bare.role, "client");
        assert!(bare.rollback_on_failure);
        assert!(bare.health_checks.is_empty());

        let razer = inv.get("razer").unwrap();
        assert_eq!(
            razer.target.store_uri().as_deref(),
            Some("ssh://deploy@razer.lan")
        );
        assert_eq!(razer.target.port, Some(2222));
        assert!(razer.target.needs_sudo());
        assert!(!razer.rollback_on_failure);

        let p620 = inv.get("p620").unwrap();
        assert_eq!(p620.health_checks.len(), 2);
        assert_eq!(p620.health_checks[1].timeout, Duration::from_secs(5));
        assert_eq!(p620.health_checks[1].period, DEFAULT_CHECK_PERIOD);
        assert!(matches!(
            &p620.health_checks[1].kind,
            CheckKind::Http { status: 200, .. }
        ));
    }

    #[test]
    fn selects_by_name_tag_and_all() {
        let inv = Inventory::from_eval_json(FleetSource::Nixos, &fleet_json()).unwrap();
        let sel = |names: &[&str], tags: &[&str], all| Selection {
            names: names.iter().map(|s| s.to_string()).collect(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
            all,
            exclude: Vec::new(),
        };
        assert_eq!(inv.select(&sel(&[], &[], false)).unwrap().len(), 4);
        assert_eq!(inv.select(&sel(&["p620"], &[], true)).unwrap().len(), 4);
        assert_eq!(
            inv.select(&sel(&["razer", "p620", "razer"], &[], false))
                .unwrap(),
            ["p620", "razer"]
        );
        assert_eq!(
            inv.select(&sel(&[], &["@laptop"], false)).unwrap(),
            ["razer", "samsung"]
        );
        assert_eq!(
            inv.select(&sel(&["@monitoring", "bare"], &[], false))
                .unwrap(),
            ["bare", "p620"]
        );
        let err = inv.select(&sel(&["p621"], &[], false)).unwrap_err();
        assert!(err.to_string().contains("unknown host `p621`"), "{err}");
        assert!(inv.select(&sel(&[], &["nope"], false)).is_err());
    }

    #[test]
    fn rejects_dangerous_or_malformed_metadata() {
        let bad = |deployment: serde_json::Value| {
            let json = serde_json::json!({ "h": { "toplevel": P, "drvPath": D, "deployment": deployment } });
            Inventory::from_eval_json(FleetSource::Nixos, &json.to_string())
                .unwrap_err()
                .to_string()
        };
        assert!(
            bad(serde_json::json!({ "targetHost": "-oProxyCommand=sh" })).contains("targetHost")
        );
        assert!(bad(serde_json::json!({ "targetUser": "root;id" })).contains("targetUser"));
        assert!(
            bad(serde_json::json!({ "healthChecks": [ { "service": "x; reboot" } ] }))
                .contains("unit name")
        );
        assert!(
            bad(serde_json::json!({ "healthChecks": [ { "service": "a", "http": "http://x" } ] }))
                .contains("exactly one")
        );
        assert!(
            bad(serde_json::json!({ "healthChecks": [ { "sevice": "a" } ] }))
                .contains("unknown field `sevice`")
        );
        assert!(
            bad(serde_json::json!({ "healthChecks": [ { "service": "a", "timeout": -1 } ] }))
                .contains("timeout")
        );
        assert!(
            bad(serde_json::json!({ "tags": "web" }))
                .contains("deployment.tags must be a list of strings, not a string")
        );
        // Values are never repeated: a secret may be in the wrong attribute.
        let e = bad(serde_json::json!({ "targetPort": "hunter2" }));
        assert!(
            e.contains("deployment.targetPort") && !e.contains("hunter2"),
            "{e}"
        );
        let e = bad(serde_json::json!({ "targetUser": "hunter2;x" }));
        assert!(!e.contains("hunter2"), "{e}");
        assert!(
            bad(serde_json::json!({ "healthChecks": [ { "service": "a", "period": 1e-300 } ] }))
                .contains("period")
        );
        let e = bad(serde_json::json!({ "keys": { "db": { "hasText": true, "destdir": "/x" } } }));
        assert!(
            e.contains("deployment.keys.db: unknown field `destdir`"),
            "{e}"
        );
        let e =
            bad(serde_json::json!({ "keys": { "db": { "hasText": true, "permissions": "999" } } }));
        assert!(e.contains("deployment.keys.db.permissions"), "{e}");
        let typo = bad(serde_json::json!({ "healthCheck": [ { "service": "a" } ] }));
        assert!(typo.contains("unknown field `healthCheck`"), "{typo}");
        let json = serde_json::json!({ "h": { "toplevel": "/tmp/x", "drvPath": D } });
        assert!(Inventory::from_eval_json(FleetSource::Nixos, &json.to_string()).is_err());
        assert!(matches!(
            Inventory::from_eval_json(FleetSource::Nixos, "{}"),
            Err(InventoryError::Empty)
        ));
        assert!(matches!(
            Inventory::from_eval_json(FleetSource::Nixos, "[1]"),
            Err(InventoryError::Malformed(_))
        ));
    }
}
