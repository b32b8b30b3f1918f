//! The rounds of one evaluation ([`super::evaluate`]): the hosts to read
//! (each with its system or not) taken from the cache, the rest split into
//! shards run by a bounded pool of `nix eval` processes, a failing shard
//! split until each host's own error is known, results cached and sent on
//! as each shard ends.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use nix_deploy_core::eval::{self, EvalFailure, EvaluationReport, FlakeIdentity};
use nix_deploy_core::fleet;
use nix_deploy_core::source::FleetSource;

use super::FleetContext;
use super::evaluate::{EvalUpdate, EvaluatedHost};
use crate::engine::EngineError;
use crate::process::{ExecError, Output};
use crate::store::CachedEvaluation;

/// A batch of hosts for one `nix eval`: each with whether its system is read.
pub(super) struct Shard {
    hosts: Vec<(String, bool)>,
    /// Catch each host's `throw` (only worth it with more than one host: a
    /// single host's own error is the process's).
    catch: bool,
    /// Planned, not a retry: its memory is representative.
    regular: bool,
}

impl Shard {
    fn new(hosts: Vec<(String, bool)>, regular: bool) -> Self {
        Shard {
            catch: hosts.len() > 1,
            hosts,
            regular,
        }
    }

    fn names(&self) -> Vec<String> {
        self.hosts.iter().map(|(name, _)| name.clone()).collect()
    }

    /// Its memory is representative of a host's evaluation: planned, and
    /// every host's system read (metadata alone costs less).
    fn representative(&self) -> bool {
        self.regular && self.hosts.iter().all(|(_, system)| *system)
    }
}

/// Re-cut the planned shards that have not started into shards of the size
/// `budget` (MiB a host) allows, never smaller than `size` they had. Returns
/// the new size when it changed.
fn reshard(
    queue: &mut VecDeque<Shard>,
    size: usize,
    workers: usize,
    available_mib: u64,
    budget: u64,
) -> Option<usize> {
    let waiting: Vec<(String, bool)> = queue
        .iter()
        .filter(|s| s.regular)
        .flat_map(|s| s.hosts.iter().cloned())
        .collect();
    let bigger = eval::hosts_per_shard(waiting.len(), workers, available_mib, budget);
    if waiting.is_empty() || bigger <= size {
        return None;
    }
    queue.retain(|s| !s.regular);
    queue.extend(split(&waiting, bigger).map(|hosts| Shard::new(hosts, true)));
    Some(bigger)
}

/// `hosts` in shards of at most `size` ([`eval::split_into_shards`]).
fn split(hosts: &[(String, bool)], size: usize) -> impl Iterator<Item = Vec<(String, bool)>> {
    let names: Vec<String> = hosts.iter().map(|(n, _)| n.clone()).collect();
    let wanted: BTreeMap<String, bool> = hosts.iter().cloned().collect();
    eval::split_into_shards(&names, size)
        .into_iter()
        .map(move |shard| shard.into_iter().map(|n| (n.clone(), wanted[&n])).collect())
}

/// Memory the kernel says can be had without swapping, in MiB.
pub(super) fn available_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        // Unknown: assume a small machine.
        .unwrap_or(4096)
}

/// Nix's own words from a failed `nix eval`: the tail of its stderr without
/// the `--show-trace` hint (the command line is ours and says nothing new).
fn nix_error(error: &ExecError) -> String {
    let tail = error.stderr_tail();
    let text: Vec<&str> = tail
        .lines()
        .filter(|l| !l.trim_start().starts_with("(use '--show-trace'"))
        .collect();
    let text = text.join("\n").trim().to_string();
    if text.is_empty() {
        error.to_string()
    } else {
        text
    }
}

/// What every round of one evaluation shares.
pub(super) struct Round {
    /// The flake as given (cache entries are filed under it).
    pub flake: String,
    /// What `nix eval` reads: the flake pinned to its identity when it has one.
    pub eval_ref: String,
    pub source: FleetSource,
    pub identity: Option<FlakeIdentity>,
    pub version: String,
    pub read_cache: bool,
    /// The per-host memory measured for this flake, KiB.
    pub measured: Option<u64>,
    pub available: u64,
    pub workers: usize,
    pub worker_share: u64,
    pub gate: Arc<Semaphore>,
}

impl Round {
    fn key(&self, name: &str, system: bool) -> Option<String> {
        self.identity
            .as_ref()
            .map(|identity| eval::host_key(identity, &self.version, self.source, name, system))
    }
}

/// What the rounds of one evaluation found, across rounds.
#[derive(Default)]
pub(super) struct Progress {
    pub report: EvaluationReport,
    pub cached: BTreeSet<String>,
    pub evaluated: BTreeSet<String>,
    pub systems: BTreeSet<String>,
    pub systems_evaluated: BTreeSet<String>,
    pub regular_host_kib: Option<u64>,
    /// The consumer went away: stop.
    pub closed: bool,
}

/// Whether an evaluated entry holds its host's system.
pub(super) fn has_system(value: &serde_json::Value) -> bool {
    value.get("toplevel").is_some_and(|t| !t.is_null())
}

/// Read `hosts` (each with its system when wanted): from the cache, then
/// in shards. Returns every entry sent.
pub(super) async fn round(
    cx: FleetContext<'_>,
    round: &Round,
    hosts: Vec<(String, bool)>,
    progress: &mut Progress,
    updates: &mpsc::UnboundedSender<EvalUpdate>,
) -> Result<BTreeMap<String, serde_json::Value>, EngineError> {
    let (store, nix) = (cx.store, &cx.config.nix);
    let mut delivered = BTreeMap::new();
    if hosts.is_empty() || progress.closed {
        return Ok(delivered);
    }
    for (name, system) in &hosts {
        if *system {
            progress.systems.insert(name.clone());
        }
    }
    // What the cache knows: an entry with the system serves a host
    // whose metadata alone is wanted too.
    let mut misses = hosts.clone();
    if round.read_cache {
        let keys: Vec<String> = hosts
            .iter()
            .flat_map(|(name, system)| {
                [
                    round.key(name, true),
                    (!system).then(|| round.key(name, false)).flatten(),
                ]
            })
            .flatten()
            .collect();
        let found = store.cached_evaluations(&keys).await?;
        let lookup = |key: Option<String>| -> Option<serde_json::Value> {
            found
                .get(&key?)
                .and_then(|text| serde_json::from_str(text).ok())
        };
        let mut hits = Vec::new();
        misses.clear();
        for (name, system) in &hosts {
            let value = lookup(round.key(name, true)).or_else(|| {
                if *system {
                    None
                } else {
                    lookup(round.key(name, false))
                }
            });
            match value {
                Some(value) => {
                    progress.cached.insert(name.clone());
                    delivered.insert(name.clone(), value.clone());
                    hits.push(EvaluatedHost {
                        name: name.clone(),
                        value,
                        cached: true,
                    });
                }
                None => misses.push((name.clone(), *system)),
            }
        }
        if !hits.is_empty() && updates.send(EvalUpdate::Hosts(hits)).is_err() {
            progress.closed = true;
            return Ok(delivered);
        }
    }
    if misses.is_empty() {
        return Ok(delivered);
    }
    for (name, system) in &misses {
        progress.evaluated.insert(name.clone());
        if *system {
            progress.systems_evaluated.insert(name.clone());
        }
    }

    // The rest, in shards.
    let report = &mut progress.report;
    let host_budget_mib = report.host_budget_mib;
    let per_shard = eval::hosts_per_shard(
        misses.len(),
        round.workers,
        round.available,
        host_budget_mib,
    );
    report.hosts_per_shard = report.hosts_per_shard.max(per_shard);
    let mut queue: VecDeque<Shard> = split(&misses, per_shard)
        .map(|hosts| Shard::new(hosts, true))
        .collect();
    let mut running: JoinSet<(Shard, Result<Output, ExecError>)> = JoinSet::new();
    loop {
        while running.len() < round.workers
            && let Some(shard) = queue.pop_front()
        {
            report.shards += 1;
            let heap =
                eval::gc_initial_heap_bytes(shard.hosts.len(), round.measured, round.worker_share);
            if let Some(bytes) = heap {
                let mib = bytes / 1024 / 1024;
                report.gc_initial_heap_mib = Some(report.gc_initial_heap_mib.unwrap_or(0).max(mib));
            }
            let nix = nix.clone();
            let eval_ref = round.eval_ref.clone();
            let gate = round.gate.clone();
            let source = round.source;
            running.spawn(async move {
                // Closed never: the gate lives as long as the config.
                let _slot = gate.acquire_owned().await;
                let result = nix
                    .eval_hosts(&eval_ref, source, &shard.hosts, shard.catch, heap)
                    .await;
                (shard, result)
            });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (shard, result) =
            joined.map_err(|e| EngineError::Internal(format!("evaluation task failed: {e}")))?;
        let mut failed = Vec::new();
        match result {
            Ok(output) => {
                if let Some(kib) = output.peak_rss_kib {
                    let mib = kib as f64 / 1024.0;
                    report.peak_shard_mib = Some(report.peak_shard_mib.map_or(mib, |p| p.max(mib)));
                    if shard.representative() {
                        let per_host = kib / shard.hosts.len() as u64;
                        let first = progress.regular_host_kib.is_none();
                        progress.regular_host_kib =
                            Some(progress.regular_host_kib.unwrap_or(0).max(per_host));
                        // Nothing was known when the shards were cut (the
                        // cautious default budget makes them small): cut
                        // what has not started by what this one needed.
                        if first && round.measured.is_none() {
                            let budget = eval::host_budget_from_peak(per_host, 1);
                            if let Some(size) = reshard(
                                &mut queue,
                                per_shard,
                                round.workers,
                                round.available,
                                budget,
                            ) {
                                report.hosts_per_shard = size;
                                report.host_budget_mib = budget;
                                report.host_budget_source = "measured by the first shard".into();
                            }
                        }
                    }
                }
                let wanted: BTreeMap<String, bool> = shard.hosts.iter().cloned().collect();
                match eval::parse_shard_output(&output.stdout, &shard.names()) {
                    Ok(parsed) => {
                        // Their own errors come back sooner from the front.
                        for host in parsed.caught.into_iter().rev() {
                            let system = wanted[&host];
                            queue.push_front(Shard::new(vec![(host, system)], false));
                        }
                        for host in parsed.missing {
                            failed.push(EvalFailure {
                                error: format!(
                                    "`{host}` was not in the output of `nix eval` (did the flake change?)"
                                ),
                                host,
                            });
                        }
                        // Only entries whose metadata reads are kept: a
                        // wrong one may hold a secret in the wrong place,
                        // and is evaluated again until it is fixed.
                        let entries: Vec<CachedEvaluation> = parsed
                            .hosts
                            .iter()
                            .filter(|(name, value)| {
                                fleet::parse_host(round.source, name, (*value).clone()).is_ok()
                            })
                            .filter_map(|(name, value)| {
                                Some(CachedEvaluation {
                                    key: round.key(name, wanted[name])?,
                                    host: Some(name.clone()),
                                    value: value.to_string(),
                                })
                            })
                            .collect();
                        store.cache_evaluations(&round.flake, &entries).await?;
                        let hosts: Vec<EvaluatedHost> = parsed
                            .hosts
                            .into_iter()
                            .map(|(name, value)| {
                                delivered.insert(name.clone(), value.clone());
                                EvaluatedHost {
                                    name,
                                    value,
                                    cached: false,
                                }
                            })
                            .collect();
                        if !hosts.is_empty() && updates.send(EvalUpdate::Hosts(hosts)).is_err() {
                            progress.closed = true;
                            break;
                        }
                    }
                    Err(reason) => {
                        for host in shard.names() {
                            failed.push(EvalFailure {
                                host,
                                error: format!("unexpected output of `nix eval`: {reason}"),
                            });
                        }
                    }
                }
            }
            Err(error @ ExecError::Timeout { .. }) => {
                let together = shard.names().join(", ");
                for host in shard.names() {
                    failed.push(EvalFailure {
                        host,
                        error: format!(
                            "evaluating {together} timed out after {}s",
                            nix.eval_timeout.as_secs()
                        ),
                    });
                }
                tracing::warn!(cause = %error, "evaluation shard timed out");
            }
            Err(error) if shard.hosts.len() > 1 => {
                // An error tryEval cannot catch (or the process died):
                // find whose, without losing the others' results.
                tracing::debug!(hosts = ?shard.names(), cause = %error, "shard failed; splitting it");
                let mut first = shard.hosts;
                let second = first.split_off(first.len() / 2);
                queue.push_front(Shard::new(second, false));
                queue.push_front(Shard::new(first, false));
            }
            Err(error) => failed.push(EvalFailure {
                host: shard.hosts[0].0.clone(),
                error: nix_error(&error),
            }),
        }
        report.failed.extend(failed);
    }
    drop(running);
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_not_started_are_recut_by_the_measured_budget_never_smaller() {
        let hosts: Vec<String> = (0..40).map(|i| format!("h{i}")).collect();
        let hosts: Vec<(String, bool)> = hosts.into_iter().map(|h| (h, true)).collect();
        let mut queue: VecDeque<Shard> = split(&hosts, 8).map(|h| Shard::new(h, true)).collect();
        queue.push_front(Shard::new(vec![("retried".into(), true)], false));
        // 2 workers, 2 shards each: 10 hosts a shard, memory allowing.
        assert_eq!(reshard(&mut queue, 8, 2, 20_000, 20), Some(10));
        assert!(!queue[0].regular, "retries still go first");
        let regular: Vec<usize> = queue
            .iter()
            .filter(|s| s.regular)
            .map(|s| s.hosts.len())
            .collect();
        assert_eq!(regular, [10, 10, 10, 10]);
        // Already as big as the budget allows: left alone.
        assert_eq!(reshard(&mut queue, 10, 2, 20_000, 20), None);
        // A budget that allows fewer hosts never makes shards smaller.
        assert_eq!(reshard(&mut queue, 10, 2, 20_000, 4_000), None);
        assert_eq!(queue.iter().filter(|s| s.regular).count(), 4);
    }
}
