//! The fleet as the flake describes it: every host's toplevel and its
//! `config.deployment` metadata (schema and defaults in `nix/module.nix` and the README, keys in
//! [`crate::keys`]), and host selection (`web1 web2`, `--all`, `--on
//! 'web-*'`, `--on @tag`, `--exclude`; the syntax is in [`crate::select`]).
//!
//! Everything read from the flake is validated here, once: host names, SSH
//! destinations, users, store paths and unit names that later reach a remote
//! command line are known to be well-formed past this point.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::keys::{Key, RawKey};
use crate::shell;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("the flake's nixosConfigurations could not be read: {0}")]
    Malformed(String),
    #[error("host `{host}`: {message}")]
    BadHost { host: String, message: String },
    #[error("unknown host `{name}` (the fleet has: {known})")]
    UnknownHost { name: String, known: String },
    #[error("no host has tag `{tag}`")]
    UnknownTag { tag: String },
    #[error("`{selector}` matches no host")]
    NoMatch { selector: String },
    #[error("invalid selector `{selector}`: {reason}")]
    BadSelector { selector: String, reason: String },
    #[error("no host is left to select after --exclude {excluded}")]
    NothingLeft { excluded: String },
    #[error("the flake defines no nixosConfigurations")]
    Empty,
}

/// Where and as whom we reach a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Target {
    /// SSH destination: a host name, address or alias from the ssh config.
    pub destination: String,
    pub user: String,
    pub port: Option<u16>,
}

impl Target {
    /// Whether privileged steps need `sudo`.
    pub fn needs_sudo(&self) -> bool {
        self.user != "root"
    }

    /// `ssh://user@destination` for `nix copy`.
    pub fn store_uri(&self) -> String {
        format!("ssh://{}@{}", self.user, self.destination)
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

/// One host of the fleet.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Host {
    pub name: String,
    /// The evaluated `config.system.build.toplevel` (for a promotion's
    /// target: its source host's running system).
    pub toplevel: String,
    /// Its derivation (empty when the system was not evaluated here: a
    /// promotion fetches it from the source host instead of building it).
    pub drv_path: String,
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
    /// `deployment.promotionKey`: pairs this host with its counterpart in
    /// another environment (`nix-deploy promote`, see [`crate::promote`]).
    pub promotion_key: Option<String>,
}

impl Host {
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// What `nix eval` returns per host (see [`crate::nix::FLEET_APPLY_EXPR`]).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawHost {
    toplevel: String,
    drv_path: String,
    #[serde(default)]
    deployment: RawDeployment,
}

/// A host's deployment metadata alone (see
/// [`crate::nix::deployment_command`]): no system evaluated.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    #[serde(default)]
    deployment: RawDeployment,
}

/// `config.deployment`: an attribute we do not know is an error naming it,
/// so a typo can never silently disable a health check.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDeployment {
    target_host: Option<String>,
    target_user: Option<String>,
    target_port: Option<u16>,
    role: Option<String>,
    #[serde(default)]
    dependencies: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    health_checks: Vec<RawCheck>,
    rollback_on_failure: Option<bool>,
    /// Read key by key, so that an error names the key.
    #[serde(default)]
    keys: BTreeMap<String, serde_json::Value>,
    promotion_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    service: Option<String>,
    http: Option<String>,
    status: Option<u16>,
    #[serde(alias = "bodyContains", alias = "contains")]
    body: Option<String>,
    command: Option<String>,
    timeout: Option<f64>,
    period: Option<f64>,
}

pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CHECK_PERIOD: Duration = Duration::from_secs(2);

/// The whole fleet, by name.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    hosts: BTreeMap<String, Host>,
}

/// Which hosts a command is about (the syntax is in [`crate::select`]).
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Positional selectors: host names or globs, `@tag` or `@tag-glob`.
    pub names: Vec<String>,
    /// Selectors from `--on` (the same syntax; repeatable, comma lists).
    pub tags: Vec<String>,
    pub all: bool,
    /// Selectors from `--exclude`: removed from what the others select.
    pub exclude: Vec<String>,
}

impl Selection {
    /// Whether nothing narrows the selection down (exclusions aside).
    pub fn is_everything(&self) -> bool {
        self.all || (self.names.is_empty() && self.tags.is_empty())
    }
}

fn seconds(value: Option<f64>, default: Duration, what: &str) -> Result<Duration, String> {
    match value {
        None => Ok(default),
        // At least 0.1 s: a period that rounds to nothing would be a tight loop.
        Some(v) if v.is_finite() && (0.1..=86_400.0).contains(&v) => Ok(Duration::from_secs_f64(v)),
        Some(v) => Err(format!(
            "{what} must be a number of seconds from 0.1 to 86400, not {v}"
        )),
    }
}

fn parse_check(raw: RawCheck) -> Result<HealthCheck, String> {
    let kind = match (raw.service, raw.http, raw.command) {
        (Some(unit), None, None) => {
            if !shell::is_valid_unit_name(&unit) {
                return Err(format!("`{unit}` is not a valid systemd unit name"));
            }
            CheckKind::Service { unit }
        }
        (None, Some(url), None) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "health check URL `{url}` must start with http:// or https://"
                ));
            }
            CheckKind::Http {
                url,
                status: raw.status.unwrap_or(200),
                body_contains: raw.body,
            }
        }
        (None, None, Some(command)) => {
            if command.trim().is_empty() {
                return Err("a command health check needs a command".into());
            }
            CheckKind::Command { command }
        }
        _ => {
            return Err(
                "each health check needs exactly one of `service`, `http` or `command`".into(),
            );
        }
    };
    Ok(HealthCheck {
        kind,
        timeout: seconds(raw.timeout, DEFAULT_CHECK_TIMEOUT, "timeout")?,
        period: seconds(raw.period, DEFAULT_CHECK_PERIOD, "period")?,
    })
}

fn parse_host(name: &str, raw: RawHost) -> Result<Host, String> {
    if !shell::is_valid_host_name(name) {
        return Err("not a valid host name (letters, digits, `-`, `_`, `.`)".into());
    }
    if !shell::is_valid_store_path(&raw.toplevel) {
        return Err(format!("toplevel `{}` is not a store path", raw.toplevel));
    }
    if !(shell::is_valid_store_path(&raw.drv_path) && raw.drv_path.ends_with(".drv")) {
        return Err(format!(
            "drvPath `{}` is not a derivation path",
            raw.drv_path
        ));
    }
    host_from_deployment(name, raw.toplevel, raw.drv_path, raw.deployment)
}

/// A host from its validated `deployment` and the system it gets
/// (`toplevel` and `drv_path`, or empty when no system was evaluated).
fn host_from_deployment(
    name: &str,
    toplevel: String,
    drv_path: String,
    d: RawDeployment,
) -> Result<Host, String> {
    if !shell::is_valid_host_name(name) {
        return Err("not a valid host name (letters, digits, `-`, `_`, `.`)".into());
    }
    let destination = d.target_host.unwrap_or_else(|| name.to_string());
    if !shell::is_valid_ssh_destination(&destination) {
        return Err(format!(
            "deployment.targetHost `{destination}` is not a valid SSH destination"
        ));
    }
    let user = d.target_user.unwrap_or_else(|| "root".to_string());
    if !shell::is_valid_user(&user) {
        return Err(format!(
            "deployment.targetUser `{user}` is not a valid user name"
        ));
    }
    if d.target_port == Some(0) {
        return Err("deployment.targetPort must not be 0".into());
    }
    for dep in &d.dependencies {
        let bare = dep.strip_prefix('@').unwrap_or(dep);
        if !shell::is_valid_host_name(bare) {
            return Err(format!("dependency `{dep}` is not a host name or @tag"));
        }
    }
    for tag in &d.tags {
        if !shell::is_valid_host_name(tag) {
            return Err(format!(
                "tag `{tag}` is not valid (letters, digits, `-`, `_`, `.`)"
            ));
        }
    }
    let health_checks = d
        .health_checks
        .into_iter()
        .map(parse_check)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("deployment.healthChecks: {e}"))?;
    let keys = d
        .keys
        .into_iter()
        .map(|(attr, value)| {
            serde_json::from_value::<RawKey>(value)
                .map_err(|e| e.to_string())
                .and_then(|raw| crate::keys::parse_key(&attr, raw))
                .map_err(|e| format!("deployment.keys.{attr}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    crate::keys::check_unique_paths(&keys)?;
    if let Some(key) = &d.promotion_key
        && !shell::is_valid_host_name(key)
    {
        return Err(format!(
            "deployment.promotionKey `{key}` is not valid (letters, digits, `-`, `_`, `.`)"
        ));
    }
    Ok(Host {
        name: name.to_string(),
        toplevel,
        drv_path,
        target: Target {
            destination,
            user,
            port: d.target_port,
        },
        role: d.role.unwrap_or_else(|| "client".to_string()),
        dependencies: d.dependencies,
        tags: d.tags,
        health_checks,
        rollback_on_failure: d.rollback_on_failure.unwrap_or(true),
        keys,
        promotion_key: d.promotion_key,
    })
}

impl Inventory {
    /// Parse the JSON of [`crate::nix::FLEET_APPLY_EXPR`].
    pub fn from_eval_json(json: &str) -> Result<Self, InventoryError> {
        let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(json)
            .map_err(|e| InventoryError::Malformed(format!("not a JSON object of hosts: {e}")))?;
        if raw.is_empty() {
            return Err(InventoryError::Empty);
        }
        let mut hosts = BTreeMap::new();
        for (name, value) in raw {
            let host = Self::parse_host(&name, value)?;
            hosts.insert(name, host);
        }
        Ok(Inventory { hosts })
    }

    /// One host from its entry in the evaluation's JSON, validated.
    pub fn parse_host(name: &str, value: serde_json::Value) -> Result<Host, InventoryError> {
        let raw_host: RawHost =
            serde_json::from_value(value).map_err(|e| InventoryError::BadHost {
                host: name.to_string(),
                message: format!("unexpected shape: {e}"),
            })?;
        parse_host(name, raw_host).map_err(|message| InventoryError::BadHost {
            host: name.to_string(),
            message,
        })
    }

    /// One host from its deployment metadata alone (no system was
    /// evaluated: its `toplevel` and `drv_path` are empty until a promotion
    /// gives it the system of its source host).
    pub fn parse_metadata(name: &str, value: serde_json::Value) -> Result<Host, InventoryError> {
        let bad = |message: String| InventoryError::BadHost {
            host: name.to_string(),
            message,
        };
        let raw: RawMetadata =
            serde_json::from_value(value).map_err(|e| bad(format!("unexpected shape: {e}")))?;
        host_from_deployment(name, String::new(), String::new(), raw.deployment).map_err(bad)
    }

    pub fn from_hosts(hosts: impl IntoIterator<Item = Host>) -> Self {
        Inventory {
            hosts: hosts.into_iter().map(|h| (h.name.clone(), h)).collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Host> {
        self.hosts.get(name)
    }

    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.values()
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Every host name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.hosts.keys().cloned().collect()
    }

    /// Hosts with `tag`; an error when none has it.
    pub fn with_tag(&self, tag: &str) -> Result<Vec<&Host>, InventoryError> {
        let found: Vec<&Host> = self.hosts.values().filter(|h| h.has_tag(tag)).collect();
        if found.is_empty() {
            return Err(InventoryError::UnknownTag {
                tag: tag.to_string(),
            });
        }
        Ok(found)
    }

    /// Resolve a selection to host names, sorted and without duplicates.
    /// Every selector and exclusion must match: a typo is an error, never an
    /// empty or a larger deployment ([`crate::select`]).
    pub fn select(&self, selection: &Selection) -> Result<Vec<String>, InventoryError> {
        crate::select::resolve(self, selection)
    }
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
        let inv = Inventory::from_eval_json(&fleet_json()).unwrap();
        let bare = inv.get("bare").unwrap();
        assert_eq!(bare.target.destination, "bare");
        assert_eq!(bare.target.user, "root");
        assert_eq!(bare.target.port, None);
        assert_eq!(bare.role, "client");
        assert!(bare.rollback_on_failure);
        assert!(bare.health_checks.is_empty());

        let razer = inv.get("razer").unwrap();
        assert_eq!(razer.target.store_uri(), "ssh://deploy@razer.lan");
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
        let inv = Inventory::from_eval_json(&fleet_json()).unwrap();
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
            Inventory::from_eval_json(&json.to_string())
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
        assert!(bad(serde_json::json!({ "tags": "web" })).contains("unexpected shape"));
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
        assert!(e.contains("deployment.keys.db: permissions"), "{e}");
        let typo = bad(serde_json::json!({ "healthCheck": [ { "service": "a" } ] }));
        assert!(typo.contains("unknown field `healthCheck`"), "{typo}");
        let json = serde_json::json!({ "h": { "toplevel": "/tmp/x", "drvPath": D } });
        assert!(Inventory::from_eval_json(&json.to_string()).is_err());
        assert!(matches!(
            Inventory::from_eval_json("{}"),
            Err(InventoryError::Empty)
        ));
        assert!(matches!(
            Inventory::from_eval_json("[1]"),
            Err(InventoryError::Malformed(_))
        ));
    }
}
