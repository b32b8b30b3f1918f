//! The planner: from what each selected host runs, what the flake says it
//! should run, the dependency graph and the strategy, decide what happens to
//! every host, in what order, how long it should take and how risky it is.
//! Pure: no IO, no clock. The engine executes exactly the plan's `waits_for`
//! edges.
//!
//! Dependencies form a DAG (a cycle is an error naming it); phases
//! are the levels of the final ordering graph; execution is eager.
//!
//! [`plan`] reads as its steps, one module each: `actions` (deploy, skip
//! or unreachable), `order` (who waits for whom, the strategy's canaries
//! and batches, the phases), `estimate` (durations and the ETA), `risk`
//! (per host and overall, and the hosts as reported); `graph` resolves the
//! dependencies.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::events::{HostState, SystemRef};
use crate::options::{DeployOptions, Strategy};
use crate::summary::ChangeSummary;

mod actions;
mod estimate;
mod graph;
mod order;
mod risk;
#[cfg(test)]
mod tests;

pub use graph::{DependencyGraph, GraphHost};

/// A host's duration estimate when nobody in the fleet has history.
pub const DEFAULT_ESTIMATE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("dependency cycle: {}", .hosts.join(" → "))]
    Cycle { hosts: Vec<String> },
    #[error(
        "host `{host}`: deployment.dependencies: `{dependency}` is not a host of the fleet{hint}"
    )]
    UnknownDependency {
        host: String,
        dependency: String,
        hint: String,
    },
    #[error("host `{host}`: deployment.dependencies: no host has the tag of `{dependency}`{hint}")]
    UnknownTag {
        host: String,
        dependency: String,
        hint: String,
    },
    #[error("invalid option: {0}")]
    BadOption(String),
}

/// What the plan does with a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Deploy,
    Skip,
    /// Cannot be deployed: the probe failed.
    Unreachable,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deploy => "deploy",
            Action::Skip => "skip",
            Action::Unreachable => "unreachable",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Risk {
    Low,
    Medium,
    High,
}

impl Risk {
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "LOW",
            Risk::Medium => "MEDIUM",
            Risk::High => "HIGH",
        }
    }
}

/// A host's past, from the history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostHistory {
    /// Durations of recent successful runs, in milliseconds.
    pub successful_ms: Vec<u64>,
    /// How many of the recent runs failed or were rolled back.
    pub recent_failures: u32,
    /// The median of the whole fleet's recent successful runs: the estimate
    /// of a host that has no history of its own.
    #[serde(default)]
    pub fleet_median_ms: Option<u64>,
}

/// Where a host's duration estimate comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EstimateSource {
    /// The median of the host's own recent successful runs.
    Host,
    /// The host has none: the median of the fleet's.
    Fleet,
    /// Nobody has history: the default estimate.
    Default,
}

/// What the planner knows about one selected host.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostFacts {
    pub name: String,
    pub role: String,
    pub state: HostState,
    pub current: SystemRef,
    /// The evaluated toplevel.
    pub target_path: String,
    pub probe_error: Option<String>,
    pub summary: Option<ChangeSummary>,
    pub history: HostHistory,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedHost {
    pub name: String,
    pub role: String,
    pub state: HostState,
    pub changed: bool,
    pub current: SystemRef,
    pub target_path: String,
    pub action: Action,
    pub reason: Option<String>,
    pub error: Option<String>,
    /// Its dependencies from the flake (resolved host names).
    pub depends_on: Vec<String>,
    /// Hosts of this deployment that must finish healthy before it starts.
    pub waits_for: Vec<String>,
    /// Index into `Plan::phases`, for hosts that are deployed.
    pub phase: Option<usize>,
    pub canary: bool,
    /// Rolling batch number (from 1).
    pub batch: Option<usize>,
    pub estimate_seconds: f64,
    pub estimate_from_history: bool,
    pub estimate_source: EstimateSource,
    pub risk: Risk,
    pub risk_reasons: Vec<String>,
    pub summary: Option<ChangeSummary>,
    /// Whether its toplevel came from the evaluation cache (set by the engine).
    #[serde(default)]
    pub eval_cached: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub index: usize,
    pub hosts: Vec<String>,
    /// Why this phase waits (for display).
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub strategy: Strategy,
    pub strategy_reason: String,
    pub hosts: Vec<PlannedHost>,
    pub phases: Vec<Phase>,
    pub eta_seconds: f64,
    pub risk: Risk,
    pub risk_reasons: Vec<String>,
    pub rollback_strategy: String,
    pub warnings: Vec<String>,
    pub parallel_limit: usize,
    /// Failures allowed before the deployment aborts (abort when exceeded).
    pub max_failures: Option<usize>,
    pub rollback_all_on_abort: bool,
    pub canary_soak_seconds: Option<u64>,
}

impl Plan {
    pub fn to_deploy(&self) -> impl Iterator<Item = &PlannedHost> {
        self.hosts.iter().filter(|h| h.action == Action::Deploy)
    }

    pub fn get(&self, name: &str) -> Option<&PlannedHost> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

/// CHANGED when the running toplevel or the profile's (the boot default)
/// differs from the evaluated one: a host staged with `test` and never
/// committed runs the new system but would boot the old one.
pub fn classify(current: Option<&str>, profile: Option<&str>, target: &str) -> HostState {
    if current == Some(target) && profile == Some(target) {
        HostState::Unchanged
    } else {
        HostState::Changed
    }
}

pub fn median_ms(values: &[u64]) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2
    } else {
        v[mid]
    })
}

/// Build the plan. `fleet_size` is the number of hosts in the whole fleet (for
/// the share of the fleet touched).
pub fn plan(
    facts: &[HostFacts],
    graph: &DependencyGraph,
    fleet_size: usize,
    options: &DeployOptions,
) -> Result<Plan, PlanError> {
    options
        .check()
        .map_err(|e| PlanError::BadOption(e.0.clone()))?;
    let selected: BTreeMap<&str, &HostFacts> = facts.iter().map(|f| (f.name.as_str(), f)).collect();
    for canary in &options.canaries {
        if !selected.contains_key(canary.as_str()) {
            return Err(PlanError::BadOption(format!(
                "canary `{canary}` is not one of the selected hosts"
            )));
        }
    }
    let mut warnings = Vec::new();

    let action = actions::actions(facts, graph, options);
    let deploy: Vec<&HostFacts> = facts
        .iter()
        .filter(|f| action[&f.name].0 == Action::Deploy)
        .collect();
    let order = order::order(facts, &deploy, graph, options, &mut warnings);
    let (phases, levels) = order::phases(&deploy, &order);
    let (estimates, eta_seconds) = estimate::estimate(facts, &deploy, &order, options);
    let decided = risk::Decided {
        action: &action,
        order: &order,
        levels: &levels,
        estimates: &estimates,
    };
    let (hosts, overall, overall_reasons) =
        risk::assess(facts, &deploy, graph, fleet_size, options, &decided);
    let max_failures = if options.continue_on_failure {
        None
    } else {
        Some(options.max_failures.allowance_of(deploy.len()))
    };
    let mut rollback_strategy = match options.strategy {
        Strategy::BlueGreen => {
            "fleet-wide: unless every host is healthy on the new system, every host returns to its old system (boot default never changed)".to_string()
        }
        _ => "per host: switch back to the previous generation when activation or validation fails".to_string(),
    };
    match max_failures {
        Some(n) => rollback_strategy.push_str(&format!(
            "; abort when more than {n} host(s) fail{}",
            if options.rollback_all_on_abort {
                ", then roll back every host this deployment changed"
            } else {
                ""
            }
        )),
        None => rollback_strategy
            .push_str("; --continue-on-failure: failures skip only their dependents"),
    }

    Ok(Plan {
        strategy: options.strategy,
        strategy_reason: order.strategy_reason,
        hosts,
        phases,
        eta_seconds,
        risk: overall,
        risk_reasons: overall_reasons,
        rollback_strategy,
        warnings,
        parallel_limit: options.parallel_limit,
        max_failures,
        rollback_all_on_abort: options.rollback_all_on_abort,
        canary_soak_seconds: (options.strategy == Strategy::Canary)
            .then_some(options.canary_soak.as_secs()),
    })
}

pub use estimate::simulate;
