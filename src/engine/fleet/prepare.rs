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
use nix_deploy_core::source::{FleetIndex, FleetSource};

use super::FleetContext;
use super::evaluate::{self, Collected, EvalOutcome, EvalUpdate, Systems};
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
    /// It changes hosts: colmena's `meta.allowApplyAll = false` wants their
    /// names.
    pub changes_hosts: bool,
    /// What becomes of selected hosts not reached over SSH
    /// (`deployment.targetHost = null`).
    pub local_only: LocalOnly,
}

/// What a run does with selected hosts whose `targetHost` is null (only
/// `apply-local` on themselves deploys them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LocalOnly {
    /// Kept: the run reaches no host (`build`).
    Kept,
    /// Left out, said in the run's events; a selection of nothing else is
    /// refused.
    LeftOut,
    /// Left out, for the caller to report (`doctor`).
    Reported,
}

impl Purpose {
    /// `plan`: changes nothing, so it reports what could not be evaluated
    /// and plans the rest.
    pub const PLAN: Purpose = Purpose {
        probe_early: true,
        tolerate_eval_failures: true,
        changes_hosts: false,
        local_only: LocalOnly::LeftOut,
    };
    /// `deploy`: refuses when a host it would deploy, or one they depend on
    /// (or any, when selecting by tag or everything), could not be evaluated.
    pub const DEPLOY: Purpose = Purpose {
        probe_early: true,
        tolerate_eval_failures: false,
        changes_hosts: true,
        local_only: LocalOnly::LeftOut,
    };
    /// `build`: no host is probed; as for `deploy`, a host to build (or any,
    /// when selecting by tag or everything) that cannot be evaluated refuses
    /// the request.
    pub const BUILD: Purpose = Purpose {
        probe_early: false,
        tolerate_eval_failures: false,
        changes_hosts: false,
        local_only: LocalOnly::Kept,
    };
    /// `doctor`: reports the hosts that cannot be evaluated and checks the
    /// rest itself.
    pub const DOCTOR: Purpose = Purpose {
        probe_early: false,
        tolerate_eval_failures: true,
        changes_hosts: false,
        local_only: LocalOnly::Reported,
    };
    /// `resume`: the hosts are probed only after their watchdogs settled
    /// (the deployment it resumes was allowed when it started).
    pub const RESUME: Purpose = Purpose {
        probe_early: false,
        tolerate_eval_failures: false,
        changes_hosts: false,
        local_only: LocalOnly::LeftOut,
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
    /// Where the fleet came from, and colmena's `meta`.
    pub index: FleetIndex,
    /// Selected hosts with `deployment.targetHost = null`: not deployed over
    /// SSH (only `apply-local` on themselves deploys them), left out.
    pub local_only: Vec<String>,
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
                .map(|h| (h.name.clone(), h.toplevel().to_string()))
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

    /// Say in the deployment's events how the fleet was evaluated, and what
    /// an operator should know about the selected hosts' metadata.
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
            .log(
                None,
                format!(
                    "evaluated {} (source: {})",
                    self.evaluation.describe(),
                    self.index.source
                ),
            )
            .await?;
        for name in &self.local_only {
            recorder
                .log(
                    Some(name),
                    "skipped: deployment.targetHost is null, so it is not deployed over SSH (only `apply-local` on that machine deploys it)".to_string(),
                )
                .await?;
        }
        for host in &self.hosts {
            for warning in &host.warnings {
                recorder
                    .log(Some(&host.name), format!("warning: {warning}"))
                    .await?;
            }
        }
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
        let mut collected = Collected::default();
        let mut source = FleetSource::default();
        while let Some(update) = receiver.recv().await {
            match update {
                EvalUpdate::Index(index) => {
                    // A misspelt host is known before anything is evaluated.
                    select::check_names(selection, &index.names)?;
                    source = index.source;
                }
                EvalUpdate::Hosts(batch) => {
                    for evaluated in batch {
                        // A host whose metadata is wrong is its own failure.
                        let Some(host) = collected.add(source, evaluated) else {
                            continue;
                        };
                        if let Some(early) = early.as_mut()
                            && host.target.destination.is_some()
                            && select::may_select(selection, &host)
                        {
                            early.spawn(host);
                        }
                    }
                }
            }
        }
        Ok::<_, EngineError>(collected)
    };
    let (outcome, consumed) = tokio::join!(
        evaluate::evaluate(cx, sender, Systems::Of(selection)),
        consume
    );
    let here = cx.config.ssh.local.as_deref();
    let validated = match (consumed, outcome) {
        (Err(e), _) | (_, Err(e)) => Err(e),
        (Ok(collected), Ok(outcome)) => {
            validate(selection, options, purpose, here, collected, outcome)
        }
    };
    // A caller limited to some hosts (a token's reach) is refused others.
    let validated = validated.and_then(|prepared| {
        cx.config
            .check_limit(prepared.hosts.iter().map(|h| &h.meta))?;
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

/// The evaluated fleet against the request. `here`: the host that is this
/// machine (`apply-local`).
fn validate(
    selection: &Selection,
    options: &DeployOptions,
    purpose: Purpose,
    here: Option<&str>,
    mut collected: Collected,
    outcome: EvalOutcome,
) -> Result<Prepared, EngineError> {
    let mut evaluation = outcome.report;
    collected.add_failures_to(&mut evaluation);
    let failed = evaluation.failed_hosts();
    let refuse = || EngineError::EvalFailed(evaluation.failed.clone());
    if purpose.changes_hosts && !outcome.index.meta.allow_apply_all && !selection.names_hosts() {
        return Err(InventoryError::ApplyAllRefused.into());
    }
    let inventory = Inventory::from_hosts(
        collected
            .hosts
            .into_values()
            .filter(|h| !failed.contains(&h.name)),
    );
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
    let (local_only, names) = leave_out_local_only(&inventory, names, here, purpose.local_only)?;
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
        .map(|n| {
            let meta = inventory.get(n).cloned().ok_or_else(|| {
                EngineError::Internal(format!("`{n}` was selected without its metadata"))
            })?;
            let system = collected.systems.get(n).cloned().ok_or_else(|| {
                EngineError::Internal(format!("the system of `{n}` was not evaluated"))
            })?;
            Ok(Host { meta, system })
        })
        .collect::<Result<Vec<Host>, EngineError>>()?;
    Ok(Prepared {
        inventory,
        graph,
        hosts,
        evaluation,
        eval_cached: collected.cached,
        revision: outcome.revision,
        pinned_flake: outcome.pinned,
        early: None,
        before: BTreeMap::new(),
        promotion: None,
        index: outcome.index,
        local_only,
    })
}

/// Split the selected `names` into the hosts not reached over SSH
/// (`deployment.targetHost = null`: left out of remote runs, as colmena
/// leaves them out of `apply`) and the rest. With `apply-local` (`here`:
/// the host that is this machine), that host must allow it.
fn leave_out_local_only(
    inventory: &Inventory,
    names: Vec<String>,
    here: Option<&str>,
    treatment: LocalOnly,
) -> Result<(Vec<String>, Vec<String>), EngineError> {
    if let Some(here) = here
        && let Some(host) = inventory.get(here)
        && !host.allow_local_deployment
    {
        return Err(EngineError::BadOption(format!(
            "{here}: deployment.allowLocalDeployment is not set, so apply-local does not deploy it"
        )));
    }
    if treatment == LocalOnly::Kept {
        return Ok((Vec::new(), names));
    }
    let (local_only, names): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| {
        Some(n.as_str()) != here
            && inventory
                .get(n)
                .is_some_and(|h| h.target.destination.is_none())
    });
    if treatment == LocalOnly::LeftOut && names.is_empty() && !local_only.is_empty() {
        return Err(EngineError::BadOption(format!(
            "{} cannot be deployed over SSH: deployment.targetHost is null (only `apply-local` on that machine deploys it)",
            local_only.join(", ")
        )));
    }
    Ok((local_only, names))
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
    fn hosts_not_reached_over_ssh_are_left_out_of_remote_runs_only() {
        let inventory = Inventory::from_eval_json(
            FleetSource::Nixos,
            r#"{ "a": { "deployment": {} },
                 "b": { "deployment": { "targetHost": null, "allowLocalDeployment": true } } }"#,
        )
        .unwrap();
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let split = |selected: &[&str], here, treatment| {
            leave_out_local_only(&inventory, names(selected), here, treatment)
        };
        assert_eq!(
            split(&["a", "b"], None, LocalOnly::LeftOut).unwrap(),
            (names(&["b"]), names(&["a"]))
        );
        let e = split(&["b"], None, LocalOnly::LeftOut).unwrap_err();
        assert!(e.to_string().contains("targetHost is null"), "{e}");
        assert_eq!(
            split(&["b"], None, LocalOnly::Reported).unwrap(),
            (names(&["b"]), names(&[]))
        );
        assert_eq!(
            split(&["a", "b"], None, LocalOnly::Kept).unwrap(),
            (names(&[]), names(&["a", "b"]))
        );
        // `apply-local` on b deploys it; on a, which does not allow it, nothing.
        assert_eq!(
            split(&["b"], Some("b"), LocalOnly::LeftOut).unwrap(),
            (names(&[]), names(&["b"]))
        );
        let e = split(&["a"], Some("a"), LocalOnly::LeftOut).unwrap_err();
        assert!(e.to_string().contains("allowLocalDeployment"), "{e}");
    }

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
