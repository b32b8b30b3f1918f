//! Before anything is recorded or touched: the request is checked (options,
//! evaluation, selection, dependency graph, canaries). The hosts are then
//! leased ([`super::leases`]).
//!
//! The fleet is evaluated in shards ([`super::evaluate`]); a host is handed
//! on as soon as its shard ends. What may happen to it before the whole fleet
//! is evaluated and validated is only what changes nothing: it is *probed*
//! (one read-only SSH round trip), if the selection can already tell it is
//! wanted from the host's own metadata (its name, its tags). Deploying
//! waits: the selection (tags), the dependency graph (unknown targets,
//! cycles) and the plan need every host's `deployment`. Probe results are
//! recorded only after validation, and a host that another run may have
//! changed meanwhile is probed again (see `probe::EarlyProbes`).

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::mpsc;

use nix_deploy_core::eval::EvaluationReport;
use nix_deploy_core::fleet::{Host, Inventory, InventoryError, Selection};
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::plan::{DependencyGraph, GraphHost, PlanError};
use nix_deploy_core::remote::Before;
use nix_deploy_core::run::Pinned;
use nix_deploy_core::select;

use super::FleetContext;
use super::evaluate::{self, EvalOutcome, EvalUpdate};
use super::probe::EarlyProbes;
use crate::engine::EngineError;
use crate::engine::host::recorder::Recorder;

/// What a caller of [`prepare`] needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Purpose {
    /// Probe selected hosts as soon as they are evaluated, while the rest
    /// of the fleet still evaluates.
    pub probe_early: bool,
    /// Go on without the hosts Nix could not evaluate (they are reported),
    /// instead of refusing the request.
    pub tolerate_eval_failures: bool,
}

impl Purpose {
    /// `plan`: changes nothing, so it reports what could not be evaluated
    /// and plans the rest.
    pub const PLAN: Purpose = Purpose {
        probe_early: true,
        tolerate_eval_failures: true,
    };
    /// `deploy`: refuses when a host it would deploy, or one they depend on
    /// (or any, when selecting by tag or everything), could not be evaluated.
    pub const DEPLOY: Purpose = Purpose {
        probe_early: true,
        tolerate_eval_failures: false,
    };
    /// `resume`: the hosts are probed only after their watchdogs settled.
    pub const RESUME: Purpose = Purpose {
        probe_early: false,
        tolerate_eval_failures: false,
    };
}

/// The request, validated: what every later stage works from.
pub(crate) struct Prepared {
    pub inventory: Inventory,
    pub graph: DependencyGraph,
    pub hosts: Vec<Host>,
    /// How the fleet was evaluated, with the hosts that could not be.
    pub evaluation: EvaluationReport,
    /// Hosts whose evaluation came from the cache.
    pub eval_cached: BTreeSet<String>,
    /// The flake's locked revision, when it has one.
    pub revision: Option<String>,
    /// A reference to exactly the content evaluated, when known: what
    /// `resume` and every takeover evaluate again.
    pub pinned_flake: Option<String>,
    /// Probes started during the evaluation.
    pub early: Option<EarlyProbes>,
    /// Hosts whose way back is not what they run now (a resumed deployment
    /// had touched them): what they ran and booted before.
    pub before: BTreeMap<String, Before>,
    /// A promotion: where each host's system comes from (it is fetched
    /// from there, never built).
    pub promotion: Option<super::promotion::Sources>,
}

impl Prepared {
    pub fn host_names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// What this deployment deploys, pinned: stored with it before
    /// anything is touched, so `resume` deploys exactly that.
    pub fn pinned(&self) -> Pinned {
        Pinned {
            flake: self.pinned_flake.clone(),
            revision: self.revision.clone(),
            hosts: self
                .hosts
                .iter()
                .map(|h| (h.name.clone(), h.toplevel.clone()))
                .collect(),
            tags: self
                .hosts
                .iter()
                .map(|h| (h.name.clone(), h.tags.clone()))
                .collect(),
            promotion: self.promotion.as_ref().map(|p| p.record.clone()),
        }
    }

    /// Give up: close what the early probes opened.
    pub async fn discard(self) {
        if let Some(early) = self.early {
            early.discard().await;
        }
    }

    /// Say in the deployment's events how the fleet was evaluated.
    pub async fn log_evaluation(&self, recorder: &Recorder) -> Result<(), EngineError> {
        if let Some(promotion) = &self.promotion {
            let record = &promotion.record;
            recorder
                .log(
                    None,
                    format!(
                        "promoting what {} runs to {}: {} (no system evaluated or built; each is fetched from its source host)",
                        record.from.join(", "),
                        record.to.join(", "),
                        record.describe()
                    ),
                )
                .await?;
            for pair in &record.pairs {
                recorder
                    .log(
                        Some(&pair.target),
                        format!(
                            "gets {} from {} (promotionKey `{}`; put there by deployment #{})",
                            pair.system,
                            pair.source,
                            pair.key,
                            pair.source_deployment
                                .map_or_else(|| "?".to_string(), |d| d.to_string())
                        ),
                    )
                    .await?;
            }
            return Ok(());
        }
        recorder
            .log(None, format!("evaluated {}", self.evaluation.describe()))
            .await?;
        for failure in &self.evaluation.failed {
            recorder
                .log(
                    Some(&failure.host),
                    format!(
                        "warning: could not be evaluated (not deployed, and nothing deployed depends on it): {}",
                        failure.error
                    ),
                )
                .await?;
        }
        Ok(())
    }
}

/// Everything that can be wrong with a request, found before anything is
/// recorded or touched: the options, the flake, the selection, the
/// dependency graph and the canaries.
pub(crate) async fn prepare(
    cx: FleetContext<'_>,
    selection: &Selection,
    options: &DeployOptions,
    purpose: Purpose,
) -> Result<Prepared, EngineError> {
    options.check()?;
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let mut early = purpose
        .probe_early
        .then(|| EarlyProbes::new(cx.config.probe_limit, cx.config.ssh.clone()));
    let consume = async {
        let mut hosts = BTreeMap::new();
        let mut cached = BTreeSet::new();
        while let Some(update) = receiver.recv().await {
            match update {
                EvalUpdate::Names(names) => {
                    // A misspelt host is known before anything is evaluated.
                    select::check_names(selection, &names)?;
                }
                EvalUpdate::Hosts(batch) => {
                    for evaluated in batch {
                        let host = Inventory::parse_host(&evaluated.name, evaluated.value)?;
                        if evaluated.cached {
                            cached.insert(host.name.clone());
                        }
                        if let Some(early) = early.as_mut()
                            && select::may_select(selection, &host)
                        {
                            early.spawn(host.clone());
                        }
                        hosts.insert(host.name.clone(), host);
                    }
                }
            }
        }
        Ok((hosts, cached))
    };
    let (outcome, consumed) = tokio::join!(evaluate::evaluate(cx, sender), consume);
    let validated = match (consumed, outcome) {
        (Err(e), _) | (_, Err(e)) => Err(e),
        (Ok((hosts, cached)), Ok(outcome)) => validate(
            selection,
            options,
            purpose,
            hosts.into_values().collect(),
            cached,
            outcome,
        ),
    };
    // A caller limited to some hosts (a token's reach) is refused others.
    let validated = validated.and_then(|prepared| {
        cx.config.check_limit(&prepared.hosts)?;
        Ok(prepared)
    });
    match validated {
        Ok(mut prepared) => {
            prepared.early = early;
            Ok(prepared)
        }
        Err(e) => {
            if let Some(early) = early {
                early.discard().await;
            }
            Err(e)
        }
    }
}

/// The evaluated fleet against the request.
fn validate(
    selection: &Selection,
    options: &DeployOptions,
    purpose: Purpose,
    hosts: Vec<Host>,
    eval_cached: BTreeSet<String>,
    outcome: EvalOutcome,
) -> Result<Prepared, EngineError> {
    let evaluation = outcome.report;
    let failed = evaluation.failed_hosts();
    let refuse = || EngineError::EvalFailed(evaluation.failed.clone());
    let inventory = Inventory::from_hosts(hosts);
    // Hosts that failed are in the graph (others may name them), without
    // edges of their own: nobody knows them.
    let mut graph_hosts: Vec<GraphHost> = inventory
        .hosts()
        .map(|h| GraphHost {
            name: h.name.clone(),
            tags: h.tags.clone(),
            dependencies: h.dependencies.clone(),
        })
        .collect();
    graph_hosts.extend(failed.iter().map(|name| GraphHost {
        name: name.clone(),
        tags: Vec::new(),
        dependencies: Vec::new(),
    }));
    let graph = DependencyGraph::build(&graph_hosts).map_err(|e| match e {
        // The tag may be one of a host that could not be evaluated.
        PlanError::UnknownTag { .. } if !failed.is_empty() => refuse(),
        e => e.into(),
    })?;
    let uses_tags = select::uses_tags(selection);
    let (names, failed_selected) = select::resolve_partial(&inventory, &failed, selection)
        .map_err(|e| match e {
            // The tag may be one of a host that could not be evaluated.
            InventoryError::UnknownTag { .. } | InventoryError::NoMatch { .. }
                if !failed.is_empty() && uses_tags =>
            {
                refuse()
            }
            e => e.into(),
        })?;
    if !failed.is_empty() && !purpose.tolerate_eval_failures {
        let needed = dependency_closure(&graph, &names);
        if selection.is_everything()
            || uses_tags
            || !failed_selected.is_empty()
            || needed.iter().any(|h| failed.contains(h))
        {
            return Err(refuse());
        }
    }
    for canary in &options.canaries {
        if !names.contains(canary) {
            return Err(EngineError::BadOption(format!(
                "--canary {canary} is not one of the selected hosts ({})",
                names.join(", ")
            )));
        }
    }
    let hosts = names
        .iter()
        .filter_map(|n| inventory.get(n).cloned())
        .collect();
    Ok(Prepared {
        inventory,
        graph,
        hosts,
        evaluation,
        eval_cached,
        revision: outcome.revision,
        pinned_flake: outcome.pinned,
        early: None,
        before: BTreeMap::new(),
        promotion: None,
    })
}

/// `hosts` and everything they depend on, transitively.
fn dependency_closure(graph: &DependencyGraph, hosts: &[String]) -> BTreeSet<String> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut stack: Vec<String> = hosts.to_vec();
    while let Some(host) = stack.pop() {
        if seen.insert(host.clone())
            && let Some(deps) = graph.depends_on.get(&host)
        {
            stack.extend(deps.iter().cloned());
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dependency_closure_follows_edges() {
        let graph = DependencyGraph::build(&[
            GraphHost {
                name: "a".into(),
                tags: vec![],
                dependencies: vec!["b".into()],
            },
            GraphHost {
                name: "b".into(),
                tags: vec![],
                dependencies: vec!["c".into()],
            },
            GraphHost {
                name: "c".into(),
                tags: vec![],
                dependencies: vec![],
            },
            GraphHost {
                name: "d".into(),
                tags: vec![],
                dependencies: vec![],
            },
        ])
        .unwrap();
        let closure = dependency_closure(&graph, &["a".to_string()]);
        assert_eq!(closure.into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
    }
}
