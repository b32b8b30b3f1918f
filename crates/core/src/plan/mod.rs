//! The planner: from what each selected host runs, what the flake says it
//! should run, the dependency graph and the strategy, decide what happens to
//! every host, in what order, how long it should take and how risky it is.
//! Pure: no IO, no clock. The engine executes exactly the plan's `waits_for`
//! edges.
//!
//! Dependencies form a DAG (a cycle is an error naming it); phases
//! are the levels of the final ordering graph; execution is eager.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::events::{HostState, SystemRef};
use crate::options::{DeployOptions, Strategy};
use crate::summary::ChangeSummary;

mod graph;

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

    // 1. Action per host, then skip dependents of hosts we cannot deploy.
    let mut action: BTreeMap<String, (Action, Option<String>)> = BTreeMap::new();
    for f in facts {
        let decided = match f.state {
            HostState::Unreachable => {
                (Action::Unreachable, Some("host is unreachable".to_string()))
            }
            HostState::Unchanged if options.force => (
                Action::Deploy,
                Some("unchanged, re-activated because of --force".to_string()),
            ),
            HostState::Unchanged => (Action::Skip, Some("no changes".to_string())),
            HostState::Changed => (
                Action::Deploy,
                Some(match &f.current.path {
                    None => "no system deployed yet".to_string(),
                    Some(_) => "configuration changed".to_string(),
                }),
            ),
        };
        action.insert(f.name.clone(), decided);
    }
    if options.strategy != Strategy::Parallel {
        // In dependency order, so a skip propagates down the graph.
        let mut changed = true;
        while changed {
            changed = false;
            for f in facts {
                if action[&f.name].0 != Action::Deploy {
                    continue;
                }
                let blocked = graph.dependencies(&f.name).into_iter().find(|d| {
                    matches!(action.get(d), Some((Action::Unreachable, _)))
                        || matches!(action.get(d), Some((Action::Skip, Some(r))) if r.starts_with("dependency"))
                });
                if let Some(dep) = blocked {
                    action.insert(
                        f.name.clone(),
                        (
                            Action::Skip,
                            Some(format!("dependency {dep} cannot be deployed or verified")),
                        ),
                    );
                    changed = true;
                }
            }
        }
    }
    let deploy: Vec<&HostFacts> = facts
        .iter()
        .filter(|f| action[&f.name].0 == Action::Deploy)
        .collect();
    let deploy_set: BTreeSet<&str> = deploy.iter().map(|f| f.name.as_str()).collect();

    // 2. Ordering edges: dependency → dependent, within this deployment.
    let mut waits: BTreeMap<String, BTreeSet<String>> = deploy
        .iter()
        .map(|f| (f.name.clone(), BTreeSet::new()))
        .collect();
    let mut canaries: BTreeSet<String> = BTreeSet::new();
    let mut reason_parts: Vec<String> = Vec::new();
    for f in &deploy {
        for dep in graph.dependencies(&f.name) {
            if deploy_set.contains(dep.as_str()) {
                if options.strategy == Strategy::Parallel {
                    warnings.push(format!(
                        "parallel ignores the dependency {} → {dep}: {} may activate before {dep}",
                        f.name, f.name
                    ));
                } else {
                    waits.get_mut(&f.name).map(|w| w.insert(dep.clone()));
                }
            }
        }
    }
    let dependency_levels = levels(&deploy, &waits);

    // Infrastructure first, when nothing else orders the two.
    if matches!(
        options.strategy,
        Strategy::Smart | Strategy::Canary | Strategy::Rolling
    ) {
        let infra: Vec<&str> = deploy
            .iter()
            .filter(|f| f.role == "infrastructure")
            .map(|f| f.name.as_str())
            .collect();
        if !infra.is_empty() && infra.len() < deploy.len() {
            for f in deploy.iter().filter(|f| f.role != "infrastructure") {
                for i in &infra {
                    if !graph.depends_transitively(i, &f.name) {
                        waits.get_mut(&f.name).map(|w| w.insert(i.to_string()));
                    }
                }
            }
            reason_parts.push(format!("infrastructure first ({})", infra.join(", ")));
        }
    }

    let by_order = |a: &&HostFacts, b: &&HostFacts| {
        let la = dependency_levels.get(&a.name).copied().unwrap_or(0);
        let lb = dependency_levels.get(&b.name).copied().unwrap_or(0);
        (la, &a.name).cmp(&(lb, &b.name))
    };
    let mut ordered = deploy.clone();
    ordered.sort_by(by_order);

    let mut batches: BTreeMap<String, usize> = BTreeMap::new();
    let strategy_reason = match options.strategy {
        Strategy::Smart => {
            // Per role with 3+ changed hosts: one canary first.
            let mut roles: BTreeMap<&str, Vec<&HostFacts>> = BTreeMap::new();
            for f in &ordered {
                roles.entry(f.role.as_str()).or_default().push(f);
            }
            for (role, members) in roles {
                if members.len() >= 3 {
                    let canary = members[0];
                    canaries.insert(canary.name.clone());
                    for other in &members[1..] {
                        if !graph.depends_transitively(&canary.name, &other.name) {
                            waits.get_mut(&other.name).map(|w| w.insert(canary.name.clone()));
                        }
                    }
                    reason_parts.push(format!(
                        "canary {} first for role {role} ({} changed hosts)",
                        canary.name,
                        members.len()
                    ));
                }
            }
            let skipped = facts.len() - deploy.len();
            let mut reason = format!(
                "smart (default): {} to deploy, {skipped} skipped, dependency order",
                deploy.len()
            );
            if !reason_parts.is_empty() {
                reason.push_str("; ");
                reason.push_str(&reason_parts.join("; "));
            }
            reason
        }
        Strategy::Parallel => format!(
            "parallel: every changed host at once, up to {} at a time",
            options.parallel_limit
        ),
        Strategy::Rolling => {
            let size = options.batch_size.batch_of(deploy.len());
            for (i, f) in ordered.iter().enumerate() {
                batches.insert(f.name.clone(), i / size + 1);
            }
            for f in &ordered {
                let batch = batches[&f.name];
                if batch > 1 {
                    for g in ordered.iter().filter(|g| batches[&g.name] == batch - 1) {
                        waits.get_mut(&f.name).map(|w| w.insert(g.name.clone()));
                    }
                }
            }
            format!(
                "rolling: batches of {size} ({}), each validated before the next; stops at the first failed batch",
                options.batch_size
            )
        }
        Strategy::Canary => {
            let chosen: Vec<String> = if options.canaries.is_empty() {
                ordered
                    .iter()
                    .find(|f| waits[&f.name].is_empty())
                    .map(|f| vec![f.name.clone()])
                    .unwrap_or_default()
            } else {
                let mut chosen = Vec::new();
                for c in &options.canaries {
                    if deploy_set.contains(c.as_str()) {
                        chosen.push(c.clone());
                    } else {
                        warnings.push(format!("canary {c} has nothing to deploy; it is not a canary"));
                    }
                }
                chosen
            };
            for c in &chosen {
                canaries.insert(c.clone());
            }
            for f in &deploy {
                if canaries.contains(&f.name) {
                    continue;
                }
                // Dependencies of a canary go before it, not after.
                if canaries.iter().any(|c| graph.depends_transitively(c, &f.name)) {
                    continue;
                }
                for c in &canaries {
                    waits.get_mut(&f.name).map(|w| w.insert(c.clone()));
                }
            }
            format!(
                "canary: {} first, held and re-validated for {}s; the rest follow only if it stays healthy; a failing canary is rolled back and the deployment stops",
                if canaries.is_empty() { "no host".to_string() } else { canaries.iter().cloned().collect::<Vec<_>>().join(", ") },
                options.canary_soak.as_secs()
            )
        }
        Strategy::BlueGreen => "blue-green: every host activates the new system with `switch-to-configuration test` (boot default unchanged); only when all are healthy is each committed (profile + boot); if any fails, every host returns to its old system".to_string(),
    };

    // 3. Phases: levels of the final ordering graph.
    let final_levels = levels(&deploy, &waits);
    let phase_count = final_levels
        .values()
        .copied()
        .max()
        .map(|m| m + 1)
        .unwrap_or(0);
    let mut phases: Vec<Phase> = (0..phase_count)
        .map(|index| Phase {
            index,
            hosts: Vec::new(),
            note: String::new(),
        })
        .collect();
    for f in &ordered {
        phases[final_levels[&f.name]].hosts.push(f.name.clone());
    }
    for phase in &mut phases {
        phase.hosts.sort();
        let waiting: BTreeSet<String> = phase
            .hosts
            .iter()
            .flat_map(|h| waits[h].iter().cloned())
            .collect();
        let all_canary = phase.hosts.iter().all(|h| canaries.contains(h));
        phase.note = match (waiting.is_empty(), all_canary && !canaries.is_empty()) {
            (_, true) => "canary".into(),
            (true, false) => "parallel".into(),
            (false, false) => format!(
                "after {}",
                waiting.into_iter().collect::<Vec<_>>().join(", ")
            ),
        };
    }

    // 4. Estimates.
    let soak = options.canary_soak.as_secs_f64();
    let mut estimates: BTreeMap<String, (f64, EstimateSource)> = BTreeMap::new();
    for f in facts {
        let (base, from_history) = match (
            median_ms(&f.history.successful_ms),
            f.history.fleet_median_ms,
        ) {
            (Some(ms), _) => (ms as f64 / 1000.0, EstimateSource::Host),
            (None, Some(ms)) => (ms as f64 / 1000.0, EstimateSource::Fleet),
            (None, None) => (DEFAULT_ESTIMATE.as_secs_f64(), EstimateSource::Default),
        };
        let extra = if options.strategy == Strategy::Canary && canaries.contains(&f.name) {
            soak
        } else {
            0.0
        };
        estimates.insert(f.name.clone(), (base + extra, from_history));
    }
    let durations: BTreeMap<String, f64> = deploy
        .iter()
        .map(|f| (f.name.clone(), estimates[&f.name].0))
        .collect();
    let mut eta_seconds = simulate(&ordered, &waits, &durations, options.parallel_limit);
    if options.strategy == Strategy::BlueGreen && !deploy.is_empty() {
        // The commit (profile + boot entry) is quick next to activation.
        eta_seconds += deploy.len().div_ceil(options.parallel_limit) as f64 * 2.0;
    }

    // 5. Risk.
    let share = if fleet_size == 0 {
        0.0
    } else {
        deploy.len() as f64 / fleet_size as f64
    };
    let mut hosts = Vec::new();
    let mut overall = Risk::Low;
    let mut overall_reasons = Vec::new();
    for f in facts {
        let (host_action, reason) = action[&f.name].clone();
        let mut risk = Risk::Low;
        let mut reasons = Vec::new();
        if host_action == Action::Deploy {
            let mut raise = |level: Risk, why: String| {
                risk = risk.max(level);
                reasons.push(why);
            };
            if f.summary.as_ref().is_some_and(|s| s.kernel_changed) {
                raise(Risk::High, "kernel changes".into());
            }
            if f.role == "infrastructure" {
                raise(Risk::Medium, "infrastructure role".into());
            }
            if f.history.successful_ms.is_empty() {
                raise(Risk::Medium, "no successful deployment in history".into());
            }
            match f.history.recent_failures {
                0 => {}
                1 => raise(Risk::Medium, "1 recent failed deployment".into()),
                n => raise(Risk::High, format!("{n} recent failed deployments")),
            }
            for r in &reasons {
                let line = format!("{}: {r}", f.name);
                if !overall_reasons.contains(&line) {
                    overall_reasons.push(line);
                }
            }
            overall = overall.max(risk);
        }
        let (estimate, from_history) = estimates[&f.name];
        hosts.push(PlannedHost {
            name: f.name.clone(),
            role: f.role.clone(),
            state: f.state,
            changed: f.state == HostState::Changed,
            current: f.current.clone(),
            target_path: f.target_path.clone(),
            action: host_action,
            reason,
            error: f.probe_error.clone(),
            depends_on: graph.dependencies(&f.name),
            waits_for: waits
                .get(&f.name)
                .map(|w| w.iter().cloned().collect())
                .unwrap_or_default(),
            phase: final_levels.get(&f.name).copied(),
            canary: canaries.contains(&f.name),
            batch: batches.get(&f.name).copied(),
            estimate_seconds: if host_action == Action::Deploy {
                estimate
            } else {
                0.0
            },
            estimate_from_history: from_history == EstimateSource::Host,
            estimate_source: from_history,
            risk,
            risk_reasons: reasons,
            summary: f.summary.clone(),
            eval_cached: false,
        });
    }
    if share > 0.5 {
        let level = if options.strategy == Strategy::Parallel {
            Risk::High
        } else {
            Risk::Medium
        };
        overall = overall.max(level);
        overall_reasons.push(format!(
            "touches {:.0}% of the fleet ({} of {fleet_size} hosts){}",
            share * 100.0,
            deploy.len(),
            if options.strategy == Strategy::Parallel {
                " at once"
            } else {
                ""
            }
        ));
    }
    if deploy.is_empty() {
        overall = Risk::Low;
        overall_reasons.clear();
    }

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
        strategy_reason,
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

/// Longest-path level of each host in the `waits` graph (roots are level 0).
fn levels(
    hosts: &[&HostFacts],
    waits: &BTreeMap<String, BTreeSet<String>>,
) -> BTreeMap<String, usize> {
    let mut level: BTreeMap<String, usize> = BTreeMap::new();
    let mut remaining: Vec<&str> = hosts.iter().map(|f| f.name.as_str()).collect();
    // The graph is acyclic by construction; bound the loop anyway.
    for _ in 0..=hosts.len() {
        if remaining.is_empty() {
            break;
        }
        remaining.retain(|h| {
            let deps = &waits[*h];
            if deps.iter().all(|d| level.contains_key(d)) {
                let l = deps.iter().map(|d| level[d] + 1).max().unwrap_or(0);
                level.insert(h.to_string(), l);
                false
            } else {
                true
            }
        });
    }
    for h in remaining {
        level.insert(h.to_string(), 0);
    }
    level
}

/// Simulate eager list scheduling: a host starts when everything it waits for
/// is done and a slot is free. Returns the makespan in seconds.
pub fn simulate(
    order: &[&HostFacts],
    waits: &BTreeMap<String, BTreeSet<String>>,
    durations: &BTreeMap<String, f64>,
    limit: usize,
) -> f64 {
    let mut finish: BTreeMap<&str, f64> = BTreeMap::new();
    let mut running: Vec<(f64, &str)> = Vec::new();
    let mut pending: Vec<&str> = order.iter().map(|f| f.name.as_str()).collect();
    let mut now = 0.0f64;
    while !pending.is_empty() || !running.is_empty() {
        let mut started = false;
        let mut i = 0;
        while i < pending.len() && running.len() < limit.max(1) {
            let h = pending[i];
            if waits[h]
                .iter()
                .all(|d| finish.get(d.as_str()).is_some_and(|t| *t <= now))
            {
                running.push((now + durations.get(h).copied().unwrap_or(0.0), h));
                pending.remove(i);
                started = true;
            } else {
                i += 1;
            }
        }
        if running.is_empty() {
            if !started {
                break;
            }
            continue;
        }
        running.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (t, h) = running.remove(0);
        now = t;
        finish.insert(h, t);
    }
    finish.values().copied().fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Amount;

    fn gh(name: &str, tags: &[&str], deps: &[&str]) -> GraphHost {
        GraphHost {
            name: name.into(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
            dependencies: deps.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn facts(name: &str, role: &str, state: HostState) -> HostFacts {
        HostFacts {
            name: name.into(),
            role: role.into(),
            state,
            current: SystemRef {
                path: Some("/nix/store/old".into()),
                generation: Some(1),
            },
            target_path: "/nix/store/new".into(),
            probe_error: None,
            summary: None,
            history: HostHistory::default(),
        }
    }

    fn seed_fleet() -> (Vec<HostFacts>, DependencyGraph) {
        let graph = DependencyGraph::build(&[
            gh("p620", &["monitoring"], &[]),
            gh("p510", &[], &["p620"]),
            gh("razer", &["laptop"], &["@monitoring"]),
            gh("samsung", &["laptop"], &["p620"]),
        ])
        .unwrap();
        let facts = vec![
            facts("p620", "infrastructure", HostState::Changed),
            facts("p510", "media", HostState::Unchanged),
            facts("razer", "mobile", HostState::Changed),
            facts("samsung", "mobile", HostState::Changed),
        ];
        (facts, graph)
    }

    fn phases(plan: &Plan) -> Vec<Vec<&str>> {
        plan.phases
            .iter()
            .map(|p| p.hosts.iter().map(String::as_str).collect())
            .collect()
    }

    #[test]
    fn rejects_cycles_naming_every_host() {
        let err = DependencyGraph::build(&[
            gh("a", &[], &["b"]),
            gh("b", &[], &["c"]),
            gh("c", &[], &["a"]),
            gh("d", &[], &[]),
        ])
        .unwrap_err();
        assert_eq!(
            err,
            PlanError::Cycle {
                hosts: vec!["a".into(), "b".into(), "c".into(), "a".into()]
            }
        );
        assert!(err.to_string().contains("a → b → c → a"));
        let err = DependencyGraph::build(&[gh("a", &[], &["a"])]).unwrap_err();
        assert!(matches!(err, PlanError::Cycle { .. }));
    }

    #[test]
    fn rejects_unknown_dependencies() {
        let err = DependencyGraph::build(&[gh("a", &[], &["ghost"])]).unwrap_err();
        assert!(err.to_string().contains("`ghost`"), "{err}");
        let err = DependencyGraph::build(&[gh("a", &[], &["@ghosts"])]).unwrap_err();
        assert!(matches!(err, PlanError::UnknownTag { .. }));
    }

    #[test]
    fn smart_follows_dependencies_and_skips_unchanged() {
        let (facts, graph) = seed_fleet();
        let plan = plan(&facts, &graph, 4, &DeployOptions::default()).unwrap();
        assert_eq!(phases(&plan), vec![vec!["p620"], vec!["razer", "samsung"]]);
        assert_eq!(plan.get("p510").unwrap().action, Action::Skip);
        assert_eq!(plan.get("razer").unwrap().waits_for, ["p620"]);
        assert_eq!(plan.get("razer").unwrap().depends_on, ["p620"]);
        assert!(plan.strategy_reason.starts_with("smart"));
    }

    #[test]
    fn smart_puts_a_canary_first_in_a_role_of_three() {
        let graph = DependencyGraph::build(&[
            gh("w1", &[], &[]),
            gh("w2", &[], &[]),
            gh("w3", &[], &[]),
            gh("d1", &[], &[]),
            gh("d2", &[], &[]),
        ])
        .unwrap();
        let facts = vec![
            facts("w2", "web", HostState::Changed),
            facts("w1", "web", HostState::Changed),
            facts("w3", "web", HostState::Changed),
            facts("d1", "db", HostState::Changed),
            facts("d2", "db", HostState::Changed),
        ];
        let plan = plan(&facts, &graph, 5, &DeployOptions::default()).unwrap();
        assert!(plan.get("w1").unwrap().canary);
        assert_eq!(plan.get("w2").unwrap().waits_for, ["w1"]);
        assert_eq!(plan.get("w3").unwrap().waits_for, ["w1"]);
        // A role of 2 gets no canary.
        assert!(plan.get("d1").unwrap().waits_for.is_empty());
        assert!(!plan.get("d1").unwrap().canary);
        assert_eq!(
            phases(&plan),
            vec![vec!["d1", "d2", "w1"], vec!["w2", "w3"]]
        );
    }

    #[test]
    fn unreachable_dependencies_skip_their_dependents() {
        let (mut facts, graph) = seed_fleet();
        facts[0].state = HostState::Unreachable;
        let plan = plan(&facts, &graph, 4, &DeployOptions::default()).unwrap();
        assert_eq!(plan.get("p620").unwrap().action, Action::Unreachable);
        let razer = plan.get("razer").unwrap();
        assert_eq!(razer.action, Action::Skip);
        assert!(razer.reason.as_deref().unwrap().contains("p620"));
    }

    #[test]
    fn parallel_ignores_edges_and_warns() {
        let (facts, graph) = seed_fleet();
        let options = DeployOptions {
            strategy: Strategy::Parallel,
            ..DeployOptions::default()
        };
        let plan = plan(&facts, &graph, 4, &options).unwrap();
        assert_eq!(phases(&plan), vec![vec!["p620", "razer", "samsung"]]);
        assert_eq!(plan.warnings.len(), 2);
        assert!(plan.warnings[0].contains("razer → p620"));
    }

    #[test]
    fn rolling_batches_wait_for_the_previous_batch() {
        let names = ["a", "b", "c", "d", "e"];
        let graph = DependencyGraph::build(&names.map(|n| gh(n, &[], &[]))).unwrap();
        let facts: Vec<HostFacts> = names
            .iter()
            .map(|n| facts(n, "client", HostState::Changed))
            .collect();
        let options = DeployOptions {
            strategy: Strategy::Rolling,
            batch_size: Amount::Count(2),
            ..DeployOptions::default()
        };
        let plan = plan(&facts, &graph, 5, &options).unwrap();
        assert_eq!(
            phases(&plan),
            vec![vec!["a", "b"], vec!["c", "d"], vec!["e"]]
        );
        assert_eq!(plan.get("c").unwrap().waits_for, ["a", "b"]);
        assert_eq!(plan.get("e").unwrap().batch, Some(3));
        let options = DeployOptions {
            batch_size: Amount::Percent(40),
            ..options
        };
        let plan = super::plan(&facts, &graph, 5, &options).unwrap();
        assert_eq!(plan.phases.len(), 3);
    }

    #[test]
    fn canary_goes_first_and_soaks() {
        let (mut facts, graph) = seed_fleet();
        for f in &mut facts {
            f.history.fleet_median_ms = Some(20_000);
        }
        let options = DeployOptions {
            strategy: Strategy::Canary,
            canaries: vec!["samsung".into()],
            canary_soak: Duration::from_secs(10),
            ..DeployOptions::default()
        };
        let plan = plan(&facts, &graph, 4, &options).unwrap();
        // samsung depends on p620, so p620 goes before the canary.
        assert_eq!(
            phases(&plan),
            vec![vec!["p620"], vec!["samsung"], vec!["razer"]]
        );
        assert!(plan.get("samsung").unwrap().canary);
        assert_eq!(plan.get("samsung").unwrap().estimate_seconds, 30.0);
        assert_eq!(plan.eta_seconds, 70.0);
        let options = DeployOptions {
            canaries: vec!["nope".into()],
            ..options
        };
        assert!(super::plan(&facts, &graph, 4, &options).is_err());
    }

    #[test]
    fn estimates_use_history_medians_and_eta_simulates_the_limit() {
        let graph = DependencyGraph::build(&["a", "b", "c"].map(|n| gh(n, &[], &[]))).unwrap();
        let mut f: Vec<HostFacts> = ["a", "b", "c"]
            .iter()
            .map(|n| facts(n, "client", HostState::Changed))
            .collect();
        f[0].history.successful_ms = vec![10_000, 30_000, 20_000];
        let options = DeployOptions {
            parallel_limit: 2,
            ..DeployOptions::default()
        };
        let plan = plan(&f, &graph, 3, &options).unwrap();
        let a = plan.get("a").unwrap();
        assert_eq!(a.estimate_seconds, 20.0);
        assert!(a.estimate_from_history);
        assert_eq!(plan.get("b").unwrap().estimate_seconds, 60.0);
        assert_eq!(
            plan.get("b").unwrap().estimate_source,
            EstimateSource::Default
        );
        // a (20) and b (60) start; c starts when a ends at 20 and ends at 80.
        assert_eq!(plan.eta_seconds, 80.0);

        // With fleet history, a host without its own takes the fleet's median.
        for facts in &mut f {
            facts.history.fleet_median_ms = Some(4_000);
        }
        let with_fleet = super::plan(&f, &graph, 3, &options).unwrap();
        assert_eq!(with_fleet.get("a").unwrap().estimate_seconds, 20.0);
        let b = with_fleet.get("b").unwrap();
        assert_eq!(b.estimate_seconds, 4.0);
        assert_eq!(b.estimate_source, EstimateSource::Fleet);
        assert!(!b.estimate_from_history);
    }

    #[test]
    fn risk_reasons() {
        let (mut facts, graph) = seed_fleet();
        for f in &mut facts {
            f.history.successful_ms = vec![1000];
        }
        facts[2].summary = Some(ChangeSummary {
            kernel_changed: true,
            compared: true,
            ..ChangeSummary::default()
        });
        facts[3].history.recent_failures = 1;
        let plan = plan(&facts, &graph, 4, &DeployOptions::default()).unwrap();
        assert_eq!(plan.get("razer").unwrap().risk, Risk::High);
        assert_eq!(plan.get("samsung").unwrap().risk, Risk::Medium);
        assert_eq!(plan.get("p620").unwrap().risk, Risk::Medium);
        assert_eq!(plan.risk, Risk::High);
        assert!(plan.risk_reasons.iter().any(|r| r.contains("kernel")));
        assert!(
            plan.risk_reasons
                .iter()
                .any(|r| r.contains("75% of the fleet"))
        );
    }
}
