//! What a deployment is asked to do, as two documents:
//!
//! - [`Request`]: how callers spell a request — the API's bodies, the CLI (in
//!   process and through the daemon), the chat command and the push hook.
//!   Every option is optional; unset ones take the defaults.
//! - [`DeployOptions`]: the options, resolved and checked. Stored with the
//!   deployment, shown in its report, and read back as they are by `resume`.
//!
//! One parser per value: strategies here, amounts (`N`, `N%`) here, durations
//! in [`crate::duration`]. Every number is bounded before anything is touched.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::fleet::Selection;
use crate::goal::{Goal, RebootPolicy};

/// A request's option that cannot be used; nothing was touched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid option: {0}")]
pub struct OptionsError(pub String);

fn bad(message: impl Into<String>) -> OptionsError {
    OptionsError(message.into())
}

/// How phases are formed and gated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    Smart,
    Parallel,
    Rolling,
    Canary,
    BlueGreen,
}

/// The strategy names a person may type.
pub const STRATEGY_NAMES: [&str; 6] = [
    "smart",
    "parallel",
    "rolling",
    "sequential",
    "canary",
    "blue-green",
];

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Smart => "smart",
            Strategy::Parallel => "parallel",
            Strategy::Rolling => "rolling",
            Strategy::Canary => "canary",
            Strategy::BlueGreen => "blue-green",
        }
    }

    /// Parse a strategy name; `sequential` is rolling with batches of 1.
    pub fn parse(s: &str) -> Result<(Strategy, Option<Amount>), OptionsError> {
        Ok(match s {
            "smart" => (Strategy::Smart, None),
            "parallel" => (Strategy::Parallel, None),
            "rolling" => (Strategy::Rolling, None),
            "sequential" => (Strategy::Rolling, Some(Amount::Count(1))),
            "canary" => (Strategy::Canary, None),
            "blue-green" | "bluegreen" => (Strategy::BlueGreen, None),
            other => {
                return Err(bad(format!(
                    "unknown strategy `{other}` ({})",
                    STRATEGY_NAMES.join(", ")
                )));
            }
        })
    }
}

/// The largest host count any option may name.
pub const MAX_HOSTS: usize = 100_000;

/// `N` hosts or `N%` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amount {
    Count(usize),
    Percent(u32),
}

impl Amount {
    pub fn parse(s: &str) -> Result<Amount, OptionsError> {
        let text = s.trim();
        let not_amount = || {
            bad(format!(
                "`{text}` is not a number or a percentage (e.g. 2, 25%)"
            ))
        };
        match text.strip_suffix('%') {
            Some(p) => {
                let p: u32 = p.trim().parse().map_err(|_| not_amount())?;
                if p > 100 {
                    return Err(bad(format!("`{text}` is more than 100%")));
                }
                Ok(Amount::Percent(p))
            }
            None => {
                let n: usize = text.parse().map_err(|_| not_amount())?;
                if n > MAX_HOSTS {
                    return Err(bad(format!("`{text}` is more than {MAX_HOSTS}")));
                }
                Ok(Amount::Count(n))
            }
        }
    }

    pub fn is_zero(self) -> bool {
        matches!(self, Amount::Count(0) | Amount::Percent(0))
    }

    /// As a batch size over `total` hosts: percentages round up, at least 1.
    pub fn batch_of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n.max(1),
            Amount::Percent(p) => ((total * p as usize).div_ceil(100)).max(1),
        }
    }

    /// As a failure allowance over `total` hosts: percentages round down.
    pub fn allowance_of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => total * p as usize / 100,
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for Amount {
    type Err = OptionsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Amount::parse(s)
    }
}

/// Written as `"2"` or `"25%"`; read from a string or a number.
impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a number of hosts or a percentage (e.g. 2, 25%)")
        })? {
            Raw::Count(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        Amount::parse(&text).map_err(|e| serde::de::Error::custom(e.0))
    }
}

/// The options of one deployment, resolved: what the planner and the engine
/// obey, what is stored with the deployment and what `resume` reuses.
///
/// Read leniently (missing fields take their defaults), since rows written by
/// older versions must still resume; requests are checked strictly in
/// [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeployOptions {
    pub strategy: Strategy,
    /// Deploy unchanged hosts too (re-activate them).
    pub force: bool,
    /// Hosts deployed at once.
    pub parallel_limit: usize,
    /// Rolling batch size.
    pub batch_size: Amount,
    /// `--canary HOST` (repeatable); empty: the first changed host by name.
    pub canaries: Vec<String>,
    #[serde(with = "crate::duration::human", alias = "canary_soak_s")]
    pub canary_soak: Duration,
    /// Abort when more hosts than this fail.
    pub max_failures: Amount,
    /// Never abort; only the dependents of a failed host are skipped.
    pub continue_on_failure: bool,
    /// On abort, roll back every host this deployment changed.
    pub rollback_all_on_abort: bool,
    /// Overall deadline of a host's health validation.
    #[serde(with = "crate::duration::human", alias = "health_timeout_s")]
    pub health_timeout: Duration,
    /// How long a host's watchdog waits for the confirmation before it
    /// switches back by itself.
    #[serde(with = "crate::duration::human", alias = "confirm_timeout_s")]
    pub confirm_timeout: Duration,
    /// Deadline of `switch-to-configuration`.
    #[serde(with = "crate::duration::human", alias = "activation_timeout_s")]
    pub activation_timeout: Duration,
    /// Emergency: skip pre-flight and health checks (never the check that
    /// the host runs the new system).
    pub skip_validation: bool,
    /// Pre-flight: free space `/nix/store` must have, in MiB.
    pub min_free_space_mib: u64,
    /// Let hosts fetch from their own substituters what they can; the
    /// coordinator sends the rest (on by default; `--no-substitute`; a host's
    /// `deployment.substituteOnDestination = false` turns it off for it).
    pub substitute_on_destination: bool,
    /// Every host builds its own system (`--build-on-target`; else per host,
    /// `deployment.buildOnTarget`).
    pub build_on_target: bool,
    /// What the deployment does to each host ([`Goal`]).
    pub goal: Goal,
    /// Which hosts reboot after their activation.
    pub reboot: RebootPolicy,
    /// How long a rebooting host may take to come back.
    #[serde(with = "crate::duration::human")]
    pub reboot_timeout: Duration,
    /// Stop after the canaries until someone promotes the deployment.
    pub pause_after_canary: bool,
    /// Stop after each rolling batch until someone promotes the deployment.
    pub pause_after_batch: bool,
    /// Outside a maintenance window: refuse instead of waiting.
    pub no_wait: bool,
    /// Deploy outside the maintenance windows, and why (recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub override_window: Option<String>,
    /// `--no-keys`: leave `deployment.keys` alone (colmena's `--no-keys`).
    pub no_keys: bool,
    /// `--keep-result`: each built system also stays a GC root under
    /// `STATE/results/HOST` until the next kept result of that host.
    pub keep_result: bool,
}

impl Default for DeployOptions {
    fn default() -> Self {
        DeployOptions {
            strategy: Strategy::Smart,
            force: false,
            parallel_limit: 4,
            batch_size: Amount::Count(1),
            canaries: Vec::new(),
            canary_soak: Duration::from_secs(300),
            max_failures: Amount::Count(0),
            continue_on_failure: false,
            rollback_all_on_abort: true,
            health_timeout: Duration::from_secs(120),
            confirm_timeout: Duration::from_secs(30),
            activation_timeout: Duration::from_secs(600),
            skip_validation: false,
            min_free_space_mib: 1024,
            substitute_on_destination: true,
            build_on_target: false,
            goal: Goal::Switch,
            reboot: RebootPolicy::Never,
            reboot_timeout: Duration::from_secs(600),
            pause_after_canary: false,
            pause_after_batch: false,
            no_wait: false,
            override_window: None,
            no_keys: false,
            keep_result: false,
        }
    }
}

/// The most hosts deployed at once.
pub const MAX_PARALLEL: usize = 1024;
/// The most free space pre-flight may ask for: 1 PiB.
pub const MAX_FREE_SPACE_MIB: u64 = 1 << 30;

impl DeployOptions {
    /// Every bound, checked before anything is recorded or touched.
    pub fn check(&self) -> Result<(), OptionsError> {
        if !(1..=MAX_PARALLEL).contains(&self.parallel_limit) {
            return Err(bad(format!(
                "parallel-limit must be from 1 to {MAX_PARALLEL}, not {}",
                self.parallel_limit
            )));
        }
        if self.batch_size.is_zero() {
            return Err(bad(format!(
                "batch-size must be at least 1 host, not {}",
                self.batch_size
            )));
        }
        for (name, value) in [
            ("health-timeout", self.health_timeout),
            ("confirm-timeout", self.confirm_timeout),
            ("activation-timeout", self.activation_timeout),
            ("reboot-timeout", self.reboot_timeout),
        ] {
            if value < Duration::from_secs(1) || value > crate::duration::MAX {
                return Err(bad(format!(
                    "{name} must be from 1s to {}, not {}",
                    crate::duration::format(crate::duration::MAX),
                    crate::duration::format(value)
                )));
            }
        }
        if self.canary_soak > crate::duration::MAX {
            return Err(bad(format!(
                "canary-soak must be at most {}",
                crate::duration::format(crate::duration::MAX)
            )));
        }
        if self.min_free_space_mib > MAX_FREE_SPACE_MIB {
            return Err(bad(format!(
                "min-free-space must be at most {MAX_FREE_SPACE_MIB} MiB"
            )));
        }
        for canary in &self.canaries {
            if !crate::shell::is_valid_host_name(canary) {
                return Err(bad(format!("canary `{canary}` is not a host name")));
            }
        }
        if self.reboot != RebootPolicy::Never && !self.goal.can_reboot() {
            return Err(bad(format!(
                "--reboot goes with the switch and boot goals, not {} (a reboot {})",
                self.goal,
                if self.goal == Goal::Test {
                    "throws a test activation away"
                } else {
                    "has nothing new to boot into"
                }
            )));
        }
        if self.pause_after_batch && self.strategy != Strategy::Rolling {
            return Err(bad(format!(
                "--pause-after-batch goes with rolling deployments, not {}",
                self.strategy.as_str()
            )));
        }
        if self.pause_after_canary && self.strategy == Strategy::BlueGreen {
            return Err(bad(
                "--pause-after-canary goes with canary, smart, rolling or parallel deployments, not blue-green",
            ));
        }
        if let Some(reason) = &self.override_window
            && (reason.trim().is_empty() || reason.len() > 1000)
        {
            return Err(bad(
                "--override-window needs --reason \"why\" (1 to 1000 characters)",
            ));
        }
        if self.strategy == Strategy::BlueGreen
            && (self.goal != Goal::Switch || self.reboot != RebootPolicy::Never)
        {
            return Err(bad(
                "blue-green stages with `test` and commits with `boot` itself: it takes neither --goal nor --reboot",
            ));
        }
        Ok(())
    }
}

/// A request as callers spell it. Unset options take the defaults given to
/// [`Request::resolve`] (the CLI's built-in ones, or the daemon's config).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Request {
    /// Selectors ([`crate::select`]): host names or globs, `@tag` or
    /// `@tag-glob`; none (and no `on`) means every host.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// More selectors, as `--on` gives them (the union of all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    #[serde(skip_serializing_if = "is_false")]
    pub all: bool,
    /// Selectors of hosts to leave out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Deployments: queue behind busy hosts instead of refusing them.
    #[serde(skip_serializing_if = "is_false")]
    pub wait: bool,
    /// Deployments and plans: the flake pinned to this commit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Plans: build changed toplevels to compare closures (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summaries: Option<bool>,

    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Shorthand for `strategy: parallel`.
    #[serde(skip_serializing_if = "is_false")]
    pub parallel: bool,
    /// Shorthand for `strategy: sequential`.
    #[serde(skip_serializing_if = "is_false")]
    pub sequential: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<Amount>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub canary: Vec<String>,
    #[serde(
        with = "crate::duration::human::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub canary_soak: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<Amount>,
    #[serde(skip_serializing_if = "is_false")]
    pub continue_on_failure: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_all_on_abort: Option<bool>,
    #[serde(skip_serializing_if = "is_false")]
    pub force: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel_limit: Option<usize>,
    #[serde(
        with = "crate::duration::human::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub health_timeout: Option<Duration>,
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
    #[serde(skip_serializing_if = "is_false")]
    pub skip_validation: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_free_space_mib: Option<u64>,
    /// Hosts substitute what they can (default: true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub substitute_on_destination: Option<bool>,
    /// Every host builds its own system.
    #[serde(skip_serializing_if = "is_false")]
    pub build_on_target: bool,
    /// `switch` (default), `boot`, `test` or `dry-activate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goal: Option<String>,
    /// `always` (or `true`), `auto`, `never` (or `false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootPolicy>,
    #[serde(
        with = "crate::duration::human::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub reboot_timeout: Option<Duration>,
    /// Stop after the canaries until someone promotes the deployment.
    #[serde(skip_serializing_if = "is_false")]
    pub pause_after_canary: bool,
    /// Rolling: stop after each batch until someone promotes it.
    #[serde(skip_serializing_if = "is_false")]
    pub pause_after_batch: bool,
    /// Outside a maintenance window: refuse instead of waiting.
    #[serde(skip_serializing_if = "is_false")]
    pub no_wait: bool,
    /// Deploy outside the maintenance windows; the value is the reason
    /// (admin only, recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub override_window: Option<String>,
    /// Do not upload `deployment.keys`.
    #[serde(skip_serializing_if = "is_false")]
    pub no_keys: bool,
    /// Keep each built system as a GC root under `STATE/results/HOST`.
    #[serde(skip_serializing_if = "is_false")]
    pub keep_result: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Request {
    /// Which hosts this request is about.
    pub fn selection(&self) -> Selection {
        Selection {
            names: self.hosts.clone(),
            tags: self.on.clone(),
            all: self.all,
            exclude: self.exclude.clone(),
        }
    }

    /// The options, with `defaults` for what the request leaves out; checked.
    pub fn resolve(&self, defaults: &DeployOptions) -> Result<DeployOptions, OptionsError> {
        if self.parallel && self.sequential {
            return Err(bad("parallel and sequential exclude each other"));
        }
        let name = if self.parallel {
            Some("parallel")
        } else if self.sequential {
            Some("sequential")
        } else {
            self.strategy.as_deref()
        };
        let (strategy, implied_batch) = match name {
            Some(name) => Strategy::parse(name)?,
            None => (defaults.strategy, None),
        };
        let options = DeployOptions {
            strategy,
            force: self.force,
            parallel_limit: self.parallel_limit.unwrap_or(defaults.parallel_limit),
            batch_size: self
                .batch_size
                .or(implied_batch)
                .unwrap_or(defaults.batch_size),
            canaries: self.canary.clone(),
            canary_soak: self.canary_soak.unwrap_or(defaults.canary_soak),
            max_failures: self.max_failures.unwrap_or(defaults.max_failures),
            continue_on_failure: self.continue_on_failure,
            rollback_all_on_abort: self
                .rollback_all_on_abort
                .unwrap_or(defaults.rollback_all_on_abort),
            health_timeout: self.health_timeout.unwrap_or(defaults.health_timeout),
            confirm_timeout: self.confirm_timeout.unwrap_or(defaults.confirm_timeout),
            activation_timeout: self
                .activation_timeout
                .unwrap_or(defaults.activation_timeout),
            skip_validation: self.skip_validation || defaults.skip_validation,
            min_free_space_mib: self
                .min_free_space_mib
                .unwrap_or(defaults.min_free_space_mib),
            substitute_on_destination: self
                .substitute_on_destination
                .unwrap_or(defaults.substitute_on_destination),
            build_on_target: self.build_on_target || defaults.build_on_target,
            goal: match &self.goal {
                Some(goal) => Goal::parse(goal)?,
                None => defaults.goal,
            },
            reboot: self.reboot.unwrap_or(defaults.reboot),
            reboot_timeout: self.reboot_timeout.unwrap_or(defaults.reboot_timeout),
            pause_after_canary: self.pause_after_canary,
            pause_after_batch: self.pause_after_batch,
            no_wait: self.no_wait,
            override_window: self.override_window.clone(),
            no_keys: self.no_keys || defaults.no_keys,
            keep_result: self.keep_result || defaults.keep_result,
        };
        crate::select::check(&[self.hosts.clone(), self.on.clone(), self.exclude.clone()].concat())
            .map_err(|e| bad(e.to_string()))?;
        options.check()?;
        Ok(options)
    }

    /// Fields that only make sense for a plan, refused on a deployment
    /// (nothing a caller sends is silently ignored).
    pub fn check_for_deploy(&self) -> Result<(), OptionsError> {
        if self.summaries.is_some() {
            return Err(bad(
                "`summaries` is for plans; a deployment always summarises changes",
            ));
        }
        Ok(())
    }

    /// Fields that only make sense for a deployment, refused on a plan.
    pub fn check_for_plan(&self) -> Result<(), OptionsError> {
        if self.wait {
            return Err(bad("`wait` is for deployments; a plan takes no hosts"));
        }
        if self.goal.is_some() || self.reboot.is_some() || self.reboot_timeout.is_some() {
            return Err(bad(
                "`goal` and `reboot` are for deployments; a plan lists the hosts pending a reboot and those whose kernel or initrd changes",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_and_strategies() {
        assert_eq!(Amount::parse("2").unwrap(), Amount::Count(2));
        assert_eq!(Amount::parse("25%").unwrap(), Amount::Percent(25));
        assert!(Amount::parse("x").is_err());
        assert!(Amount::parse("101%").is_err());
        assert!(Amount::parse("18446744073709551615").is_err());
        assert_eq!(Amount::Percent(25).allowance_of(10), 2);
        assert_eq!(Amount::Percent(25).batch_of(10), 3);
        assert_eq!(Amount::Percent(1).batch_of(10), 1);
        assert_eq!(
            Strategy::parse("sequential").unwrap(),
            (Strategy::Rolling, Some(Amount::Count(1)))
        );
        assert!(Strategy::parse("yolo").is_err());
        let json = serde_json::to_string(&Amount::Percent(25)).unwrap();
        assert_eq!(json, "\"25%\"");
        assert_eq!(
            serde_json::from_str::<Amount>("3").unwrap(),
            Amount::Count(3)
        );
        assert_eq!(
            serde_json::from_str::<Amount>("\"50%\"").unwrap(),
            Amount::Percent(50)
        );
    }

    #[test]
    fn a_request_resolves_against_defaults_and_is_bounded() {
        let defaults = DeployOptions {
            parallel_limit: 8,
            ..DeployOptions::default()
        };
        let request: Request = serde_json::from_str(
            r#"{"hosts": ["web1"], "sequential": true, "canary_soak": "1m",
                "health_timeout": 90, "max_failures": "10%"}"#,
        )
        .unwrap();
        let options = request.resolve(&defaults).unwrap();
        assert_eq!(options.strategy, Strategy::Rolling);
        assert_eq!(options.batch_size, Amount::Count(1));
        assert_eq!(options.parallel_limit, 8);
        assert_eq!(options.canary_soak, Duration::from_secs(60));
        assert_eq!(options.health_timeout, Duration::from_secs(90));
        assert_eq!(options.max_failures, Amount::Percent(10));
        assert_eq!(request.selection().names, ["web1"]);

        let refused = |json: &str| {
            serde_json::from_str::<Request>(json)
                .map_err(|e| e.to_string())
                .and_then(|r| r.resolve(&defaults).map_err(|e| e.to_string()))
                .unwrap_err()
        };
        assert!(refused(r#"{"batch_size": 0}"#).contains("batch-size"));
        assert!(refused(r#"{"batch_size": "0%"}"#).contains("batch-size"));
        assert!(refused(r#"{"parallel_limit": 0}"#).contains("parallel-limit"));
        assert!(refused(r#"{"parallel_limit": 18446744073709551615}"#).contains("parallel-limit"));
        assert!(refused(r#"{"health_timeout": "0s"}"#).contains("health-timeout"));
        assert!(refused(r#"{"confirm_timeout": "9999999h"}"#).contains("too long"));
        assert!(refused(r#"{"strategy": "yolo"}"#).contains("unknown strategy"));
        assert!(refused(r#"{"parallel": true, "sequential": true}"#).contains("exclude"));
        assert!(refused(r#"{"stratgy": "smart"}"#).contains("unknown field"));
        assert!(refused(r#"{"canary": ["-oProxy"]}"#).contains("canary"));
        assert!(refused(r#"{"goal": "reboot"}"#).contains("unknown goal"));
        assert!(
            refused(r#"{"goal": "test", "reboot": true}"#)
                .contains("throws a test activation away")
        );
        assert!(refused(r#"{"goal": "dry-activate", "reboot": "auto"}"#).contains("nothing new"));
        assert!(refused(r#"{"strategy": "blue-green", "goal": "boot"}"#).contains("blue-green"));
        assert!(refused(r#"{"reboot": "maybe"}"#).contains("always, auto or never"));
        assert!(refused(r#"{"reboot_timeout": "0s"}"#).contains("reboot-timeout"));
        assert!(refused(r#"{"on": ["web;*"]}"#).contains("invalid selector"));
        assert!(refused(r#"{"exclude": ["a,,b"]}"#).contains("empty selector"));
    }

    #[test]
    fn goals_and_reboots_resolve() {
        let request: Request = serde_json::from_str(
            r#"{"on": ["web-*"], "exclude": ["@canary"], "goal": "boot", "reboot": "auto", "reboot_timeout": "5m"}"#,
        )
        .unwrap();
        let options = request.resolve(&DeployOptions::default()).unwrap();
        assert_eq!(options.goal, Goal::Boot);
        assert_eq!(options.reboot, RebootPolicy::Auto);
        assert_eq!(options.reboot_timeout, Duration::from_secs(300));
        assert_eq!(request.selection().exclude, ["@canary"]);
        let json = serde_json::to_value(&options).unwrap();
        assert_eq!(json["goal"], "boot");
        assert_eq!(json["reboot"], "auto");
        // Rows written before goals existed are switch deployments.
        let old: DeployOptions = serde_json::from_str(r#"{"strategy": "smart"}"#).unwrap();
        assert_eq!(old.goal, Goal::Switch);
        assert_eq!(old.reboot, RebootPolicy::Never);
    }

    #[test]
    fn options_round_trip_as_stored_and_read_older_rows() {
        let options = DeployOptions {
            strategy: Strategy::BlueGreen,
            canaries: vec!["a".into()],
            skip_validation: true,
            confirm_timeout: Duration::from_secs(5),
            ..DeployOptions::default()
        };
        let json = serde_json::to_value(&options).unwrap();
        assert_eq!(json["strategy"], "blue-green");
        assert_eq!(json["confirm_timeout"], "5s");
        let back: DeployOptions = serde_json::from_value(json).unwrap();
        assert_eq!(back, options);
        // Rows written before the options were one document.
        let old: DeployOptions = serde_json::from_str(
            r#"{"strategy": "canary", "canary_soak_s": 10, "confirm_timeout_s": 7,
                "batch_size": "2", "max_failures": "0", "skip_validation": true}"#,
        )
        .unwrap();
        assert_eq!(old.canary_soak, Duration::from_secs(10));
        assert_eq!(old.confirm_timeout, Duration::from_secs(7));
        assert_eq!(old.batch_size, Amount::Count(2));
        assert!(old.skip_validation);
    }

    #[test]
    fn a_request_serializes_only_what_was_set() {
        let request = Request {
            hosts: vec!["a".into()],
            canary_soak: Some(Duration::from_secs(90)),
            ..Request::default()
        };
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            r#"{"hosts":["a"],"canary_soak":"1m 30s"}"#
        );
        assert!(Request::default().check_for_deploy().is_ok());
        let plan_only = Request {
            summaries: Some(false),
            ..Request::default()
        };
        assert!(plan_only.check_for_deploy().is_err());
        let deploy_only = Request {
            goal: Some("boot".into()),
            ..Request::default()
        };
        assert!(deploy_only.check_for_plan().is_err());
        assert!(deploy_only.check_for_deploy().is_ok());
    }
}
