//! `resume`: continue a cancelled, failed or interrupted deployment with the
//! hosts not yet done, with exactly the options it was started with. The
//! watchdogs its dead coordinator left armed are let settle first, then every
//! remaining host is probed again.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{DeploymentStatus, Event, EventKind, HostStatus};
use nix_deploy_core::fleet::{Host, Selection};
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::remote;
use nix_deploy_core::run::{Deployment, HostRun, RunKind};

use super::prepare::Leases;
use super::recorder::Recorder;
use super::{Engine, EngineError};
use crate::transport::ssh::{self, Connection};

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
        let (done, remaining): (Vec<HostRun>, Vec<HostRun>) =
            deployment.hosts.iter().cloned().partition(|r| {
                r.status == HostStatus::Deployed
                    || (r.status == HostStatus::Skipped && r.changed == Some(false))
            });
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
        let prepared = if remaining_names.is_empty() {
            None
        } else {
            Some(self.prepare(&selection, &options).await?)
        };
        // Activations the dead coordinator never confirmed are still armed on
        // their hosts; let their watchdogs settle before we look at the hosts.
        let unsettled: Vec<(Host, String)> = match &prepared {
            Some(p) => remaining
                .iter()
                .filter(|r| r.status == HostStatus::Interrupted)
                .filter_map(|r| Some((p.inventory.get(&r.host)?.clone(), r.token.clone()?)))
                .collect(),
            None => Vec::new(),
        };
        let leases = Leases::acquire(&self.store, &remaining_names, wait, &cancel).await?;
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
            for (host, token) in &unsettled {
                self.settle_watchdog(&recorder, host, token, &options)
                    .await?;
            }
            match prepared {
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
                    && d.status != DeploymentStatus::Running
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
            DeploymentStatus::Running => Err(EngineError::BadOption(format!(
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

    /// Wait until the activator of an interrupted host run has finished and its
    /// watchdog has decided (confirmed or reverted), so the probe that follows
    /// sees what the host will keep running.
    async fn settle_watchdog(
        &self,
        recorder: &Recorder,
        host: &Host,
        token: &str,
        options: &DeployOptions,
    ) -> Result<(), EngineError> {
        let Ok(connection) = Connection::connect(&host.name, &host.target, &self.config.ssh).await
        else {
            return Ok(()); // unreachable: the probe will say so
        };
        recorder
            .log(
                Some(&host.name),
                "waiting for the watchdog of the interrupted activation to settle".into(),
            )
            .await?;
        let command_timeout = self.config.ssh.command_timeout;
        // The activation itself may still be running, then the watchdog waits.
        let deadline = Instant::now()
            + options.activation_timeout
            + options.confirm_timeout
            + Duration::from_secs(30);
        loop {
            let result = connection
                .run(
                    "resume",
                    &remote::watchdog_result_argv(token),
                    command_timeout,
                )
                .await;
            match result {
                Ok(out) if !out.stdout.trim().is_empty() && out.stdout.trim() != "reverting" => {
                    recorder
                        .log(Some(&host.name), format!("watchdog: {}", out.stdout.trim()))
                        .await?;
                    break;
                }
                // No activator ever ran with this token: nothing to wait for.
                Err(ssh::SshError::Exit { .. })
                    if connection
                        .run(
                            "resume",
                            &remote::activation_status_argv(token),
                            command_timeout,
                        )
                        .await
                        .is_err()
                        && connection
                            .run(
                                "resume",
                                &[
                                    "test".into(),
                                    "-e".into(),
                                    format!("{}/{token}.pid", remote::STATE_DIR),
                                ],
                                command_timeout,
                            )
                            .await
                            .is_err() =>
                {
                    break;
                }
                Err(e) if e.is_connection() => break,
                _ => {}
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        connection.close().await;
        Ok(())
    }
}
