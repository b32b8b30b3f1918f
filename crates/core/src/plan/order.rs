//! The order of a deployment: who waits for whom (dependencies,
//! infrastructure first, the strategy's canaries and batches), and the
//! phases that order makes.

use std::collections::{BTreeMap, BTreeSet};

use super::{DependencyGraph, HostFacts, Phase};
use crate::options::{DeployOptions, Strategy};

/// Who waits for whom, and the strategy's choices.
pub(super) struct Ordering<'a> {
    /// The hosts to deploy, in dependency order.
    pub ordered: Vec<&'a HostFacts>,
    /// Hosts of this deployment each host waits for.
    pub waits: BTreeMap<String, BTreeSet<String>>,
    pub canaries: BTreeSet<String>,
    /// Rolling batch numbers (from 1).
    pub batches: BTreeMap<String, usize>,
    /// Why this order, for people.
    pub strategy_reason: String,
}

/// The order the strategy gives the hosts to deploy (`deploy`, out of the
/// selected `facts`). What it cannot honour goes to `warnings`.
pub(super) fn order<'a>(
    facts: &[HostFacts],
    deploy: &[&'a HostFacts],
    graph: &DependencyGraph,
    options: &DeployOptions,
    warnings: &mut Vec<String>,
) -> Ordering<'a> {
    let deploy_set: BTreeSet<&str> = deploy.iter().map(|f| f.name.as_str()).collect();
    // Ordering edges: dependency → dependent, within this deployment.
    let mut waits: BTreeMap<String, BTreeSet<String>> = deploy
        .iter()
        .map(|f| (f.name.clone(), BTreeSet::new()))
        .collect();
    let mut canaries: BTreeSet<String> = BTreeSet::new();
    let mut reason_parts: Vec<String> = Vec::new();
    for f in deploy {
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
    let dependency_levels = levels(deploy, &waits);

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
    let mut ordered = deploy.to_vec();
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
            for f in deploy {
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

    Ordering {
        ordered,
        waits,
        canaries,
        batches,
        strategy_reason,
    }
}

/// The phases of an order: the levels of its final waiting graph, each with
/// why it waits. Returns them with each host's level.
pub(super) fn phases(
    deploy: &[&HostFacts],
    order: &Ordering,
) -> (Vec<Phase>, BTreeMap<String, usize>) {
    let (ordered, waits, canaries) = (&order.ordered, &order.waits, &order.canaries);
    let final_levels = levels(deploy, waits);
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
    for f in ordered.iter() {
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

    (phases, final_levels)
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
