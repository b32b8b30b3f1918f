//! `resume`: continue a cancelled, failed or interrupted deployment with the
//! hosts not yet done, with exactly the options it was started with. Every
//! remaining host is probed again, and activations its dead coordinator left
//! undecided are settled first (see `probe`). An interrupted rollback on
//! request is resumed as that rollback, never as a deployment.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{DeploymentStatus, Event, EventKind, HostStatus};
use nix_deploy_core::fleet::Selection;
use nix_deploy_core::run::{Deployment, HostRun, RunKind};

use super::prepare::{Leases, Purpose};
use super::recorder::Recorder;
use super::rollback::ROLLBACK;
use super::{Engine, EngineError};

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
        self.store.mark_interrupted().await?;
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
        let prepared = if remaining_names.is_empty() || rollback {
            None
        } else {
            Some(self.prepare(&selection, &options, Purpose::RESUME).await?)
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
            match prepared {
                _ if rollback && !remaining_names.is_empty() => {
                    self.resume_rollback(&deployment, &recorder).await
                }
                Some(prepared) => {
                    self.execute(prepared, &options, &recorder, &leases, &cancel, done)
                        .await
                }
                None => self.finish(&recorder, done, None, &cancel).await,
            }
        }
        .await;
        leases.release().await;
        result
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
