//! `rollback HOST [--to-generation N]`: switch a host back to an earlier
//! generation on request, verified, health-checked and recorded like a
//! deployment (strategy `rollback`). An interrupted one is resumed as the
//! same rollback, to the same generation. Its keys go back to those the
//! last deployment replaced when that deployment came from generation N's
//! system; else they are left, and the result says so.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{DeploymentStatus, Event, EventKind, HostStatus};
use nix_deploy_core::fleet::Host;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::remote::{self, Activation, Before};
use nix_deploy_core::run::{Deployment, HostRun};

use super::Engine;
use crate::engine::EngineError;
use crate::engine::fleet::evaluate;
use crate::engine::fleet::leases::Leases;
use crate::engine::host::fence::HostFence;
use crate::engine::host::keys::KeyTexts;
use crate::engine::host::keys_back;
use crate::engine::host::observe::{self, Assessment, Settle, probe_host};
use crate::engine::host::pipeline::HostContext;
use crate::engine::host::recorder::Recorder;
use crate::engine::host::way_back::{self, conclude};
use crate::now_ms;
use crate::store::NewDeployment;
use crate::transport::ssh::{Connection, SshOptions};

/// The strategy name a rollback on request is recorded with.
pub const ROLLBACK: &str = "rollback";

/// Who asked for a rollback, and how it is checked.
pub struct RollbackRequest {
    pub host: String,
    /// Default: the generation before the current one.
    pub to_generation: Option<u32>,
    pub options: DeployOptions,
    pub trigger: String,
    pub requested_by: String,
}

impl Engine {
    /// Switch a host back to an earlier generation, recorded in history.
    pub async fn rollback(
        &self,
        request: RollbackRequest,
        sink: Option<mpsc::UnboundedSender<Event>>,
    ) -> Result<Deployment, EngineError> {
        self.preamble().await?;
        request.options.check()?;
        let host = evaluate::evaluated_host(self.fleet(), &request.host).await?;
        let never = CancellationToken::new();
        let leases = Leases::acquire(
            &self.store,
            std::slice::from_ref(&host.name),
            false,
            &never,
            None,
        )
        .await?;
        let result = async {
            // Not a deployment yet: nothing to fence while it is probed.
            let (assessment, connection) = self.reach(&host, &request.options, None).await?;
            let target = match rollback_target(
                &self.config.ssh,
                &connection,
                &assessment,
                request.to_generation,
            )
            .await
            {
                Ok(target) => target,
                Err(e) => {
                    connection.close().await;
                    return Err(e);
                }
            };
            let id = self
                .store
                .create_deployment(&NewDeployment {
                    trigger: request.trigger.clone(),
                    requested_by: request.requested_by.clone(),
                    flake: self.config.flake.clone(),
                    flake_rev: None,
                    strategy: ROLLBACK.into(),
                    options: request.options.clone(),
                    hosts: vec![host.name.clone()],
                    queued: false,
                    source: None,
                })
                .await?;
            let recorder = Recorder::new(self.store.clone(), id, sink);
            recorder
                .emit(
                    None,
                    EventKind::DeploymentStarted {
                        hosts: vec![host.name.clone()],
                        strategy: ROLLBACK.into(),
                    },
                )
                .await?;
            self.roll_back_host(&recorder, &request.options, assessment, connection, target)
                .await
        }
        .await;
        leases.release().await;
        result
    }

    /// Continue an interrupted rollback on request: the same host back to the
    /// same generation (never forward to the system it was leaving).
    pub(crate) async fn resume_rollback(
        &self,
        deployment: &Deployment,
        recorder: &Recorder,
    ) -> Result<Deployment, EngineError> {
        let run = deployment
            .hosts
            .first()
            .ok_or_else(|| EngineError::Internal("a rollback without its host run".into()))?;
        let generation = run.to.generation.ok_or_else(|| {
            EngineError::Internal("a rollback without its target generation".into())
        })?;
        let host = evaluate::evaluated_host(self.fleet(), &run.host).await?;
        let fence = HostFence::of(&self.store, deployment.id).await?;
        let (assessment, connection) = self.reach(&host, &deployment.options, Some(fence)).await?;
        let target =
            match rollback_target(&self.config.ssh, &connection, &assessment, Some(generation))
                .await
            {
                Ok(target) => target,
                Err(e) => {
                    connection.close().await;
                    return Err(e);
                }
            };
        self.roll_back_host(
            recorder,
            &deployment.options,
            assessment,
            connection,
            target,
        )
        .await
    }

    /// Probe the host (settling what a dead coordinator left, behind the
    /// rollback's `fence` once it is a deployment), or say why not.
    async fn reach(
        &self,
        host: &Host,
        options: &DeployOptions,
        fence: Option<HostFence>,
    ) -> Result<(Assessment, Connection), EngineError> {
        let held = fence.clone();
        let settle = Settle::Yes {
            activation_timeout: options.activation_timeout,
            fence,
        };
        let (assessment, connection) = probe_host(host.clone(), &self.config.ssh, settle).await;
        if let Some(fence) = held
            && let Err(e) = fence.held()
        {
            if let Some(connection) = connection {
                connection.close().await;
            }
            return Err(e.into());
        }
        match connection {
            Some(connection) => Ok((assessment, connection)),
            None => Err(EngineError::Unreachable(
                assessment
                    .error
                    .unwrap_or_else(|| format!("{}: unreachable", host.name)),
            )),
        }
    }

    /// Switch the host to `target` as the deployment's one host run.
    async fn roll_back_host(
        &self,
        recorder: &Recorder,
        options: &DeployOptions,
        assessment: Assessment,
        mut connection: Connection,
        target: Before,
    ) -> Result<Deployment, EngineError> {
        let host = &assessment.host;
        let context = HostContext {
            nix: self.config.nix.clone(),
            ssh: self.config.ssh.clone(),
            options: options.clone(),
            recorder: recorder.clone(),
            keys: std::sync::Arc::new(KeyTexts::none()),
            fetch_from: Default::default(),
            fence: HostFence::of(&self.store, recorder.deployment_id()).await?,
        };
        let mut run = HostRun::new(recorder.deployment_id(), &host.name);
        run.status = HostStatus::Running;
        run.changed = Some(true);
        run.from = assessment.current.clone();
        run.to.generation = target.boot_generation;
        run.to.path = target.running.clone();
        let generation = target.boot_generation.unwrap_or_default();
        run.reason = Some(format!("rollback to generation {generation} on request"));
        run.time.started_at = Some(now_ms());
        recorder.save(&run).await?;
        let there = assessment
            .probe
            .as_ref()
            .is_some_and(|p| way_back::already_there(&p.systems(), &target));
        let result = if there {
            recorder
                .log(
                    Some(&host.name),
                    format!("already on generation {generation}"),
                )
                .await?;
            run.after = observe::systems(&connection, "rollback", self.config.ssh.command_timeout)
                .await
                .ok();
            Ok(())
        } else {
            // Keys follow the system: those kept for generation N's system
            // (by the deployment that left it) go back first.
            let keys = keys_back::return_to(
                &connection,
                host,
                target.running.as_deref(),
                self.config.ssh.command_timeout,
            )
            .await;
            keys_back::record(&context, &mut run, keys).await?;
            // Switched to as a `switch` would: it runs and boots generation N.
            way_back::roll_back(
                &context,
                &mut run,
                &mut connection,
                &assessment,
                &target,
                Activation::Switch,
            )
            .await?
        };
        conclude(&mut run, result, HostStatus::RolledBack, None, None);
        run.time.finished_at = Some(now_ms());
        connection.close().await;
        recorder.finish_host(&mut run).await?;
        // Rolled back as asked is this run's success.
        let status = if run.status == HostStatus::RolledBack {
            DeploymentStatus::Succeeded
        } else {
            DeploymentStatus::Failed
        };
        self.end(recorder, status, None).await
    }
}

/// The generation to go back to, as what the host will run and boot.
async fn rollback_target(
    ssh: &SshOptions,
    connection: &Connection,
    assessment: &Assessment,
    asked: Option<u32>,
) -> Result<Before, EngineError> {
    let host = &assessment.host.name;
    let generations = connection
        .run(
            "rollback",
            &remote::list_generations_argv(),
            ssh.command_timeout,
        )
        .await
        .map(|o| remote::parse_generations(&o.stdout))
        .unwrap_or_default();
    let generation = target_generation(host, &generations, assessment.current.generation, asked)?;
    way_back::generation_target(connection, ssh, generation)
        .await
        .map_err(EngineError::Unreachable)
}

/// The generation to go back to: the one asked for, if the host has it, else
/// the newest one before the current.
fn target_generation(
    host: &str,
    generations: &[u32],
    current: Option<u32>,
    asked: Option<u32>,
) -> Result<u32, EngineError> {
    match asked {
        Some(n) if generations.contains(&n) => Ok(n),
        Some(n) => Err(EngineError::BadOption(format!(
            "{host} has no generation {n} (it has {})",
            generations
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        None => generations
            .iter()
            .rev()
            .find(|g| Some(**g) < current)
            .copied()
            .ok_or_else(|| {
                EngineError::BadOption(format!(
                    "{host} has no generation before {} to roll back to",
                    current.map(|g| g.to_string()).unwrap_or("-".into())
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_generation_to_go_back_to() {
        assert_eq!(
            target_generation("h", &[1, 2, 3], Some(3), None).unwrap(),
            2
        );
        assert_eq!(
            target_generation("h", &[1, 2, 3], Some(3), Some(1)).unwrap(),
            1
        );
        let e = target_generation("h", &[1, 3], Some(3), Some(2)).unwrap_err();
        assert!(
            e.to_string().contains("no generation 2 (it has 1, 3)"),
            "{e}"
        );
        let e = target_generation("h", &[1], Some(1), None).unwrap_err();
        assert!(e.to_string().contains("no generation before 1"), "{e}");
    }
}
