//! Evaluating the fleet: sharded over several `nix eval` processes at once,
//! bounded in memory, streamed host by host to whoever waits for them, and
//! skipped when the evaluation cache already holds the result.
//!
//! 1. `nix flake metadata` and `nix --version` (at once): the flake's locked
//!    identity, and a reference pinned to exactly that content
//!    ([`FlakeIdentity`]). Every later `nix eval` reads that reference, so
//!    what it computes is what the cache key names.
//! 2. The host names (from the cache, or one cheap `nix eval`).
//! 3. Every host whose key is in the cache is ready at once.
//! 4. The rest are split into shards ([`eval::hosts_per_shard`]) evaluated by
//!    up to `workers` processes at once (and no more than that across the
//!    evaluations running at the same time in this process: the daemon's); each shard's hosts are sent on as
//!    soon as it ends and cached. A host that throws comes back as `null` and
//!    is evaluated again alone for Nix's error; a shard that fails otherwise
//!    is split in halves and tried again, so one host's error never hides
//!    another host's result. A shard that times out fails its hosts.
//! 5. The peak memory of regular shards, per host, sizes the next run's
//!    shards (`eval_memory`), and their initial heap
//!    ([`eval::gc_initial_heap_bytes`]): a shard starts with the heap it was
//!    measured to need instead of collecting again and again on the way.
//!
//! Nothing here touches a host: the consumer of the updates decides what to
//! do with a host as it arrives (`prepare` starts probing it, read-only).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use nix_deploy_core::eval::{self, EvalFailure, EvaluationReport, FlakeIdentity};
use nix_deploy_core::fleet::{Host, Inventory, InventoryError, Selection};
use nix_deploy_core::select;
use nix_deploy_core::shell;

use super::FleetContext;
use crate::engine::EngineError;
use crate::nix::Nix;
use crate::process::{ExecError, Output};
use crate::store::CachedEvaluation;

/// One host's result as it arrives.
pub(crate) struct EvaluatedHost {
    pub name: String,
    /// Its entry of the evaluation (toplevel, drvPath, deployment).
    pub value: serde_json::Value,
    pub cached: bool,
}

/// What the evaluation tells its consumer, in this order: the names, then
/// hosts as they come. (Hosts that could not be evaluated are in the
/// report at the end.)
pub(crate) enum EvalUpdate {
    /// Every host of the flake, before any is evaluated.
    Names(Vec<String>),
    /// Hosts done: the cached ones, or one shard's.
    Hosts(Vec<EvaluatedHost>),
}

/// What the evaluation found out besides the hosts.
pub(crate) struct EvalOutcome {
    pub report: EvaluationReport,
    /// The flake's locked revision, when it has one (for the history).
    pub revision: Option<String>,
    /// A reference to exactly the content that was evaluated (see
    /// `FlakeIdentity::pinned_ref`), when the flake's identity is known.
    pub pinned: Option<String>,
}

/// A batch of hosts for one `nix eval`.
struct Shard {
    hosts: Vec<String>,
    /// Catch each host's `throw` (only worth it with more than one host: a
    /// single host's own error is the process's).
    catch: bool,
    /// Planned, not a retry: its memory is representative.
    regular: bool,
}

impl Shard {
    fn new(hosts: Vec<String>, regular: bool) -> Self {
        Shard {
            catch: hosts.len() > 1,
            hosts,
            regular,
        }
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
    let waiting: Vec<String> = queue
        .iter()
        .filter(|s| s.regular)
        .flat_map(|s| s.hosts.iter().cloned())
        .collect();
    let bigger = eval::hosts_per_shard(waiting.len(), workers, available_mib, budget);
    if waiting.is_empty() || bigger <= size {
        return None;
    }
    queue.retain(|s| !s.regular);
    queue.extend(
        eval::split_into_shards(&waiting, bigger)
            .into_iter()
            .map(|hosts| Shard::new(hosts, true)),
    );
    Some(bigger)
}

/// Memory the kernel says can be had without swapping, in MiB.
pub(crate) fn available_memory_mib() -> u64 {
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

/// Evaluate every host of the flake, sending [`EvalUpdate`]s as they
/// come. Stops early, without error, when `updates` is closed.
pub(crate) async fn evaluate(
    cx: FleetContext<'_>,
    updates: mpsc::UnboundedSender<EvalUpdate>,
) -> Result<EvalOutcome, EngineError> {
    let started = Instant::now();
    let flake = &cx.config.flake;
    let nix = &cx.config.nix;
    Nix::check_flake(flake).map_err(EngineError::Eval)?;
    let (metadata, version) = tokio::join!(nix.flake_metadata(flake), nix.version());
    let version = version.map_err(EngineError::Eval)?;
    let revision = metadata
        .as_ref()
        .ok()
        .and_then(|m| eval::metadata_revision(m));
    let identity = flake_identity(&metadata);
    let read_cache = cx.config.eval_cache && identity.is_ok();
    let cache_note = match (&identity, cx.config.eval_cache) {
        (Err(why), _) => format!("unavailable: {why}"),
        (Ok(_), false) => "bypassed".to_string(),
        (Ok(_), true) => "used".to_string(),
    };
    let identity = identity.ok();
    let eval_ref = identity
        .as_ref()
        .map_or_else(|| flake.clone(), |i| i.pinned_ref.clone());

    // The names.
    let names_key = identity.as_ref().map(|i| eval::names_key(i, &version));
    let mut names = None;
    if let (true, Some(key)) = (read_cache, &names_key) {
        let found = cx
            .store
            .cached_evaluations(std::slice::from_ref(key))
            .await?;
        names = found.get(key).and_then(|v| eval::parse_names(v).ok());
    }
    let names = match names {
        Some(names) => names,
        None => {
            let names = nix.host_names(&eval_ref).await.map_err(EngineError::Eval)?;
            if let Some(key) = &names_key {
                cx.store
                    .cache_evaluations(
                        flake,
                        &[CachedEvaluation {
                            key: key.clone(),
                            host: None,
                            value: serde_json::to_string(&names).unwrap_or_default(),
                        }],
                    )
                    .await?;
            }
            names
        }
    };
    if names.is_empty() {
        return Err(InventoryError::Empty.into());
    }
    if let Some(bad) = names.iter().find(|n| !shell::is_valid_host_name(n)) {
        return Err(InventoryError::BadHost {
            host: bad.clone(),
            message: "not a valid host name (letters, digits, `-`, `_`, `.`)".into(),
        }
        .into());
    }
    if updates.send(EvalUpdate::Names(names.clone())).is_err() {
        return Ok(EvalOutcome {
            report: EvaluationReport::default(),
            revision,
            pinned: None,
        });
    }

    // What the cache knows.
    let keys: Vec<String> = match &identity {
        Some(identity) => names
            .iter()
            .map(|n| eval::host_key(identity, &version, n))
            .collect(),
        None => Vec::new(),
    };
    let mut misses = names.clone();
    let mut cached = 0;
    if read_cache {
        let found = cx.store.cached_evaluations(&keys).await?;
        let mut hits = Vec::new();
        misses.clear();
        for (name, key) in names.iter().zip(&keys) {
            match found.get(key).and_then(|v| serde_json::from_str(v).ok()) {
                Some(value) => hits.push(EvaluatedHost {
                    name: name.clone(),
                    value,
                    cached: true,
                }),
                None => misses.push(name.clone()),
            }
        }
        cached = hits.len();
        if !hits.is_empty() && updates.send(EvalUpdate::Hosts(hits)).is_err() {
            return Ok(EvalOutcome {
                report: EvaluationReport::default(),
                revision,
                pinned: None,
            });
        }
    }

    // The rest, in shards.
    let measured = cx.store.eval_host_memory(flake).await?;
    let (host_budget_mib, budget_source) = match measured {
        Some(kib) => (eval::host_budget_from_peak(kib, 1), "measured"),
        None => (eval::DEFAULT_HOST_MEMORY_MIB, "default"),
    };
    let available = available_memory_mib();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = cx
        .config
        .eval_workers
        .unwrap_or_else(|| eval::default_workers(cores, available, host_budget_mib))
        .max(1);
    let per_shard = eval::hosts_per_shard(misses.len(), workers, available, host_budget_mib);
    let worker_share = eval::worker_share_mib(available, workers);
    let gate = cx
        .config
        .eval_gate
        .get_or_init(|| Arc::new(Semaphore::new(workers)))
        .clone();
    let mut queue: VecDeque<Shard> = eval::split_into_shards(&misses, per_shard)
        .into_iter()
        .map(|hosts| Shard::new(hosts, true))
        .collect();
    let key_of = |name: &str| {
        identity
            .as_ref()
            .map(|identity| eval::host_key(identity, &version, name))
    };

    let mut report = EvaluationReport {
        hosts: names.len(),
        cached,
        evaluated: misses.len(),
        workers,
        hosts_per_shard: if misses.is_empty() { 0 } else { per_shard },
        host_budget_mib,
        host_budget_source: budget_source.to_string(),
        cache: cache_note,
        ..EvaluationReport::default()
    };
    let mut running: JoinSet<(Shard, Result<Output, ExecError>)> = JoinSet::new();
    let mut regular_host_kib: Option<u64> = None;
    loop {
        while running.len() < workers
            && let Some(shard) = queue.pop_front()
        {
            report.shards += 1;
            let heap = eval::gc_initial_heap_bytes(shard.hosts.len(), measured, worker_share);
            if let Some(bytes) = heap {
                let mib = bytes / 1024 / 1024;
                report.gc_initial_heap_mib = Some(report.gc_initial_heap_mib.unwrap_or(0).max(mib));
            }
            let nix = nix.clone();
            let eval_ref = eval_ref.clone();
            let gate = gate.clone();
            running.spawn(async move {
                // Closed never: the gate lives as long as the config.
                let _slot = gate.acquire_owned().await;
                let result = nix
                    .eval_hosts(&eval_ref, &shard.hosts, shard.catch, heap)
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
                    if shard.regular {
                        let per_host = kib / shard.hosts.len() as u64;
                        let first = regular_host_kib.is_none();
                        regular_host_kib = Some(regular_host_kib.unwrap_or(0).max(per_host));
                        // Nothing was known when the shards were cut (the
                        // cautious default budget makes them small): cut
                        // what has not started by what this one needed.
                        if first && measured.is_none() {
                            let budget = eval::host_budget_from_peak(per_host, 1);
                            if let Some(size) =
                                reshard(&mut queue, per_shard, workers, available, budget)
                            {
                                report.hosts_per_shard = size;
                                report.host_budget_mib = budget;
                                report.host_budget_source = "measured by the first shard".into();
                            }
                        }
                    }
                }
                match eval::parse_shard_output(&output.stdout, &shard.hosts) {
                    Ok(parsed) => {
                        // Their own errors come back sooner from the front.
                        for host in parsed.caught.into_iter().rev() {
                            queue.push_front(Shard::new(vec![host], false));
                        }
                        for host in parsed.missing {
                            failed.push(EvalFailure {
                                error: format!(
                                    "`{host}` was not in the output of `nix eval` (did the flake change?)"
                                ),
                                host,
                            });
                        }
                        let entries: Vec<CachedEvaluation> = parsed
                            .hosts
                            .iter()
                            .filter_map(|(name, value)| {
                                Some(CachedEvaluation {
                                    key: key_of(name)?,
                                    host: Some(name.clone()),
                                    value: value.to_string(),
                                })
                            })
                            .collect();
                        cx.store.cache_evaluations(flake, &entries).await?;
                        let hosts: Vec<EvaluatedHost> = parsed
                            .hosts
                            .into_iter()
                            .map(|(name, value)| EvaluatedHost {
                                name,
                                value,
                                cached: false,
                            })
                            .collect();
                        if !hosts.is_empty() && updates.send(EvalUpdate::Hosts(hosts)).is_err() {
                            break;
                        }
                    }
                    Err(reason) => {
                        for host in &shard.hosts {
                            failed.push(EvalFailure {
                                host: host.clone(),
                                error: format!("unexpected output of `nix eval`: {reason}"),
                            });
                        }
                    }
                }
            }
            Err(error @ ExecError::Timeout { .. }) => {
                let together = shard.hosts.join(", ");
                for host in &shard.hosts {
                    failed.push(EvalFailure {
                        host: host.clone(),
                        error: format!(
                            "evaluating {together} timed out after {}s",
                            cx.config.nix.eval_timeout.as_secs()
                        ),
                    });
                }
                tracing::warn!(cause = %error, "evaluation shard timed out");
            }
            Err(error) if shard.hosts.len() > 1 => {
                // An error tryEval cannot catch (or the process died):
                // find whose, without losing the others' results.
                tracing::debug!(hosts = ?shard.hosts, cause = %error, "shard failed; splitting it");
                let mut first = shard.hosts;
                let second = first.split_off(first.len() / 2);
                queue.push_front(Shard::new(second, false));
                queue.push_front(Shard::new(first, false));
            }
            Err(error) => failed.push(EvalFailure {
                host: shard.hosts[0].clone(),
                error: nix_error(&error),
            }),
        }
        report.failed.extend(failed);
    }
    drop(running);
    if let Some(kib) = regular_host_kib {
        cx.store.record_eval_host_memory(flake, kib).await?;
    }
    report.failed.sort_by(|a, b| a.host.cmp(&b.host));
    report.seconds = started.elapsed().as_secs_f64();
    Ok(EvalOutcome {
        report,
        revision,
        pinned: identity.map(|i| i.pinned_ref),
    })
}

/// The flake's locked identity from `nix flake metadata`'s output, or
/// why it is not known.
pub(crate) fn flake_identity(
    metadata: &Result<String, crate::nix::NixError>,
) -> Result<FlakeIdentity, String> {
    match metadata {
        Ok(json) => {
            let lock_file =
                eval::lock_file_path(json).and_then(|path| std::fs::read_to_string(path).ok());
            FlakeIdentity::from_metadata(json, lock_file.as_deref())
        }
        Err(e) => Err(format!("{e}")
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()),
    }
}

/// Evaluate the whole fleet without streaming: the hosts that evaluated,
/// and the report (with the ones that did not).
pub(crate) async fn evaluate_fleet(
    cx: FleetContext<'_>,
) -> Result<(Inventory, EvaluationReport), EngineError> {
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let collect = async {
        let mut hosts: Vec<Host> = Vec::new();
        let mut error = None;
        while let Some(update) = receiver.recv().await {
            if let EvalUpdate::Hosts(batch) = update {
                for evaluated in batch {
                    match Inventory::parse_host(&evaluated.name, evaluated.value) {
                        Ok(host) => hosts.push(host),
                        Err(e) => {
                            error.get_or_insert(e);
                        }
                    }
                }
            }
        }
        (hosts, error)
    };
    let (outcome, (hosts, error)) = tokio::join!(evaluate(cx, sender), collect);
    let outcome = outcome?;
    if let Some(error) = error {
        return Err(error.into());
    }
    Ok((Inventory::from_hosts(hosts), outcome.report))
}

/// The hosts a selection picks, evaluated, for runs that act on each of
/// them (`exec`, `upload-keys`). A picked host that could not be
/// evaluated is an error naming it, and so is any failure when the
/// selection uses tags (that host might carry one).
pub(crate) async fn selected_hosts(
    cx: FleetContext<'_>,
    selection: &Selection,
) -> Result<Vec<Host>, EngineError> {
    let (inventory, report) = evaluate_fleet(cx).await?;
    let hosts = pick_hosts(&inventory, &report.failed, selection)?;
    cx.config.check_limit(&hosts)?;
    Ok(hosts)
}

/// The hosts `selection` picks from `inventory`, when `failed` (hosts that
/// could not be evaluated) cannot be among them: a picked host that failed
/// is an error naming it, and so is any failure when the selection uses
/// tags (that host might carry one).
pub(crate) fn pick_hosts(
    inventory: &Inventory,
    failed: &[EvalFailure],
    selection: &Selection,
) -> Result<Vec<Host>, EngineError> {
    let names: std::collections::BTreeSet<String> = failed.iter().map(|f| f.host.clone()).collect();
    let refuse = |hosts: &[String]| {
        EngineError::EvalFailed(
            failed
                .iter()
                .filter(|f| hosts.is_empty() || hosts.contains(&f.host))
                .cloned()
                .collect(),
        )
    };
    if !names.is_empty() && select::uses_tags(selection) {
        return Err(refuse(&[]));
    }
    let (picked, unevaluated) = select::resolve_partial(inventory, &names, selection)?;
    if !unevaluated.is_empty() {
        return Err(refuse(&unevaluated));
    }
    Ok(picked
        .iter()
        .filter_map(|n| inventory.get(n).cloned())
        .collect())
}

/// One host of the fleet, evaluated (the rest of the fleet may fail).
pub(crate) async fn evaluated_host(cx: FleetContext<'_>, name: &str) -> Result<Host, EngineError> {
    let (inventory, report) = evaluate_fleet(cx).await?;
    if let Some(failure) = report.failed.iter().find(|f| f.host == name) {
        return Err(EngineError::EvalFailed(vec![failure.clone()]));
    }
    let host = find_host(&inventory, name)?;
    cx.config.check_limit([&host])?;
    Ok(host)
}

/// One host of the fleet by name, or an error listing the fleet.
pub(crate) fn find_host(inventory: &Inventory, name: &str) -> Result<Host, EngineError> {
    inventory.get(name).cloned().ok_or_else(|| {
        InventoryError::UnknownHost {
            name: name.to_string(),
            known: inventory
                .hosts()
                .map(|h| h.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_not_started_are_recut_by_the_measured_budget_never_smaller() {
        let hosts: Vec<String> = (0..40).map(|i| format!("h{i}")).collect();
        let mut queue: VecDeque<Shard> = eval::split_into_shards(&hosts, 8)
            .into_iter()
            .map(|h| Shard::new(h, true))
            .collect();
        queue.push_front(Shard::new(vec!["retried".into()], false));
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
