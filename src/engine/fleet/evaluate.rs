//! Evaluating the fleet: sharded over several `nix eval` processes at once,
//! bounded in memory, streamed host by host to whoever waits for them, and
//! skipped when the evaluation cache already holds the result.
//!
//! 1. `nix flake metadata` and `nix --version` (at once): the flake's locked
//!    identity, and a reference pinned to exactly that content
//!    ([`FlakeIdentity`]). Every later `nix eval` reads that reference, so
//!    what it computes is what the cache key names.
//! 2. The fleet's index (from the cache, or one cheap `nix eval`): its
//!    source (`nixosConfigurations`, a colmena hive, deploy-rs nodes;
//!    `--source` or detected), the host names, colmena's `meta`.
//! 3. Which hosts' systems are wanted: those the selection picks. Every
//!    host's metadata is read (it is cheap, and the selection's tags and the
//!    dependency graph need it), but only the wanted hosts' toplevels are
//!    evaluated: deploying k hosts evaluates k systems. A selection by
//!    names is resolved from the names alone (one round); one by tags needs
//!    the metadata first (a round for the metadata, then one for the
//!    systems of the hosts it picks).
//! 4. Every host whose key is in the cache is ready at once.
//! 5. The rest are split into shards ([`eval::hosts_per_shard`]) evaluated by
//!    up to `workers` processes at once (and no more than that across the
//!    evaluations running at the same time in this process: the daemon's); each shard's hosts are sent on as
//!    soon as it ends and cached. A host that throws comes back as `null` and
//!    is evaluated again alone for Nix's error; a shard that fails otherwise
//!    is split in halves and tried again, so one host's error never hides
//!    another host's result. A shard that times out fails its hosts.
//! 6. The peak memory of regular shards, per host, sizes the next run's
//!    shards (`eval_memory`), and their initial heap
//!    ([`eval::gc_initial_heap_bytes`]): a shard starts with the heap it was
//!    measured to need instead of collecting again and again on the way.
//!
//! Nothing here touches a host, nor judges a host's metadata: the consumer
//! of the updates parses each host as it arrives (a host whose metadata is
//! wrong is that host's failure alone) and decides what to do with it
//! (`prepare` starts probing it, read-only).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc};

use nix_deploy_core::eval::{self, EvalFailure, EvaluationReport, FlakeIdentity};
use nix_deploy_core::fleet::{self, Host, HostMeta, Inventory, InventoryError, Selection};
use nix_deploy_core::select;
use nix_deploy_core::shell;
use nix_deploy_core::source::{FleetIndex, FleetSource, parse_fleet};

use super::FleetContext;
use super::shards::{self, Progress, Round, available_memory_mib, has_system};
use crate::engine::EngineError;
use crate::nix::{Nix, NixError};
use crate::store::CachedEvaluation;

/// One host's result as it arrives.
pub(crate) struct EvaluatedHost {
    pub name: String,
    /// Its entry of the evaluation (`deployment`, and `toplevel`, `drvPath`
    /// when its system was read).
    pub value: serde_json::Value,
    pub cached: bool,
}

/// What the evaluation tells its consumer, in this order: the index, then
/// hosts as they come (a host may come twice: its metadata, then its
/// system). Hosts that could not be evaluated are in the report at the end.
pub(crate) enum EvalUpdate {
    /// The fleet's source and every host's name, before any is evaluated.
    Index(FleetIndex),
    /// Hosts done: the cached ones, or one shard's.
    Hosts(Vec<EvaluatedHost>),
}

/// Which hosts' systems an evaluation reads (every host's metadata is read).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Systems<'a> {
    /// None: runs that need only how to reach hosts (`exec`, `upload-keys`).
    None,
    /// The hosts this selection picks.
    Of(&'a Selection),
}

/// What the evaluation found out besides the hosts.
pub(crate) struct EvalOutcome {
    pub report: EvaluationReport,
    /// The flake's locked revision, when it has one (for the history).
    pub revision: Option<String>,
    /// A reference to exactly the content that was evaluated (see
    /// `FlakeIdentity::pinned_ref`), when the flake's identity is known.
    pub pinned: Option<String>,
    pub index: FleetIndex,
}

/// The hosts a selection by names (no tags) picks, from the names alone;
/// none when it picks nothing (the consumer says why).
fn chosen_by_names(selection: &Selection, names: &[String]) -> BTreeSet<String> {
    let everyone: BTreeSet<String> = names.iter().cloned().collect();
    select::resolve_partial(&Inventory::default(), &everyone, selection)
        .map(|(_, chosen)| chosen.into_iter().collect())
        .unwrap_or_default()
}

/// The hosts a selection picks, from the metadata read so far (hosts that
/// failed are not picked: their tags are unknown, and the consumer refuses
/// or reports them).
fn chosen_by_metadata(
    source: FleetSource,
    selection: &Selection,
    metadata: &BTreeMap<String, serde_json::Value>,
    names: &[String],
) -> BTreeSet<String> {
    let metas: Vec<HostMeta> = metadata
        .iter()
        .filter_map(|(name, value)| fleet::parse_host(source, name, value.clone()).ok())
        .map(|evaluated| evaluated.meta)
        .collect();
    let inventory = Inventory::from_hosts(metas);
    let unknown: BTreeSet<String> = names
        .iter()
        .filter(|n| inventory.get(n).is_none())
        .cloned()
        .collect();
    select::resolve_partial(&inventory, &unknown, selection)
        .map(|(chosen, _)| chosen.into_iter().collect())
        .unwrap_or_default()
}

/// Hosts as they arrive, parsed: each host's metadata error is its own
/// failure, never the others'.
#[derive(Default)]
pub(crate) struct Collected {
    pub hosts: BTreeMap<String, HostMeta>,
    pub systems: BTreeMap<String, fleet::System>,
    /// Hosts whose entry came from the cache.
    pub cached: BTreeSet<String>,
    /// Hosts whose metadata is wrong, with what is wrong (never a value).
    pub failed: Vec<EvalFailure>,
}

impl Collected {
    /// Take in one host; returns it as a [`Host`] when this entry brought
    /// its system (the first time).
    pub fn add(&mut self, source: FleetSource, evaluated: EvaluatedHost) -> Option<Host> {
        if evaluated.cached {
            self.cached.insert(evaluated.name.clone());
        }
        if self.failed.iter().any(|f| f.host == evaluated.name) {
            return None;
        }
        match fleet::parse_host(source, &evaluated.name, evaluated.value) {
            Ok(parsed) => {
                let meta = parsed.meta;
                self.hosts.insert(meta.name.clone(), meta.clone());
                let system = parsed.system?;
                if self.systems.contains_key(&meta.name) {
                    return None;
                }
                self.systems.insert(meta.name.clone(), system.clone());
                Some(Host { meta, system })
            }
            Err(error) => {
                let message = match error {
                    InventoryError::BadHost { message, .. } => message,
                    other => other.to_string(),
                };
                self.failed.push(EvalFailure {
                    host: evaluated.name,
                    error: message,
                });
                None
            }
        }
    }

    /// Metadata errors join Nix's failures in the report (sorted, one per host).
    pub fn add_failures_to(&mut self, report: &mut EvaluationReport) {
        for failure in self.failed.drain(..) {
            if !report.failed.iter().any(|f| f.host == failure.host) {
                report.failed.push(failure);
            }
        }
        report.failed.sort_by(|a, b| a.host.cmp(&b.host));
    }
}

/// A fleet evaluated without streaming ([`evaluate_fleet`]).
pub(crate) struct Evaluation {
    pub inventory: Inventory,
    pub systems: BTreeMap<String, fleet::System>,
    /// With every host that failed: Nix's failures and metadata errors.
    pub report: EvaluationReport,
    pub index: FleetIndex,
    /// The flake's locked revision, when it has one (the watch reports
    /// what it compared the hosts with).
    pub revision: Option<String>,
    /// A reference to exactly the content that was evaluated, when known.
    pub pinned: Option<String>,
}

/// Evaluate the flake's fleet: every host's metadata, and the systems of
/// the hosts `systems` wants, sending [`EvalUpdate`]s as they come.
/// Stops early, without error, when `updates` is closed.
pub(crate) async fn evaluate(
    cx: FleetContext<'_>,
    updates: mpsc::UnboundedSender<EvalUpdate>,
    systems: Systems<'_>,
) -> Result<EvalOutcome, EngineError> {
    let started = Instant::now();
    let flake = &cx.config.flake;
    let nix = &cx.config.nix;
    Nix::check_flake(flake).map_err(EngineError::Eval)?;
    let (metadata, version) = tokio::join!(nix.flake_metadata(flake), nix.version());
    // Cache keys hold the Nix version and the user's flags that can
    // change a result (`--impure`, `--nix-option`).
    let version = nix.evaluation_tag(&version.map_err(EngineError::Eval)?);
    let revision = metadata
        .as_ref()
        .ok()
        .and_then(|m| eval::metadata_revision(m));
    let identity = Nix::identity(&metadata);
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

    let index = fleet_index(cx, identity.as_ref(), &version, &eval_ref, read_cache).await?;
    if index.names.is_empty() {
        return Err(InventoryError::Empty.into());
    }
    if let Some(bad) = index.names.iter().find(|n| !shell::is_valid_host_name(n)) {
        return Err(InventoryError::BadHost {
            host: bad.clone(),
            message: "not a valid host name (letters, digits, `-`, `_`, `.`)".into(),
        }
        .into());
    }
    if updates.send(EvalUpdate::Index(index.clone())).is_err() {
        return Ok(EvalOutcome {
            report: EvaluationReport::default(),
            revision,
            pinned: None,
            index,
        });
    }

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
    let pinned = identity.as_ref().map(|i| i.pinned_ref.clone());
    let round = Round {
        flake: flake.clone(),
        eval_ref,
        source: index.source,
        identity,
        version,
        read_cache,
        measured,
        available,
        workers,
        worker_share: eval::worker_share_mib(available, workers),
        gate: cx
            .config
            .eval_gate
            .get_or_init(|| Arc::new(Semaphore::new(workers)))
            .clone(),
    };
    let mut progress = Progress {
        report: EvaluationReport {
            hosts: index.names.len(),
            workers,
            host_budget_mib,
            host_budget_source: budget_source.to_string(),
            cache: cache_note,
            ..EvaluationReport::default()
        },
        ..Progress::default()
    };
    let names = &index.names;
    match systems {
        Systems::Of(selection) if select::uses_tags(selection) => {
            let metadata = shards::round(
                cx,
                &round,
                names.iter().map(|n| (n.clone(), false)).collect(),
                &mut progress,
                &updates,
            )
            .await?;
            let wanted: Vec<(String, bool)> =
                chosen_by_metadata(index.source, selection, &metadata, names)
                    .into_iter()
                    .filter(|n| !metadata.get(n).is_some_and(has_system))
                    .map(|n| (n, true))
                    .collect();
            shards::round(cx, &round, wanted, &mut progress, &updates).await?;
        }
        systems => {
            let wanted = match systems {
                Systems::Of(selection) => chosen_by_names(selection, names),
                Systems::None => BTreeSet::new(),
            };
            let hosts = names
                .iter()
                .map(|n| (n.clone(), wanted.contains(n)))
                .collect();
            shards::round(cx, &round, hosts, &mut progress, &updates).await?;
        }
    }
    if let Some(kib) = progress.regular_host_kib {
        cx.store.record_eval_host_memory(flake, kib).await?;
    }
    let mut report = progress.report;
    report.cached = progress.cached.len();
    report.evaluated = progress.evaluated.len();
    report.systems = progress.systems.len();
    report.systems_evaluated = progress.systems_evaluated.len();
    report.source = Some(index.source);
    report.failed.sort_by(|a, b| a.host.cmp(&b.host));
    report.seconds = started.elapsed().as_secs_f64();
    Ok(EvalOutcome {
        report,
        revision,
        pinned,
        index,
    })
}

/// The fleet's index: from the cache, or one `nix eval` of the flake's outputs.
async fn fleet_index(
    cx: FleetContext<'_>,
    identity: Option<&FlakeIdentity>,
    version: &str,
    eval_ref: &str,
    read_cache: bool,
) -> Result<FleetIndex, EngineError> {
    let forced = cx.config.source;
    let parse =
        |text: &str| parse_fleet(text, forced).map_err(|e| EngineError::Eval(NixError::Fleet(e)));
    let key = identity.map(|i| eval::fleet_key(i, version));
    if let (true, Some(key)) = (read_cache, &key) {
        let found = cx
            .store
            .cached_evaluations(std::slice::from_ref(key))
            .await?;
        if let Some(text) = found.get(key) {
            return parse(text);
        }
    }
    let text = cx
        .config
        .nix
        .fleet(eval_ref, identity.is_some())
        .await
        .map_err(EngineError::Eval)?;
    if let Some(key) = key {
        cx.store
            .cache_evaluations(
                &cx.config.flake,
                &[CachedEvaluation {
                    key,
                    host: None,
                    value: text.clone(),
                }],
            )
            .await?;
    }
    parse(&text)
}

/// Evaluate without streaming: every host's metadata, the systems
/// `systems` wants, and the report (with every host that failed, Nix's
/// failures and metadata errors alike).
pub(crate) async fn evaluate_fleet(
    cx: FleetContext<'_>,
    systems: Systems<'_>,
) -> Result<Evaluation, EngineError> {
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let collect = async {
        let mut collected = Collected::default();
        let mut source = FleetSource::default();
        while let Some(update) = receiver.recv().await {
            match update {
                EvalUpdate::Index(index) => source = index.source,
                EvalUpdate::Hosts(batch) => {
                    for evaluated in batch {
                        collected.add(source, evaluated);
                    }
                }
            }
        }
        collected
    };
    let (outcome, mut collected) = tokio::join!(evaluate(cx, sender, systems), collect);
    let outcome = outcome?;
    let mut report = outcome.report;
    collected.add_failures_to(&mut report);
    Ok(Evaluation {
        inventory: Inventory::from_hosts(collected.hosts.into_values()),
        systems: collected.systems,
        report,
        index: outcome.index,
        revision: outcome.revision,
        pinned: outcome.pinned,
    })
}

/// The hosts a selection picks, with how to reach them (their systems
/// are not evaluated), for runs that act on each of them (`exec`,
/// `upload-keys`), and the fleet's source.
pub(crate) async fn selected_hosts(
    cx: FleetContext<'_>,
    selection: &Selection,
) -> Result<(Vec<HostMeta>, FleetSource), EngineError> {
    let evaluation = evaluate_fleet(cx, Systems::None).await?;
    let hosts = pick_hosts(&evaluation, selection)?;
    cx.config.check_limit(&hosts)?;
    Ok((hosts, evaluation.index.source))
}

/// The hosts `selection` picks from `evaluation`. A picked host that could
/// not be evaluated is an error naming it, and so is any failure when the
/// selection uses tags (that host might carry one).
pub(crate) fn pick_hosts(
    evaluation: &Evaluation,
    selection: &Selection,
) -> Result<Vec<HostMeta>, EngineError> {
    let report = &evaluation.report;
    let failed = report.failed_hosts();
    let refuse = |hosts: &[String]| {
        EngineError::EvalFailed(
            report
                .failed
                .iter()
                .filter(|f| hosts.is_empty() || hosts.contains(&f.host))
                .cloned()
                .collect(),
        )
    };
    if !failed.is_empty() && select::uses_tags(selection) {
        return Err(refuse(&[]));
    }
    let (names, unevaluated) = select::resolve_partial(&evaluation.inventory, &failed, selection)?;
    if !unevaluated.is_empty() {
        return Err(refuse(&unevaluated));
    }
    Ok(names
        .iter()
        .filter_map(|n| evaluation.inventory.get(n).cloned())
        .collect())
}

/// One host of the fleet with its system (only its own is evaluated;
/// the rest of the fleet may fail).
pub(crate) async fn evaluated_host(cx: FleetContext<'_>, name: &str) -> Result<Host, EngineError> {
    let selection = Selection {
        names: vec![name.to_string()],
        ..Selection::default()
    };
    let evaluation = evaluate_fleet(cx, Systems::Of(&selection)).await?;
    if let Some(failure) = evaluation.report.failed.iter().find(|f| f.host == name) {
        return Err(EngineError::EvalFailed(vec![failure.clone()]));
    }
    let meta = find_host(&evaluation.inventory, name)?;
    cx.config.check_limit([&meta])?;
    let system = evaluation.systems.get(name).cloned().ok_or_else(|| {
        EngineError::Internal(format!("the system of `{name}` was not evaluated"))
    })?;
    Ok(Host { meta, system })
}

/// One host of the fleet by name, or an error listing the fleet.
pub(crate) fn find_host(inventory: &Inventory, name: &str) -> Result<HostMeta, EngineError> {
    inventory
        .get(name)
        .cloned()
        .ok_or_else(|| select::unknown_host(inventory, name).into())
}
