//! The risk of a deployment, per host (kernel changes, infrastructure, no
//! or failed history) and overall (the share of the fleet touched), and the
//! planned hosts as they are reported.

use std::collections::BTreeMap;

use super::actions::Actions;
use super::estimate::Estimates;
use super::order::Ordering;
use super::{Action, DependencyGraph, EstimateSource, HostFacts, PlannedHost, Risk};
use crate::events::HostState;
use crate::options::{DeployOptions, Strategy};

/// What the planner decided, for [`assess`] to report host by host.
pub(super) struct Decided<'a> {
    pub action: &'a Actions,
    pub order: &'a Ordering<'a>,
    pub levels: &'a BTreeMap<String, usize>,
    pub estimates: &'a Estimates,
}

/// Every selected host as planned, with its risk; the overall risk and why.
pub(super) fn assess(
    facts: &[HostFacts],
    deploy: &[&HostFacts],
    graph: &DependencyGraph,
    fleet_size: usize,
    options: &DeployOptions,
    decided: &Decided,
) -> (Vec<PlannedHost>, Risk, Vec<String>) {
    let (action, estimates, final_levels) = (decided.action, decided.estimates, decided.levels);
    let (waits, canaries, batches) = (
        &decided.order.waits,
        &decided.order.canaries,
        &decided.order.batches,
    );
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

    (hosts, overall, overall_reasons)
}
