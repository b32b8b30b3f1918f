//! Before anything is recorded or touched: the request is checked (options,
//! evaluation, selection, dependency graph, canaries), then the selected
//! hosts are leased, all or none, and kept leased by one heartbeat.
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
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::eval::EvaluationReport;
use nix_deploy_core::fleet::{Host, Inventory, InventoryError, Selection};
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::plan::{DependencyGraph, GraphHost, PlanError};
use nix_deploy_core::select;

use super::evaluate::EvalUpdate;
use super::probe::EarlyProbes;
use super::recorder::Recorder;
use super::{Engine, EngineError};
use crate::store::Store;

/// What a caller of [`Engine::prepare`] needs.
#[derive(Clone, Copy, Debug)]
pub(super) struct Purpose {
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
pub(super) struct Prepared {
    pub inventory: Inventory,
    pub graph: DependencyGraph,
    pub hosts: Vec<Host>,
    /// How the fleet was evaluated, with the hosts that could not be.
    pub evaluation: EvaluationReport,
    /// Hosts whose evaluation came from the cache.
    pub eval_cached: BTreeSet<String>,
    /// The flake's locked revision, when it has one.
    pub revision: Option<String>,
    /// Probes started during the evaluation.
    pub early: Option<EarlyProbes>,
}

impl Prepared {
    pub fn host_names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// Give up: close what the early probes opened.
    pub async fn discard(self) {
        if let Some(early) = self.early {
            early.discard().await;
        }
    }

    /// Say in the deployment's events how the fleet was evaluated.
    pub async fn log_evaluation(&self, recorder: &Recorder) -> Result<(), EngineError> {
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

impl Engine {
    fn check_options(&self, options: &DeployOptions) -> Result<(), EngineError> {
        options.check()?;
        if let Some(config) = &self.config.ssh.config_file
            && !config.is_file()
        {
            return Err(EngineError::BadOption(format!(
                "--ssh-config {} does not exist",
                config.display()
            )));
        }
        Ok(())
    }

    /// Everything that can be wrong with a request, found before anything is
    /// recorded or touched: the options, the flake, the selection, the
    /// dependency graph and the canaries.
    pub(super) async fn prepare(
        &self,
        selection: &Selection,
        options: &DeployOptions,
        purpose: Purpose,
    ) -> Result<Prepared, EngineError> {
        self.check_options(options)?;
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let mut early = purpose
            .probe_early
            .then(|| EarlyProbes::new(self.config.probe_limit, self.config.ssh.clone()));
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
        let (outcome, consumed) = tokio::join!(self.evaluate(sender), consume);
        let validated = match (consumed, outcome) {
            (Err(e), _) | (_, Err(e)) => Err(e),
            (Ok((hosts, cached)), Ok(outcome)) => self.validate(
                selection,
                options,
                purpose,
                hosts.into_values().collect(),
                cached,
                outcome,
            ),
        };
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
        &self,
        selection: &Selection,
        options: &DeployOptions,
        purpose: Purpose,
        hosts: Vec<Host>,
        eval_cached: BTreeSet<String>,
        outcome: super::evaluate::EvalOutcome,
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
            early: None,
        })
    }
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

/// One host of the fleet by name, or an error listing the fleet.
pub(super) fn find_host(inventory: &Inventory, name: &str) -> Result<Host, EngineError> {
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

/// The leases one run holds on its hosts, renewed by one heartbeat for as
/// long as it holds them (whatever the run is doing: deploying, settling,
/// rolling back).
pub(super) struct Leases {
    store: Store,
    owner: String,
    renewal: Background,
}

impl Leases {
    /// Take the leases of `hosts`, all or none. With `wait`, wait for busy
    /// hosts to be released (until `cancel`, or a cancel request for the
    /// queued deployment `queued` records, which is told what it waits for).
    pub async fn acquire(
        store: &Store,
        hosts: &[String],
        wait: bool,
        cancel: &CancellationToken,
        queued: Option<&Recorder>,
    ) -> Result<Leases, EngineError> {
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let mut told = false;
        loop {
            let mut refused = None;
            for host in hosts {
                if let Err(holder) = store.try_lease(host, &owner, None).await? {
                    refused = Some((host.clone(), holder));
                    break;
                }
            }
            let Some((host, holder)) = refused else {
                let renewal = {
                    let store = store.clone();
                    let owner = owner.clone();
                    Background(tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(store.lease_timing().heartbeat).await;
                            let _ = store.renew_leases(&owner, None).await;
                        }
                    }))
                };
                return Ok(Leases {
                    store: store.clone(),
                    owner,
                    renewal,
                });
            };
            store.release_leases(&owner).await?;
            if let Some(recorder) = queued {
                if store.cancel_requested(recorder.deployment_id()).await? {
                    cancel.cancel();
                }
                if wait && !told {
                    told = true;
                    recorder
                        .log(None, format!("queued: {host} is busy ({holder})"))
                        .await?;
                }
            }
            if !wait || cancel.is_cancelled() {
                return Err(EngineError::Busy {
                    host,
                    holder: holder.to_string(),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }

    /// Name deployment `id` on the leases, and listen for `nix-deploy
    /// cancel` while it runs: stopped when the returned guard drops.
    pub async fn watch_cancel(&self, id: i64, cancel: &CancellationToken) -> Background {
        let _ = self.store.renew_leases(&self.owner, Some(id)).await;
        let store = self.store.clone();
        let cancel = cancel.clone();
        Background(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if !cancel.is_cancelled() && store.cancel_requested(id).await.unwrap_or(false) {
                    cancel.cancel();
                }
            }
        }))
    }

    pub async fn release(self) {
        self.renewal.0.abort();
        let _ = self.store.release_leases(&self.owner).await;
    }
}

/// A background task of a run; stops when dropped.
pub(super) struct Background(JoinHandle<()>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
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
