//! `resume`: continue a cancelled, failed or interrupted deployment with the
//! hosts not yet done, with exactly the options it was started with. Every
//! remaining host is probed again, and activations its dead coordinator left
//! undecided are settled first (see `probe`). An interrupted rollback on
//! request is resumed as that rollback, never as a deployment.

use std::collections::BTreeMap;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{DeploymentStatus, Event, EventKind, HostStatus, Step};
use nix_deploy_core::fleet::Selection;
use nix_deploy_core::remote::Before;
use nix_deploy_core::run::{Deployment, HostRun, Pinned, RunKind};

use super::Engine;
use super::rollback::ROLLBACK;
use crate::engine::fleet::FleetContext;
use crate::engine::fleet::execution;
use crate::engine::fleet::leases::Leases;
use crate::engine::fleet::prepare::Prepared;
use crate::engine::fleet::prepare::{self, Purpose};
use crate::engine::fleet::probe;
use crate::engine::fleet::promotion;
use crate::engine::host::fence::HostFence;
use crate::engine::host::recorder::Recorder;
use crate::engine::{EngineConfig, EngineError};

impl Engine {
    /// Continue a cancelled, failed or interrupted deployment with the hosts
    /// not yet done, re-probing every one of them first.
    pub async fn resume(
        &self,
        id: Option<i64>,
        wait: bool,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<Deployment, EngineError> {
        self.preamble().await?;
        let deployment = self.resumable(id).await?;
        let options = deployment.options.clone();
        let done: Vec<HostRun> = deployment
            .hosts
            .iter()
            .filter(|r| {
                r.status == HostStatus::Deployed
                    || (r.status == HostStatus::Skipped && r.changed == Some(false))
            })
            .cloned()
            .collect();
        let remaining_names: Vec<String> = deployment
            .selected
            .iter()
            .filter(|h| !done.iter().any(|d| &d.host == *h))
            .cloned()
            .collect();
        let selection = Selection {
            names: remaining_names.clone(),
            ..Selection::default()
        };
        let rollback = deployment.strategy == ROLLBACK;
        // Exactly what the deployment planned: its pinned flake, whatever
        // the flake says now.
        let pinned = deployment.pinned.clone().unwrap_or_default();
        let config = EngineConfig {
            flake: pinned
                .flake
                .clone()
                .unwrap_or_else(|| self.config.flake.clone()),
            ..self.config.clone()
        };
        let fleet = FleetContext {
            config: &config,
            store: &self.store,
        };
        let prepared = if remaining_names.is_empty() || rollback {
            None
        } else if pinned.promotion.is_some() {
            // A promotion: the same systems from the same source hosts,
            // never the flake's.
            let mut prepared =
                promotion::prepare_resume(fleet, &pinned, &remaining_names, &options).await?;
            prepared.before = touched_before(&deployment, &remaining_names);
            Some(prepared)
        } else {
            let mut prepared = prepare::prepare(fleet, &selection, &options, Purpose::RESUME)
                .await
                .map_err(|e| match &pinned.flake {
                    Some(flake) => EngineError::BadOption(format!(
                        "deployment #{} cannot deploy what it planned: its flake as it was ({flake}) cannot be evaluated any more: {e}; start a new deployment instead",
                        deployment.id
                    )),
                    None => e,
                })?;
            check_planned(&deployment, &pinned, &prepared)?;
            prepared.before = touched_before(&deployment, &remaining_names);
            Some(prepared)
        };
        let leases = Leases::acquire(&self.store, &remaining_names, wait, &cancel, None).await?;
        self.store.reopen_deployment(deployment.id).await?;
        let recorder = Recorder::new(self.store.clone(), deployment.id, sink);
        let result = async {
            recorder
                .emit(
                    None,
                    EventKind::DeploymentStarted {
                        hosts: remaining_names.clone(),
                        strategy: deployment.strategy.clone(),
                    },
                )
                .await?;
            recorder
                .log(
                    None,
                    format!(
                        "resuming deployment #{} ({}) with {} host(s) not yet done: {}",
                        deployment.id,
                        deployment.status,
                        remaining_names.len(),
                        remaining_names.join(", ")
                    ),
                )
                .await?;
            if let Some(prepared) = &prepared {
                self.fence_finished(&deployment, &done, prepared, &recorder)
                    .await?;
            }
            match prepared {
                _ if rollback && !remaining_names.is_empty() => {
                    self.resume_rollback(&deployment, &recorder).await
                }
                Some(prepared) => {
                    let executed =
                        execution::execute(fleet, prepared, &options, &recorder, &leases, &cancel)
                            .await;
                    match executed {
                        Ok(executed) => {
                            self.finish_executed(&recorder, done, executed, &cancel)
                                .await
                        }
                        Err(e) => Err(self.fail(&recorder, "failed", e).await),
                    }
                }
                None => self.finish(&recorder, done, None, &cancel).await,
            }
        }
        .await;
        leases.release().await;
        result
    }

    /// The hosts an earlier attempt deployed are not probed again: record
    /// this attempt's epoch on them (see `engine::host::fence`), so that an
    /// earlier holder still running cannot switch them back. Hosts the flake
    /// no longer evaluates are said in the events.
    async fn fence_finished(
        &self,
        deployment: &Deployment,
        done: &[HostRun],
        prepared: &Prepared,
        recorder: &Recorder,
    ) -> Result<(), EngineError> {
        let deployed = done.iter().filter(|r| r.status == HostStatus::Deployed);
        let (hosts, missing): (Vec<_>, Vec<_>) =
            deployed.partition(|r| prepared.inventory.get(&r.host).is_some());
        for run in missing {
            recorder
                .log(
                    Some(&run.host),
                    "warning: not evaluated, so this deployment's new epoch could not be recorded on the host: an earlier holder of the deployment that still runs could switch it back".into(),
                )
                .await?;
        }
        if hosts.is_empty() {
            return Ok(());
        }
        let hosts = hosts
            .iter()
            .filter_map(|r| prepared.inventory.get(&r.host).cloned())
            .collect();
        let fence = HostFence::of(&self.store, deployment.id).await?;
        let fleet = FleetContext {
            config: &self.config,
            store: &self.store,
        };
        probe::fence_hosts(fleet, hosts, &fence, recorder).await
    }

    /// The deployment to resume: `id`, or the latest that did not succeed.
    async fn resumable(&self, id: Option<i64>) -> Result<Deployment, EngineError> {
        let deployment = match id {
            Some(id) => self.store.deployment(id).await?,
            None => self.store.deployments(50).await?.into_iter().find(|d| {
                d.kind == RunKind::Deploy
                    && d.status != DeploymentStatus::Succeeded
                    && !d.status.is_active()
            }),
        }
        .ok_or_else(|| {
            EngineError::BadOption(match id {
                Some(id) => format!("no deployment #{id}"),
                None => "no cancelled, failed or interrupted deployment to resume".into(),
            })
        })?;
        match deployment.status {
            // An exec or upload-keys run is not resumed: run it again.
            _ if deployment.kind != RunKind::Deploy => Err(EngineError::BadOption(format!(
                "#{} is an {} run, not a deployment; run it again instead",
                deployment.id,
                deployment.kind.as_str()
            ))),
            status if status.is_active() => Err(EngineError::BadOption(format!(
                "deployment #{} is still running (pid {})",
                deployment.id,
                deployment.pid.unwrap_or(0)
            ))),
            DeploymentStatus::Succeeded => Err(EngineError::BadOption(format!(
                "deployment #{} succeeded; there is nothing to resume",
                deployment.id
            ))),
            _ if deployment.flake != self.config.flake => Err(EngineError::BadOption(format!(
                "deployment #{} was made from --flake {}; resume it with the same flake",
                deployment.id, deployment.flake
            ))),
            _ => Ok(deployment),
        }
    }
}

/// Every host still to deploy gets exactly what the deployment planned for
/// it (pinned when it started, or recorded as its run's target by an older
/// version), or the resume is refused before anything is touched.
fn check_planned(
    deployment: &Deployment,
    pinned: &Pinned,
    prepared: &Prepared,
) -> Result<(), EngineError> {
    for host in &prepared.hosts {
        let planned = pinned.hosts.get(&host.name).cloned().or_else(|| {
            deployment
                .hosts
                .iter()
                .find(|r| r.host == host.name)
                .and_then(|r| r.to.path.clone())
        });
        match planned {
            Some(planned) if planned != host.toplevel() => {
                return Err(EngineError::BadOption(format!(
                    "deployment #{} planned {planned} for {}, but its flake now evaluates to {}: resume deploys exactly what was planned; start a new deployment for the new system",
                    deployment.id,
                    host.name,
                    host.toplevel()
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// What hosts an earlier attempt already touched (set their profile or
/// activated them) ran and booted before it did: where their way back
/// leads, rather than the half-way state a kill left them in.
fn touched_before(deployment: &Deployment, remaining: &[String]) -> BTreeMap<String, Before> {
    deployment
        .hosts
        .iter()
        .filter(|r| remaining.contains(&r.host))
        .filter(|r| {
            r.token.is_some()
                || r.steps
                    .iter()
                    .any(|s| s.step == Step::SetProfile && s.ok != Some(false))
        })
        .map(|r| {
            (
                r.host.clone(),
                Before {
                    running: r.from.path.clone(),
                    boot_generation: r.from.generation,
                },
            )
        })
        .collect()
}
