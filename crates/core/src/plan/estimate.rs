//! How long a deployment takes: each host's estimate from its history (or
//! the fleet's, or the default), and the makespan of the order under the
//! parallel limit.

use std::collections::{BTreeMap, BTreeSet};

use super::order::Ordering;
use super::{DEFAULT_ESTIMATE, EstimateSource, HostFacts, median_ms};
use crate::options::{DeployOptions, Strategy};

/// Each host's estimate in seconds and where it comes from.
pub(super) type Estimates = BTreeMap<String, (f64, EstimateSource)>;

/// Each selected host's estimate, and the deployment's ETA in seconds.
pub(super) fn estimate(
    facts: &[HostFacts],
    deploy: &[&HostFacts],
    order: &Ordering,
    options: &DeployOptions,
) -> (Estimates, f64) {
    let (ordered, waits, canaries) = (&order.ordered, &order.waits, &order.canaries);
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
    let mut eta_seconds = simulate(ordered, waits, &durations, options.parallel_limit);
    if options.strategy == Strategy::BlueGreen && !deploy.is_empty() {
        // The commit (profile + boot entry) is quick next to activation.
        eta_seconds += deploy.len().div_ceil(options.parallel_limit) as f64 * 2.0;
    }

    (estimates, eta_seconds)
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
