//! The daemon's configuration file (TOML), with the seed's options: default
//! strategy, parallel limit, health-check timeout, auto-rollback,
//! notifications; plus where to listen, tokens and hook secrets.
//!
//! Secrets are never in this file: it names files that hold them. A secret
//! is kept in [`Secret`], which never prints its value.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use nix_deploy_core::options::{Amount, DeployOptions, OptionsError, Request};

use super::notify::NotifyConfig;
use super::web::WebConfig;

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
    pub ssh_config: Option<PathBuf>,
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

    fn validate(&self) -> Result<(), ConfigError> {
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
        let mut names = std::collections::BTreeSet::new();
        for token in &self.tokens {
            if !names.insert(&token.name) {
                return Err(ConfigError::Invalid(format!(
                    "token name `{}` is used twice",
                    token.name
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_has_the_documented_defaults() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:7480");
        assert_eq!(c.strategy, "smart");
        assert_eq!(c.parallel_limit, 4);
        assert_eq!(c.health_check_timeout, Duration::from_secs(120));
        assert!(c.auto_rollback);
        assert!(c.tokens.is_empty());
        assert_eq!(c.eval_workers, None);
        assert!(c.eval_cache);
    }

    #[test]
    fn parses_a_full_config() {
        let text = r#"
            listen = "127.0.0.1:9000"
            flake = "github:me/fleet"
            strategy = "canary"
            parallel-limit = 8
            health-check-timeout = 60
            confirm-timeout = "2m"
            activation-timeout = "1h30m"
            auto-rollback = false
            eval-workers = 3
            eval-cache = false

            [[tokens]]
            name = "ci"
            file = "/run/secrets/ci"
            scope = "deploy"

            [slack]
            signing-secret-file = "/run/secrets/slack"

            [github]
            secret-file = "/run/secrets/gh"

            [notifications]
            slack-webhooks = ["https://hooks.slack.com/services/x"]
        "#;
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        assert_eq!(c.parallel_limit, 8);
        assert_eq!(c.eval_workers, Some(3));
        assert!(!c.eval_cache);
        assert_eq!(c.health_check_timeout, Duration::from_secs(60));
        assert_eq!(c.confirm_timeout, Duration::from_secs(120));
        assert_eq!(c.activation_timeout, Duration::from_secs(5400));
        assert_eq!(c.tokens[0].scope, Scope::Deploy);
        assert_eq!(c.github.as_ref().unwrap().branch, "main");
        assert_eq!(
            c.slack.as_ref().unwrap().response_url_prefixes,
            ["https://hooks.slack.com/"]
        );
        assert!(Scope::Admin.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Deploy));
    }

    #[test]
    fn rejects_bad_configs() {
        let bad = |t: &str| {
            Config::parse(t, Path::new("t.toml"))
                .unwrap_err()
                .to_string()
        };
        assert!(bad("strategy = \"yolo\"").contains("strategy"));
        assert!(bad("parallel-limit = 0").contains("parallel-limit"));
        assert!(bad("eval-workers = 0").contains("eval-workers"));
        assert!(bad("listen = 5").contains("t.toml"));
        assert!(bad("unknown-key = 1").contains("unknown"));
        let e = bad("confirm-timeout = \"10x\"");
        assert!(e.contains("confirm-timeout") && e.contains("30s"), "{e}");
        assert!(bad("health-check-timeout = 0").contains("at least 1s"));
        assert!(bad("request-timeout = \"9d\"").contains("too long"));
        assert!(format!("{:?}", Secret::new("hunter2")) == "Secret(***)");
    }
}
