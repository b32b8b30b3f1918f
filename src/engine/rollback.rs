//! `rollback HOST [--to-generation N]`: switch a host back to an earlier
//! generation on request, verified, health-checked and recorded like a
//! deployment (strategy `rollback`).

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{Event, EventKind, HostStatus};
use nix_deploy_core::fleet::Host;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::remote;
use nix_deploy_core::run::{Deployment, HostRun};

use super::pipeline::HostContext;
use super::prepare::{Leases, find_host};
use super::probe::probe_host;
use super::recorder::Recorder;
use super::recovery::{Back, Previous, conclude};
use super::{Engine, EngineError};
use crate::now_ms;
use crate::store::NewDeployment;

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
        self.store.mark_interrupted().await?;
        request.options.check()?;
        let inventory = self.inventory().await?;
        let host = find_host(&inventory, &request.host)?;
        let never = CancellationToken::new();
        let leases =
            Leases::acquire(&self.store, std::slice::from_ref(&host.name), false, &never).await?;
        let result = self.rollback_leased(&host, &request, sink).await;
        leases.release().await;
        result
    }

    async fn rollback_leased(
        &self,
        host: &Host,
        request: &RollbackRequest,
        sink: Option<mpsc::UnboundedSender<Event>>,
    ) -> Result<Deployment, EngineError> {
        let (assessment, connection) = probe_host(host.clone(), &self.config.ssh).await;
        let Some(connection) = connection else {
            return Err(EngineError::Unreachable(
                assessment
                    .error
                    .unwrap_or_else(|| format!("{}: unreachable", host.name)),
            ));
        };
        let timeout = self.config.ssh.command_timeout;
        let target = async {
            let generations = connection
                .run("rollback", &remote::list_generations_argv(), timeout)
                .await
                .map(|o| remote::parse_generations(&o.stdout))
                .unwrap_or_default();
            let target = target_generation(
                &host.name,
                &generations,
                assessment.current.generation,
                request.to_generation,
            )?;
            let link = connection
                .run(
                    "rollback",
                    &[
                        "readlink".to_string(),
                        "-f".into(),
                        remote::generation_link(target),
                    ],
                    timeout,
                )
                .await
                .map_err(|e| EngineError::Unreachable(e.to_string()))?;
            Ok::<_, EngineError>(Previous {
                generation: target,
                path: link.stdout.trim().to_string(),
            })
        }
        .await;
        let target = match target {
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
                strategy: "rollback".into(),
                options: request.options.clone(),
                hosts: vec![host.name.clone()],
            })
            .await?;
        let recorder = Recorder::new(self.store.clone(), id, sink);
        recorder
            .emit(
                None,
                EventKind::DeploymentStarted {
                    hosts: vec![host.name.clone()],
                    strategy: "rollback".into(),
                },
            )
            .await?;
        let context = HostContext {
            nix: self.config.nix.clone(),
            ssh: self.config.ssh.clone(),
            options: request.options.clone(),
            recorder: recorder.clone(),
            keys: std::sync::Arc::new(super::keys::KeyTexts::none()),
        };
        let mut run = HostRun::new(id, &host.name);
        run.status = HostStatus::Running;
        run.changed = Some(true);
        run.from = assessment.current.clone();
        run.to.generation = Some(target.generation);
        run.to.path = Some(target.path.clone());
        run.reason = Some(format!(
            "rollback to generation {} on request",
            target.generation
        ));
        run.time.started_at = Some(now_ms());
        recorder.save(&run).await?;
        let result = context
            .roll_back(&mut run, &connection, host, &target, Back::Switch)
            .await?;
        conclude(&mut run, result, HostStatus::Deployed, None, None);
        run.time.finished_at = Some(now_ms());
        connection.close().await;
        recorder.finish_host(&mut run).await?;
        self.finish(&recorder, vec![run], None, &CancellationToken::new())
            .await
    }
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
