//! `[watch]` in the daemon's TOML: how often hosts are probed and checked,
//! when an unreachable host is alerted, which flake (and branch, for pull
//! mode) is tracked, how many probes run at once, and what is done about
//! drift (`on-drift`, per host or tag with `[[watch.rules]]`). Every
//! interval and count is bounded; a bad value names its key.

use std::time::Duration;

use serde::Deserialize;

use nix_deploy_core::select::Selector;
use nix_deploy_core::watch::OnDrift;
use nix_deploy_core::{duration, nix, pull};

use crate::daemon::config::ConfigError;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WatchConfig {
    /// The watch loop runs (on by default).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Each host is probed this often (jittered per host).
    #[serde(default = "default_interval", with = "duration::human")]
    pub interval: Duration,
    /// Each host's health checks run this often.
    #[serde(default = "default_health_interval", with = "duration::human")]
    pub health_interval: Duration,
    /// A host unreachable this long is alerted (0: at once).
    #[serde(default = "default_unreachable_after", with = "duration::human")]
    pub unreachable_after: Duration,
    /// Hosts probed at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// The flake whose systems the hosts should run (default: the daemon's).
    pub flake: Option<String>,
    /// Pull mode: poll the flake's git remote for this branch and deploy
    /// when it moves (newest push wins, never an older one).
    pub branch: Option<String>,
    #[serde(default = "default_poll_interval", with = "duration::human")]
    pub poll_interval: Duration,
    /// What is done about a drifted or behind host, unless a rule says.
    #[serde(default)]
    pub on_drift: OnDrift,
    /// Per host or tag: the first rule whose selector matches wins.
    #[serde(default)]
    pub rules: Vec<DriftRule>,
    /// The first wait after a reconcile failed; doubled each time after.
    #[serde(default = "default_backoff", with = "duration::human")]
    pub reconcile_backoff: Duration,
    /// Reconciling deployments at once (one per host at most).
    #[serde(default = "default_reconcile_limit")]
    pub reconcile_limit: usize,
}

/// `[[watch.rules]]`: `on = "@web"` (a host, glob, `@tag` or `@tag-glob`)
/// and what is done about its drift.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DriftRule {
    pub on: String,
    pub on_drift: OnDrift,
}

fn default_true() -> bool {
    true
}
fn default_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_health_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_unreachable_after() -> Duration {
    Duration::from_secs(300)
}
fn default_concurrency() -> usize {
    16
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_backoff() -> Duration {
    Duration::from_secs(60)
}
fn default_reconcile_limit() -> usize {
    4
}

impl Default for WatchConfig {
    fn default() -> Self {
        toml::from_str("").expect("the empty watch config is valid")
    }
}

const DAY: Duration = Duration::from_secs(24 * 3600);

impl WatchConfig {
    /// Bounds, names and selectors; `flake` is the daemon's.
    pub fn validate(&self, flake: &str) -> Result<(), ConfigError> {
        let second = Duration::from_secs(1);
        for (key, value, min, max) in [
            ("watch.interval", self.interval, second, DAY),
            ("watch.health-interval", self.health_interval, second, DAY),
            (
                "watch.unreachable-after",
                self.unreachable_after,
                Duration::ZERO,
                duration::MAX,
            ),
            ("watch.poll-interval", self.poll_interval, second, DAY),
            (
                "watch.reconcile-backoff",
                self.reconcile_backoff,
                second,
                DAY,
            ),
        ] {
            if value < min || value > max {
                return Err(ConfigError::Invalid(format!(
                    "{key} must be from {} to {} ({})",
                    duration::format(min),
                    duration::format(max),
                    duration::EXAMPLES
                )));
            }
        }
        for (key, value, max) in [
            ("watch.concurrency", self.concurrency, 1024),
            ("watch.reconcile-limit", self.reconcile_limit, 256),
        ] {
            if !(1..=max).contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "{key} must be from 1 to {max}"
                )));
            }
        }
        let tracked = self.flake(flake);
        nix::check_flake_ref(tracked)
            .map_err(|why| ConfigError::Invalid(format!("watch.flake `{tracked}`: {why}")))?;
        if let Some(branch) = &self.branch {
            if !pull::is_valid_branch(branch) {
                return Err(ConfigError::Invalid(format!(
                    "watch.branch `{branch}` is not a branch name"
                )));
            }
            pull::git_remote(tracked)
                .map_err(|why| ConfigError::Invalid(format!("watch.branch: {why}")))?;
        }
        for (index, rule) in self.rules.iter().enumerate() {
            Selector::parse(&rule.on)
                .map_err(|e| ConfigError::Invalid(format!("watch.rules[{index}].on: {e}")))?;
        }
        Ok(())
    }

    /// The flake whose systems hosts should run.
    pub fn flake<'a>(&'a self, daemon_flake: &'a str) -> &'a str {
        self.flake.as_deref().unwrap_or(daemon_flake)
    }

    /// What is done about the drift of the host `name` with `tags`: the
    /// first matching rule's, else the default.
    pub fn on_drift(&self, name: &str, tags: &[String]) -> OnDrift {
        self.rules
            .iter()
            .find(|rule| {
                Selector::parse(&rule.on).is_ok_and(|s| s.matches_name_and_tags(name, tags))
            })
            .map_or(self.on_drift, |rule| rule.on_drift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WatchConfig, String> {
        let config: WatchConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate(".").map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn defaults_and_a_full_section() {
        let c = WatchConfig::default();
        assert!(c.enabled);
        assert_eq!(c.interval, Duration::from_secs(60));
        assert_eq!(c.on_drift, OnDrift::Report);
        let c = parse(
            r#"
            interval = "10s"
            health-interval = "2m"
            unreachable-after = 0
            concurrency = 64
            flake = "git+file:///srv/fleet"
            branch = "main"
            poll-interval = "30s"
            on-drift = "report"
            [[rules]]
            on = "@web"
            on-drift = "redeploy"
            "#,
        )
        .unwrap();
        assert_eq!(c.flake("."), "git+file:///srv/fleet");
        assert_eq!(c.unreachable_after, Duration::ZERO);
        assert_eq!(c.on_drift("web1", &["web".into()]), OnDrift::Redeploy);
        assert_eq!(c.on_drift("web1", &[]), OnDrift::Report);
    }

    #[test]
    fn every_bound_names_its_key() {
        for (text, key) in [
            ("interval = 0", "watch.interval"),
            ("interval = \"2d\"", "watch.interval"),
            ("health-interval = 0", "watch.health-interval"),
            ("poll-interval = 0", "watch.poll-interval"),
            ("reconcile-backoff = 0", "watch.reconcile-backoff"),
            ("concurrency = 0", "watch.concurrency"),
            ("concurrency = 5000", "watch.concurrency"),
            ("reconcile-limit = 0", "watch.reconcile-limit"),
            ("branch = \"../x\"\nflake = \"github:a/b\"", "watch.branch"),
            ("branch = \"main\"", "watch.branch"),
            ("flake = \"-x\"", "watch.flake"),
            (
                "[[rules]]\non = \"@\"\non-drift = \"redeploy\"",
                "watch.rules[0].on",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
        assert!(
            parse("on-drift = \"fix\"")
                .unwrap_err()
                .contains("on-drift")
        );
        assert!(parse("unknown = 1").unwrap_err().contains("unknown"));
    }
}
