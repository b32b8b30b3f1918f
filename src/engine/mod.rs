//! The engine: evaluate, probe, plan and deploy, recording everything.
//!
//! One deployment is owned by one call of [`Engine::deploy`]:
//!
//! 1. [`prepare`]: the request is validated (evaluation, selection,
//!    dependency graph, options) and the hosts are leased before anything is
//!    recorded or touched.
//! 2. [`probe`]: every selected host is probed in parallel (bounded).
//! 3. The pure planner decides; [`scheduler`] obeys its `waits_for` edges, at
//!    most `parallel_limit` hosts at once, and stops when the plan says so.
//! 4. [`pipeline`]: one host's steps, top to bottom; a failure goes to
//!    [`recovery`], the one place that switches a host back.
//! 5. [`blue_green`] commits or reverts staged hosts together.
//!
//! The pipeline's goal-dependent steps are in [`goals`] (boot validation,
//! dry-activate, keys, GC roots via [`gcroots`]) and [`reboot`] (reboots and
//! the way back through the boot generation); [`keys`] reads and uploads
//! `deployment.keys`.
//!
//! [`resume`] continues an interrupted deployment with its stored options;
//! [`rollback`] switches a host back on request; [`health`] runs health
//! checks; [`exec`] runs a command on many hosts (and its runner does
//! `upload-keys`). Every state change goes through the [`recorder`], which
//! writes it to the store before anyone is told.

mod blue_green;
mod exec;
mod gcroots;
mod goals;
mod health;
mod keys;
mod pipeline;
mod prepare;
mod probe;
mod reboot;
mod recorder;
mod recovery;
mod resume;
mod rollback;
mod scheduler;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{DeploymentStatus, Event, EventKind, HostStatus};
use nix_deploy_core::fleet::{Inventory, InventoryError, Selection};
use nix_deploy_core::options::{DeployOptions, OptionsError};
use nix_deploy_core::plan::PlanError;
use nix_deploy_core::run::{Deployment, HostRun};

pub use exec::ExecJob;
pub use keys::UploadKeysRequest;
pub use probe::Assessment;
pub use rollback::RollbackRequest;

use crate::nix::{Nix, NixError};
use crate::store::{NewDeployment, Store, StoreError};
use crate::transport::ssh::SshOptions;
use prepare::Leases;
use recorder::Recorder;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be carried out as given; nothing was touched.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Eval(NixError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[error("invalid option: {0}")]
    BadOption(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{host} is busy: {holder} is deploying it (use --wait to queue)")]
    Busy { host: String, holder: String },
    #[error("{0}")]
    Unreachable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Whether the caller gave us something we cannot use (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            EngineError::Inventory(_)
                | EngineError::Eval(_)
                | EngineError::Plan(_)
                | EngineError::Options(_)
                | EngineError::BadOption(_)
                | EngineError::Busy { .. }
        )
    }
}

/// What every run of this process shares, decided once at the edge (CLI or
/// daemon). What one deployment may choose is in its [`DeployOptions`].
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub flake: String,
    pub nix: Nix,
    pub ssh: SshOptions,
    /// Hosts probed at once.
    pub probe_limit: usize,
}

impl EngineConfig {
    pub fn new(flake: String, ssh: SshOptions) -> Self {
        EngineConfig {
            flake,
            nix: Nix::default(),
            ssh,
            probe_limit: 64,
        }
    }
}

/// One deployment request.
#[derive(Clone, Debug, Default)]
pub struct DeployRequest {
    pub selection: Selection,
    /// Wait for busy hosts instead of refusing.
    pub wait: bool,
    pub options: DeployOptions,
    pub trigger: String,
    pub requested_by: String,
}

/// How long a lease lasts without renewal (renewed every 10 s while working).
const LEASE_TTL: Duration = Duration::from_secs(60);

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

    /// Evaluate the fleet: one `nix eval` for every host.
    pub async fn inventory(&self) -> Result<Inventory, EngineError> {
        let json = self
            .config
            .nix
            .eval_fleet(&self.config.flake)
            .await
            .map_err(EngineError::Eval)?;
        Ok(Inventory::from_eval_json(&json)?)
    }

    /// Run a deployment to the end. `sink` receives every event after it is stored;
    /// `cancel` stops starting new hosts (running ones finish or roll back).
    pub async fn deploy(
        &self,
        request: DeployRequest,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<Deployment, EngineError> {
        self.store.mark_interrupted().await?;
        let options = &request.options;
        let (prepared, flake_rev) = tokio::join!(
            self.prepare(&request.selection, options),
            self.config.nix.flake_revision(&self.config.flake)
        );
        let prepared = prepared?;
        let host_names = prepared.host_names();
        let leases = Leases::acquire(&self.store, &host_names, request.wait, &cancel).await?;
        let created = self
            .store
            .create_deployment(&NewDeployment {
                trigger: request.trigger.clone(),
                requested_by: request.requested_by.clone(),
                flake: self.config.flake.clone(),
                flake_rev,
                strategy: options.strategy.as_str().to_string(),
                options: options.clone(),
                hosts: host_names.clone(),
            })
            .await;
        let id = match created {
            Ok(id) => id,
            Err(e) => {
                leases.release().await;
                return Err(e.into());
            }
        };
        let recorder = Recorder::new(self.store.clone(), id, sink);
        let result = async {
            recorder
                .emit(
                    None,
                    EventKind::DeploymentStarted {
                        hosts: host_names,
                        strategy: options.strategy.as_str().to_string(),
                    },
                )
                .await?;
            self.execute(prepared, options, &recorder, &leases, &cancel, Vec::new())
                .await
        }
        .await;
        leases.release().await;
        result
    }

    /// Record how the deployment ended and return it as stored.
    async fn finish(
        &self,
        recorder: &Recorder,
        hosts: Vec<HostRun>,
        error: Option<String>,
        cancel: &CancellationToken,
    ) -> Result<Deployment, EngineError> {
        let id = recorder.deployment_id();
        let status = if hosts.iter().any(|h| h.status.is_failure()) || error.is_some() {
            DeploymentStatus::Failed
        } else if hosts.iter().any(|h| h.status == HostStatus::Cancelled) || cancel.is_cancelled() {
            DeploymentStatus::Cancelled
        } else {
            DeploymentStatus::Succeeded
        };
        self.store
            .finish_deployment(id, status, error.as_deref())
            .await?;
        recorder
            .emit(None, EventKind::DeploymentFinished { status })
            .await?;
        self.store
            .deployment(id)
            .await?
            .ok_or_else(|| EngineError::Internal(format!("deployment #{id} vanished")))
    }
}
