//! The daemon's configuration file (TOML), with the seed's options: default
//! strategy, parallel limit, health-check timeout, auto-rollback,
//! notifications; plus where to listen, tokens and hook secrets.
//!
//! Secrets are never in this file: it names files that hold them. A secret
//! is kept in [`Secret`], which never prints its value. A relative secret
//! path names a systemd credential (`LoadCredential=NAME:...`): it is read
//! from `$CREDENTIALS_DIRECTORY` ([`secret_path`]), as the NixOS module
//! configures it, so no secret ever needs to be in the Nix store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use nix_deploy_core::approval::{ApprovalRule, ApprovalSpec, Groups, check_groups};
use nix_deploy_core::options::{Amount, DeployOptions, OptionsError, Request};
use nix_deploy_core::select::HostFilter;
use nix_deploy_core::window::{self, Schedule, WindowSpec, Windows};

use super::mail::SmtpConfig;
use super::notify::NotifyConfig;
use super::watch::WatchConfig;
use super::web::WebConfig;
use crate::engine::Policy;
use crate::store::{DatabaseUrl, LeaseTiming};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// A secret value; `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Read a secret from a file, trimming the trailing newline editors add.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let trimmed = String::from_utf8_lossy(&text).trim().to_string();
        if trimmed.is_empty() {
            return Err(ConfigError::Invalid(format!("{} is empty", path.display())));
        }
        Ok(Secret(trimmed.into_bytes()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where the secret file `path` of the config is: itself when absolute; a
/// relative path names a systemd credential, in `credentials` (the
/// service's `$CREDENTIALS_DIRECTORY`). `key` names the config key for the
/// error.
pub fn secret_path(
    key: &str,
    path: &Path,
    credentials: Option<&Path>,
) -> Result<PathBuf, ConfigError> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let bad = |why: &str| ConfigError::Invalid(format!("{key} `{}`: {why}", path.display()));
    if path
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(bad("a credential is a plain name (no `..`)"));
    }
    match credentials {
        Some(dir) => Ok(dir.join(path)),
        None => Err(bad(
            "a relative path names a systemd credential, but $CREDENTIALS_DIRECTORY is not set (give an absolute path, or LoadCredential= it)",
        )),
    }
}

/// [`secret_path`] with this process's `$CREDENTIALS_DIRECTORY`.
pub fn secret_path_here(key: &str, path: &Path) -> Result<PathBuf, ConfigError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    secret_path(key, path, credentials.as_deref())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Deploy,
    Admin,
}

impl Scope {
    /// admin ⊇ deploy ⊇ read.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TokenConfig {
    /// Who this token is, recorded with every request it makes.
    pub name: String,
    pub file: PathBuf,
    pub scope: Scope,
    /// The hosts it may touch (selectors: names, globs, `@tags`); none:
    /// every host.
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// `[chat]`: who may do what from Slack.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChatConfig {
    /// A chat deployment touching more hosts than this posts its plan
    /// with Confirm and Cancel buttons first.
    #[serde(default = "default_confirm_above")]
    pub confirm_above: usize,
    /// Slack users allowed to use the command (by user id); nobody else may
    /// do anything but ask for help.
    #[serde(default)]
    pub users: Vec<ChatGrant>,
    /// Channels it may be used in (by channel id); none listed: any.
    #[serde(default)]
    pub channels: Vec<ChatGrant>,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            confirm_above: default_confirm_above(),
            users: Vec::new(),
            channels: Vec::new(),
        }
    }
}

fn default_confirm_above() -> usize {
    1
}

/// A Slack user or channel, with what it allows.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChatGrant {
    /// Slack's id (`U024BE7LH`, `C024BE91L`), never a display name.
    pub id: String,
    pub scope: Scope,
    /// Selectors of the hosts it may touch; none: every host.
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// `[[schedule]]`: a deployment started by the clock.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ScheduleConfig {
    pub name: String,
    /// A cron pattern, as windows take it.
    pub cron: String,
    #[serde(default = "utc")]
    pub timezone: String,
    /// The request, as the API takes it (`hosts`, `on`, `strategy`,
    /// `batch_size`, …).
    #[serde(default)]
    pub request: Request,
}

fn utc() -> String {
    "UTC".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SlackConfig {
    pub signing_secret_file: PathBuf,
    /// Where progress may be posted (`response_url` must start with one).
    #[serde(default = "default_response_prefixes")]
    pub response_url_prefixes: Vec<String>,
}

fn default_response_prefixes() -> Vec<String> {
    vec!["https://hooks.slack.com/".into()]
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GithubConfig {
    pub secret_file: PathBuf,
    /// Pushes to this branch deploy.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// The flake to pin to the pushed revision (default: the daemon's flake).
    pub flake: Option<String>,
}

fn default_branch() -> String {
    "main".into()
}

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_flake")]
    pub flake: String,
    pub state_dir: Option<PathBuf>,
    /// The history: `postgresql://USER@HOST/DB` (or `postgresql:///DB?host=/run/postgresql`
    /// over a local socket) to share it with other coordinators; unset:
    /// SQLite in the state directory. Never with a password: see
    /// `database-password-file`.
    pub database: Option<String>,
    /// A file holding the database's password (e.g. a systemd credential).
    pub database_password_file: Option<PathBuf>,
    /// Apply the history's pending migrations at start (false: a database
    /// at an older schema version is refused).
    #[serde(default = "default_true")]
    pub migrate: bool,
    #[serde(default)]
    pub cluster: ClusterConfig,
    pub ssh_config: Option<PathBuf>,
    /// A private key for SSH (ssh's `-i`); relative: a systemd credential.
    pub ssh_identity_file: Option<PathBuf>,
    #[serde(default = "default_strategy")]
    pub strategy: String,
    #[serde(default = "default_parallel_limit")]
    pub parallel_limit: usize,
    /// Durations: a number of seconds or e.g. `"2m"`, `"1h30m"`.
    #[serde(
        default = "default_health_timeout",
        with = "nix_deploy_core::duration::human"
    )]
    pub health_check_timeout: Duration,
    #[serde(
        default = "default_confirm_timeout",
        with = "nix_deploy_core::duration::human"
    )]
    pub confirm_timeout: Duration,
    #[serde(
        default = "default_activation_timeout",
        with = "nix_deploy_core::duration::human"
    )]
    pub activation_timeout: Duration,
    /// Roll back every host a deployment changed when it aborts.
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    #[serde(default = "default_max_failures")]
    pub max_failures: String,
    /// How long a request (other than event streams) may take.
    #[serde(
        default = "default_request_timeout",
        with = "nix_deploy_core::duration::human"
    )]
    pub request_timeout: Duration,
    /// How long a client may take to send a request's headers (and a kept-
    /// alive connection may sit idle) before it is dropped.
    #[serde(
        default = "default_header_timeout",
        with = "nix_deploy_core::duration::human"
    )]
    pub header_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// `nix eval` processes evaluating the fleet at once (default: from the
    /// cores and the memory available).
    pub eval_workers: Option<usize>,
    /// Read the evaluation cache in the history (false: evaluate every host
    /// every time).
    #[serde(default = "default_true")]
    pub eval_cache: bool,
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    pub slack: Option<SlackConfig>,
    pub github: Option<GithubConfig>,
    #[serde(default)]
    pub notifications: NotifyConfig,
    /// The web dashboard (`[web]`).
    #[serde(default)]
    pub web: WebConfig,
    /// The watch loop (on by default).
    #[serde(default)]
    pub watch: WatchConfig,
    /// E-mail (to `notifications.email-to`).
    pub smtp: Option<SmtpConfig>,
    /// Maintenance windows (`[[window]]`).
    #[serde(default, rename = "window")]
    pub windows: Vec<WindowSpec>,
    /// Approval rules (`[[approval]]`).
    #[serde(default, rename = "approval")]
    pub approvals: Vec<ApprovalSpec>,
    /// Named sets of identities for approvers (`[groups]`).
    #[serde(default)]
    pub groups: Groups,
    /// Scheduled deployments (`[[schedule]]`).
    #[serde(default, rename = "schedule")]
    pub schedules: Vec<ScheduleConfig>,
    #[serde(default)]
    pub chat: ChatConfig,
}

/// Several coordinators on one PostgreSQL history.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterConfig {
    /// How often this daemon renews its leases and its heartbeat.
    #[serde(
        default = "default_heartbeat",
        with = "nix_deploy_core::duration::human"
    )]
    pub heartbeat: Duration,
    /// How long a lease (or the leadership) lasts unrenewed, by the
    /// database's clock: a dead coordinator's deployments are taken over
    /// after this.
    #[serde(
        default = "default_lease_ttl",
        with = "nix_deploy_core::duration::human"
    )]
    pub lease_ttl: Duration,
    /// Resume deployments whose holder's lease expired (PostgreSQL only).
    #[serde(default = "default_true")]
    pub takeover: bool,
    /// When this daemon stops while another takes deployments over: how
    /// long its hosts in the middle of their pipeline may take to finish
    /// before it hands its deployments over. Past it, they are cancelled as
    /// without such a daemon (hosts finish or roll back). Keep it below the
    /// service manager's stop timeout.
    #[serde(
        default = "default_stop_timeout",
        with = "nix_deploy_core::duration::human"
    )]
    pub stop_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            heartbeat: default_heartbeat(),
            lease_ttl: default_lease_ttl(),
            takeover: true,
            stop_timeout: default_stop_timeout(),
        }
    }
}

/// Long enough for a host's build, copy and activation, well below the
/// NixOS module's `TimeoutStopSec` (15 minutes).
fn default_stop_timeout() -> Duration {
    Duration::from_secs(5 * 60)
}

/// The longest `[cluster] stop-timeout`.
const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(60 * 60);

fn default_heartbeat() -> Duration {
    LeaseTiming::default().heartbeat
}
fn default_lease_ttl() -> Duration {
    LeaseTiming::default().ttl
}

fn default_listen() -> String {
    "127.0.0.1:7480".into()
}
fn default_flake() -> String {
    ".".into()
}
fn default_strategy() -> String {
    "smart".into()
}
fn default_parallel_limit() -> usize {
    4
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_confirm_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_activation_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_true() -> bool {
    true
}
fn default_max_failures() -> String {
    "0".into()
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_connections() -> usize {
    512
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("the empty config is valid")
    }
}

impl Config {
    /// The options of a request that sets none: the config's defaults over
    /// the built-in ones.
    pub fn default_options(&self) -> Result<DeployOptions, OptionsError> {
        let max_failures = Amount::parse(&self.max_failures)
            .map_err(|e| OptionsError(format!("max-failures: {}", e.0)))?;
        Request {
            strategy: Some(self.strategy.clone()),
            parallel_limit: Some(self.parallel_limit),
            max_failures: Some(max_failures),
            rollback_all_on_abort: Some(self.auto_rollback),
            health_timeout: Some(self.health_check_timeout),
            confirm_timeout: Some(self.confirm_timeout),
            activation_timeout: Some(self.activation_timeout),
            ..Request::default()
        }
        .resolve(&DeployOptions::default())
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The history's PostgreSQL URL, if one is configured (without its
    /// password, which comes from `database-password-file`).
    pub fn database_url(&self) -> Result<Option<DatabaseUrl>, ConfigError> {
        let Some(text) = &self.database else {
            if self.database_password_file.is_some() {
                return Err(ConfigError::Invalid(
                    "database-password-file is set but database is not".into(),
                ));
            }
            return Ok(None);
        };
        let url =
            DatabaseUrl::parse(text).map_err(|e| ConfigError::Invalid(format!("database: {e}")))?;
        if url.has_password() {
            return Err(ConfigError::Invalid(format!(
                "database: {url} holds a password; put it in a file named by database-password-file instead (this file may be world-readable)"
            )));
        }
        Ok(Some(url))
    }

    /// How this daemon holds its leases.
    pub fn lease_timing(&self) -> LeaseTiming {
        LeaseTiming {
            heartbeat: self.cluster.heartbeat,
            ttl: self.cluster.lease_ttl,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.database_url()?;
        self.lease_timing()
            .check()
            .map_err(|e| ConfigError::Invalid(format!("cluster: {e}")))?;
        let stop = self.cluster.stop_timeout;
        if stop < Duration::from_secs(1) || stop > MAX_STOP_TIMEOUT {
            return Err(ConfigError::Invalid(format!(
                "cluster.stop-timeout must be between 1s and {}s, not {}s",
                MAX_STOP_TIMEOUT.as_secs(),
                stop.as_secs_f64()
            )));
        }
        for (key, value) in [
            ("health-check-timeout", self.health_check_timeout),
            ("confirm-timeout", self.confirm_timeout),
            ("activation-timeout", self.activation_timeout),
            ("request-timeout", self.request_timeout),
            ("header-timeout", self.header_timeout),
            ("notifications.timeout", self.notifications.timeout),
        ] {
            if value < Duration::from_secs(1) {
                return Err(ConfigError::Invalid(format!(
                    "{key} must be at least 1s (e.g. 30s, 5m)"
                )));
            }
        }
        if !(1..=65_536).contains(&self.max_connections) {
            return Err(ConfigError::Invalid(
                "max-connections must be from 1 to 65536".into(),
            ));
        }
        if self.eval_workers.is_some_and(|w| !(1..=256).contains(&w)) {
            return Err(ConfigError::Invalid(
                "eval-workers must be from 1 to 256".into(),
            ));
        }
        if self.parallel_limit == 0 {
            return Err(ConfigError::Invalid(
                "parallel-limit must be at least 1".into(),
            ));
        }
        self.default_options()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.web.validate().map_err(ConfigError::Invalid)?;
        self.watch.validate(&self.flake)?;
        match &self.smtp {
            Some(smtp) => smtp.validate(&self.notifications.email_to)?,
            None if !self.notifications.email_to.is_empty() => {
                return Err(ConfigError::Invalid(
                    "notifications.email-to needs an [smtp] server".into(),
                ));
            }
            None => {}
        }
        if self.notifications.retries > 10 {
            return Err(ConfigError::Invalid(
                "notifications.retries must be from 0 to 10".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (index, token) in self.tokens.iter().enumerate() {
            if !names.insert(&token.name) {
                return Err(ConfigError::Invalid(format!(
                    "token name `{}` is used twice",
                    token.name
                )));
            }
            hosts(&format!("tokens[{index}].hosts"), &token.hosts)?;
        }
        self.policy()?;
        for (list, grants) in [
            ("users", &self.chat.users),
            ("channels", &self.chat.channels),
        ] {
            for (index, grant) in grants.iter().enumerate() {
                if grant.id.is_empty()
                    || grant.id.len() > 32
                    || !grant.id.chars().all(|c| c.is_ascii_alphanumeric())
                {
                    return Err(ConfigError::Invalid(format!(
                        "chat.{list}[{index}].id = `{}`: a Slack id (letters and digits, e.g. U024BE7LH)",
                        grant.id
                    )));
                }
                hosts(&format!("chat.{list}[{index}].hosts"), &grant.hosts)?;
            }
        }
        let defaults = self.default_options().unwrap_or_default();
        let mut schedules = std::collections::BTreeSet::new();
        for (index, schedule) in self.schedules.iter().enumerate() {
            let key = format!("schedule[{index}]");
            if !schedules.insert(&schedule.name)
                || !nix_deploy_core::shell::is_valid_host_name(&schedule.name)
            {
                return Err(ConfigError::Invalid(format!(
                    "{key}.name = `{}`: a unique name of letters, digits, `-` and `_`",
                    schedule.name
                )));
            }
            Schedule::parse(&schedule.cron)
                .map_err(|e| invalid(&format!("{key}.cron"), &schedule.cron, &e))?;
            window::parse_zone(&schedule.timezone)
                .map_err(|e| invalid(&format!("{key}.timezone"), &schedule.timezone, &e))?;
            schedule
                .request
                .check_for_deploy()
                .and_then(|()| schedule.request.resolve(&defaults))
                .map_err(|e| ConfigError::Invalid(format!("{key}.request: {}", e.0)))?;
        }
        Ok(())
    }

    /// The windows and approval rules every deployment obeys, checked.
    pub fn policy(&self) -> Result<Policy, ConfigError> {
        check_groups(&self.groups).map_err(ConfigError::Invalid)?;
        let windows =
            Windows::new(&self.windows).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let approvals = self
            .approvals
            .iter()
            .enumerate()
            .map(|(index, spec)| ApprovalRule::new(spec, index, &self.groups))
            .collect::<Result<_, _>>()
            .map_err(ConfigError::Invalid)?;
        Ok(Policy { windows, approvals })
    }
}

fn invalid(key: &str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid(format!("{key} = `{value}`: {reason}"))
}

/// A list of host selectors under `key`, checked.
pub fn hosts(key: &str, selectors: &[String]) -> Result<HostFilter, ConfigError> {
    HostFilter::parse(selectors).map_err(|e| invalid(key, &selectors.join(", "), &e.to_string()))
}

#[cfg(test)]
mod tests;
