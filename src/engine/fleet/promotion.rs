//! Promotion between environments, many hosts at once: the fleet's
//! deployment metadata read without evaluating any system, source and
//! target hosts paired by `deployment.promotionKey` (the core's `promote`
//! decides), every source host that would be copied from checked (reachable,
//! running what its last successful deployment put there, healthy now), and
//! the targets prepared to receive exactly those systems: each is fetched
//! from its source host by the host's pipeline (`fetch` instead of `build`),
//! then copied to the target as any deployment's closure is.
//!
//! Like [`super::prepare`], everything here happens before anything is
//! recorded or changed: a refusal changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use nix_deploy_core::fleet::{Host, HostMeta, System, Target};
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::plan::{DependencyGraph, GraphHost};
use nix_deploy_core::promote::{self, PromoteRequest, PromotedPair, Promotion, SourceFindings};
use nix_deploy_core::run::Pinned;

use super::FleetContext;
use super::evaluate::{self, Evaluation, Systems, pick_hosts};
use super::prepare::Prepared;
use crate::engine::EngineError;
use crate::engine::host::health;
use crate::engine::host::observe::{Settle, probe_host};

/// A promotion's sources, as its execution needs them.
pub(crate) struct Sources {
    /// What is recorded with the deployment (in its pin).
    pub record: Promotion,
    /// Each target's source host, by the target's name.
    pub hosts: BTreeMap<String, HostMeta>,
}

impl Sources {
    /// Where each target's system is fetched from.
    pub fn fetch_from(&self) -> BTreeMap<String, Target> {
        self.hosts
            .iter()
            .map(|(target, source)| (target.clone(), source.target.clone()))
            .collect()
    }
}

/// Every host's metadata, read as the fleet's evaluation reads it (in
/// shards, cached, any fleet source) with no system evaluated.
async fn read_metadata(cx: FleetContext<'_>) -> Result<Evaluation, EngineError> {
    evaluate::evaluate_fleet(cx, Systems::None).await
}

/// A host as a promotion knows it: its metadata and `toplevel`, a system
/// evaluated nowhere (there is no derivation: it is fetched, never built).
fn with_system(meta: HostMeta, toplevel: &str) -> Host {
    Host {
        meta,
        system: System {
            toplevel: toplevel.to_string(),
            drv_path: String::new(),
            built_path: None,
        },
    }
}

/// The request, validated and its sources vouched for: the target hosts,
/// each with its source's running system. Nothing is recorded or changed;
/// every reason to refuse is given at once.
pub(crate) async fn prepare(
    cx: FleetContext<'_>,
    request: &PromoteRequest,
    options: &DeployOptions,
) -> Result<Prepared, EngineError> {
    options.check()?;
    let metadata = read_metadata(cx).await?;
    let sources = pick_hosts(&metadata, &request.from_selection())?;
    let targets = pick_hosts(&metadata, &request.to_selection())?;
    // Only the targets are changed; the sources are read.
    cx.config.check_limit(&targets)?;
    let pairs = promote::pair(&sources, &targets)
        .map_err(|e| EngineError::PromotionRefused(e.problems.join("; ")))?;
    let mut used: Vec<HostMeta> = sources
        .iter()
        .filter(|s| pairs.iter().any(|p| p.source == s.name))
        .cloned()
        .collect();
    used.sort_by(|a, b| a.name.cmp(&b.name));
    let vouched = vouch_for(cx, used.clone()).await?;
    let mut problems = Vec::new();
    let mut systems = BTreeMap::new();
    for (name, verdict) in vouched {
        match verdict {
            Ok(found) => {
                systems.insert(name, found);
            }
            Err(why) => problems.push(why),
        }
    }
    if !problems.is_empty() {
        return Err(EngineError::PromotionRefused(problems.join("; ")));
    }
    let mut record = Promotion {
        from: request.from.clone(),
        to: request.to.clone(),
        pairs: Vec::new(),
    };
    let mut by_target = BTreeMap::new();
    for pair in pairs {
        let (system, source_deployment) = systems
            .get(&pair.source)
            .cloned()
            .ok_or_else(|| EngineError::Internal(format!("{} was not vouched for", pair.source)))?;
        if let Some(source) = used.iter().find(|s| s.name == pair.source) {
            by_target.insert(pair.target.clone(), source.clone());
        }
        record.pairs.push(PromotedPair {
            target: pair.target,
            source: pair.source,
            key: pair.key,
            system,
            source_deployment,
        });
    }
    let targets = targets
        .into_iter()
        .filter_map(|meta| {
            let system = record.source_of(&meta.name)?.system.clone();
            Some(with_system(meta, &system))
        })
        .collect();
    prepared(
        metadata,
        targets,
        options,
        Sources {
            record,
            hosts: by_target,
        },
    )
}

/// Resuming a promotion: the hosts not yet done get exactly the systems it
/// pinned, fetched from the same source hosts (read again from the flake's
/// metadata, for how to reach them); nothing is vouched for again.
pub(crate) async fn prepare_resume(
    cx: FleetContext<'_>,
    pinned: &Pinned,
    remaining: &[String],
    options: &DeployOptions,
) -> Result<Prepared, EngineError> {
    let record = pinned
        .promotion
        .clone()
        .ok_or_else(|| EngineError::Internal("not a promotion".into()))?;
    let metadata = read_metadata(cx).await?;
    let mut targets = Vec::new();
    let mut by_target = BTreeMap::new();
    for name in remaining {
        let pair = record.source_of(name).ok_or_else(|| {
            EngineError::BadOption(format!("{name} is not a target of this promotion"))
        })?;
        let find = |host: &str| {
            metadata.inventory.get(host).cloned().ok_or_else(|| {
                EngineError::BadOption(format!(
                    "{host} is not in the flake's metadata any more: the promotion cannot go on"
                ))
            })
        };
        let target = find(name)?;
        cx.config.check_limit([&target])?;
        targets.push(with_system(target, &pair.system));
        by_target.insert(name.clone(), find(&pair.source)?);
    }
    prepared(
        metadata,
        targets,
        options,
        Sources {
            record,
            hosts: by_target,
        },
    )
}

/// The targets as every later stage takes them.
fn prepared(
    metadata: Evaluation,
    targets: Vec<Host>,
    options: &DeployOptions,
    sources: Sources,
) -> Result<Prepared, EngineError> {
    let names: Vec<&str> = targets.iter().map(|h| h.name.as_str()).collect();
    for canary in &options.canaries {
        if !names.contains(&canary.as_str()) {
            return Err(EngineError::BadOption(format!(
                "--canary {canary} is not one of the target hosts ({})",
                names.join(", ")
            )));
        }
    }
    let graph_hosts: Vec<GraphHost> = metadata
        .inventory
        .hosts()
        .map(|h| GraphHost {
            name: h.name.clone(),
            tags: h.tags.clone(),
            dependencies: h.dependencies.clone(),
        })
        .chain(metadata.report.failed.iter().map(|f| GraphHost {
            name: f.host.clone(),
            tags: Vec::new(),
            dependencies: Vec::new(),
        }))
        .collect();
    let graph = DependencyGraph::build(&graph_hosts)?;
    Ok(Prepared {
        evaluation: metadata.report,
        inventory: metadata.inventory,
        graph,
        hosts: targets,
        eval_cached: Default::default(),
        revision: metadata.revision,
        pinned_flake: metadata.pinned,
        early: None,
        before: BTreeMap::new(),
        promotion: Some(sources),
        index: metadata.index,
        local_only: Vec::new(),
    })
}

/// Ask each source host, in parallel (bounded), whether it vouches for
/// what it runs: by name, its system and the deployment that put it
/// there, or why not.
async fn vouch_for(
    cx: FleetContext<'_>,
    sources: Vec<HostMeta>,
) -> Result<BTreeMap<String, Result<(String, Option<i64>), String>>, EngineError> {
    let semaphore = Arc::new(Semaphore::new(cx.config.probe_limit.max(1)));
    let mut tasks = JoinSet::new();
    for host in sources {
        let semaphore = semaphore.clone();
        let ssh = cx.config.ssh.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let checks = host.health_checks.clone();
            let (assessment, connection) =
                probe_host(with_system(host, ""), &ssh, Settle::No).await;
            let mut found = SourceFindings {
                unreachable: assessment.error.clone(),
                running: assessment.current.path.clone(),
                ..SourceFindings::default()
            };
            if let Some(connection) = connection {
                // One round, as pre-flight asks: healthy right now?
                if let Err((message, _)) =
                    health::validate(&connection, &checks, Duration::ZERO).await
                {
                    found.unhealthy = Some(message);
                }
                connection.close().await;
            }
            (assessment.host.meta.name, found)
        });
    }
    let mut found = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        found.push(joined.map_err(|e| EngineError::Internal(format!("probe task failed: {e}")))?);
    }
    let mut verdicts = BTreeMap::new();
    for (name, mut findings) in found {
        let last = cx.store.last_deployed_system(&name).await?;
        findings.last_deployed = last.clone();
        let verdict =
            promote::vouch(&name, &findings).map(|system| (system, last.map(|(id, _)| id)));
        verdicts.insert(name, verdict);
    }
    Ok(verdicts)
}
