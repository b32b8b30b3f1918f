//! What callers ask the engine for, one file per command: [`Engine`] and
//! its only `impl` blocks. Every command that records a run goes through
//! the same [`Engine::preamble`] first and the same [`Engine::finish`] (or
//! [`Engine::fail`]) at the end, so a run is never left without its status
//! and its `deployment-finished` event.

mod build;
mod deploy;
mod doctor;
mod exec;
mod health;
mod plan;
mod promote;
mod resume;
mod rollback;
mod watch;

use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{DeploymentStatus, EventKind, HostStatus};
use nix_deploy_core::run::{Deployment, HostRun};

pub use build::BuildRequest;
pub use deploy::{DeployRequest, PushSource};
pub use exec::{ExecJob, UploadKeysRequest};
pub use promote::{PROMOTE, PromoteJob};
pub use rollback::RollbackRequest;
pub use watch::DesiredFleet;

use super::fleet::FleetContext;
use super::fleet::execution::Executed;
use super::host::recorder::{self, Recorder};
use super::{EngineConfig, EngineError};
use crate::store::Store;

pub struct Engine {
    config: EngineConfig,
    store: Store,
}

impl Engine {
    pub fn new(config: EngineConfig, store: Store) -> Self {
        Engine { config, store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The same engine for another reference to the flake (`--revision`
    /// pins it to a commit).
    pub fn with_flake(mut self, flake: String) -> Self {
        self.config.flake = flake;
        self
    }

    /// What the fleet layer works with.
    fn fleet(&self) -> FleetContext<'_> {
        FleetContext {
            config: &self.config,
            store: &self.store,
        }
    }

    /// First of every command that records a run: runs whose coordinator
    /// died are marked `interrupted` (their hosts' leases can be taken), and
    /// the ssh configuration is checked.
    async fn preamble(&self) -> Result<(), EngineError> {
        self.store.mark_interrupted().await?;
        self.check_ssh_config()
    }

    /// An `--ssh-config` that does not exist is refused before anything is
    /// recorded or touched.
    fn check_ssh_config(&self) -> Result<(), EngineError> {
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

    /// The one way a recorded run ends: its status follows from its host
    /// runs, is stored, then its `deployment-finished` event is sent; the run
    /// comes back as stored.
    async fn finish(
        &self,
        recorder: &Recorder,
        hosts: Vec<HostRun>,
        error: Option<String>,
        cancel: &CancellationToken,
    ) -> Result<Deployment, EngineError> {
        let status = if hosts.iter().any(|h| h.status.is_failure()) || error.is_some() {
            DeploymentStatus::Failed
        } else if hosts.iter().any(|h| h.status == HostStatus::Cancelled) || cancel.is_cancelled() {
            DeploymentStatus::Cancelled
        } else {
            DeploymentStatus::Succeeded
        };
        self.end(recorder, status, error).await
    }

    /// The end of a deployment's execution: `done` (host runs of an earlier
    /// attempt) and this attempt's. Held hosts that never started because a
    /// gate or window said so (rejected, timed out, `--no-wait`) end it
    /// `cancelled`, saying why, unless something failed.
    async fn finish_executed(
        &self,
        recorder: &Recorder,
        done: Vec<HostRun>,
        executed: Executed,
        cancel: &CancellationToken,
    ) -> Result<Deployment, EngineError> {
        let mut hosts = done;
        hosts.extend(executed.runs);
        if executed.aborted.is_none()
            && let Some(reason) = executed.stopped
            && !hosts.iter().any(|h| h.status.is_failure())
        {
            return self
                .end(recorder, DeploymentStatus::Cancelled, Some(reason))
                .await;
        }
        self.finish(recorder, hosts, executed.aborted, cancel).await
    }

    /// Store how a run ended, send its `deployment-finished` event, and
    /// return it as stored.
    async fn end(
        &self,
        recorder: &Recorder,
        status: DeploymentStatus,
        error: Option<String>,
    ) -> Result<Deployment, EngineError> {
        let id = recorder.deployment_id();
        recorder::durably(|| self.store.finish_deployment(id, status, error.as_deref())).await?;
        recorder
            .emit(None, EventKind::DeploymentFinished { status })
            .await?;
        self.store
            .deployment(id)
            .await?
            .ok_or_else(|| EngineError::Internal(format!("deployment #{id} vanished")))
    }

    /// A recorded run that cannot go on (`refused` after it was queued,
    /// `failed` when its plan is impossible or its execution broke): stored
    /// `failed` with why, its `deployment-finished` event sent, and the
    /// error handed back.
    async fn fail(&self, recorder: &Recorder, how: &str, error: EngineError) -> EngineError {
        // Handed over: it goes on elsewhere, and is not ours to end.
        if let EngineError::HandedOver(_) = error {
            return error;
        }
        let id = recorder.deployment_id();
        let _ = recorder.log(None, format!("{how}: {error}")).await;
        let message = error.to_string();
        let _ = recorder::durably(|| {
            self.store
                .finish_deployment(id, DeploymentStatus::Failed, Some(&message))
        })
        .await;
        let _ = recorder
            .emit(
                None,
                EventKind::DeploymentFinished {
                    status: DeploymentStatus::Failed,
                },
            )
            .await;
        error
    }
}
