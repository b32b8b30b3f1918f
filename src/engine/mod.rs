//! The engine: evaluate, probe, plan and deploy, recording everything.
//!
//! One deployment is owned by one call of [`Engine::deploy`]:
//!
//! 1. [`prepare`]: the request is validated (evaluation, selection,
//!    dependency graph, options) and the hosts are leased before anything is
//!    recorded or touched. [`evaluate`] evaluates the fleet in shards, in
//!    parallel, from the evaluation cache when it can, and hands each host
//!    on as soon as it is evaluated, so that probing (which changes nothing)
//!    overlaps evaluation.
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

mod activator;
mod blue_green;
mod evaluate;
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

use std::sync::{Arc, OnceLock};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use nix_deploy_core::eval::EvalFailure;
use nix_deploy_core::events::{DeploymentStatus, Event, EventKind, HostStatus};
use nix_deploy_core::fleet::{InventoryError, Selection};
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
use prepare::{Leases, Purpose};
use recorder::Recorder;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be carried out as given; nothing was touched.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Eval(NixError),
    /// Hosts whose configuration Nix could not evaluate (each with Nix's error).
    #[error("{}", describe_failures(.0))]
    EvalFailed(Vec<EvalFailure>),
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
                | EngineError::EvalFailed(_)
                | EngineError::Plan(_)
                | EngineError::Options(_)
                | EngineError::BadOption(_)
                | EngineError::Busy { .. }
        )
    }
}

fn describe_failures(failures: &[EvalFailure]) -> String {
    let mut text = format!(
        "{} host(s) could not be evaluated; nothing was touched",
        failures.len()
    );
    for failure in failures {
        text.push_str(&format!("\n{}: {}", failure.host, failure.error));
    }
    text
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
    /// `nix eval` processes at once; `None`: from the cores and the memory
    /// available (see `nix_deploy_core::eval::default_workers`).
    pub eval_workers: Option<usize>,
    /// Read the evaluation cache (`--no-eval-cache` turns it off; fresh
    /// results are stored either way).
    pub eval_cache: bool,
    /// `nix eval` processes of this process at once, across concurrent
    /// evaluations (the daemon's plans and deployments): sized by the first
    /// evaluation's worker count, shared by every clone of this config.
    pub(crate) eval_gate: Arc<OnceLock<Arc<Semaphore>>>,
}

impl EngineConfig {
    pub fn new(flake: String, ssh: SshOptions) -> Self {
        EngineConfig {
            flake,
            nix: Nix::default(),
            ssh,
            probe_limit: 64,
            eval_workers: None,
            eval_cache: true,
            eval_gate: Arc::default(),
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

    /// Run a deployment to the end. `sink` receives every event after it is stored;
    /// `cancel` stops starting new hosts (running ones finish or roll back).
    /// Bad input is refused before anything is recorded.
    pub async fn deploy(
        &self,
        request: DeployRequest,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<Deployment, EngineError> {
        self.start(None, request, sink, cancel).await
    }

    /// Record a request at once (status `queued`), before it is validated or
    /// waits for busy hosts: callers with a deadline (a hook, a chat
    /// command, `"wait": true`) get its id right away. Then
    /// [`Engine::deploy_queued`] runs it; bad input ends it `failed`.
    pub async fn enqueue(&self, request: &DeployRequest) -> Result<i64, EngineError> {
        let mut requested = request.selection.names.clone();
        requested.extend(request.selection.tags.iter().map(|t| {
            if t.starts_with('@') {
                t.clone()
            } else {
                format!("@{t}")
            }
        }));
        Ok(self
            .store
            .create_deployment(&NewDeployment {
                trigger: request.trigger.clone(),
                requested_by: request.requested_by.clone(),
                flake: self.config.flake.clone(),
                flake_rev: None,
                strategy: request.options.strategy.as_str().to_string(),
                options: request.options.clone(),
                hosts: requested,
                queued: true,
            })
            .await?)
    }

    /// Run deployment `id`, recorded by [`Engine::enqueue`].
    pub async fn deploy_queued(
        &self,
        id: i64,
        request: DeployRequest,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<Deployment, EngineError> {
        self.start(Some(id), request, sink, cancel).await
    }

    async fn start(
        &self,
        queued: Option<i64>,
        request: DeployRequest,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<Deployment, EngineError> {
        self.store.mark_interrupted().await?;
        let options = &request.options;
        let strategy = options.strategy.as_str().to_string();
        let prepared = self
            .prepare(&request.selection, options, Purpose::DEPLOY)
            .await;
        let queue_recorder = queued.map(|id| Recorder::new(self.store.clone(), id, sink.clone()));
        let refused = async |e: EngineError| {
            if let Some(recorder) = &queue_recorder {
                // Recorded already: it ends, failed, with the reason.
                let _ = recorder.log(None, format!("refused: {e}")).await;
                let _ = self
                    .store
                    .finish_deployment(
                        recorder.deployment_id(),
                        DeploymentStatus::Failed,
                        Some(&e.to_string()),
                    )
                    .await;
                let _ = recorder
                    .emit(
                        None,
                        EventKind::DeploymentFinished {
                            status: DeploymentStatus::Failed,
                        },
                    )
                    .await;
            }
            e
        };
        let prepared = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return Err(refused(e).await),
        };
        let flake_rev = prepared.revision.clone();
        let host_names = prepared.host_names();
        let leases = match Leases::acquire(
            &self.store,
            &host_names,
            request.wait,
            &cancel,
            queue_recorder.as_ref(),
        )
        .await
        {
            Ok(leases) => leases,
            Err(e) => {
                prepared.discard().await;
                return Err(refused(e).await);
            }
        };
        let id = match queued {
            Some(id) => self
                .store
                .start_deployment(id, &host_names, flake_rev.as_deref())
                .await
                .map(|()| id),
            None => {
                self.store
                    .create_deployment(&NewDeployment {
                        trigger: request.trigger.clone(),
                        requested_by: request.requested_by.clone(),
                        flake: self.config.flake.clone(),
                        flake_rev,
                        strategy: strategy.clone(),
                        options: options.clone(),
                        hosts: host_names.clone(),
                        queued: false,
                    })
                    .await
            }
        };
        let id = match id {
            Ok(id) => id,
            Err(e) => {
                leases.release().await;
                prepared.discard().await;
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
                        strategy,
                    },
                )
                .await?;
            prepared.log_evaluation(&recorder).await?;
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
        recorder::durably(|| self.store.finish_deployment(id, status, error.as_deref())).await?;
        recorder
            .emit(None, EventKind::DeploymentFinished { status })
            .await?;
        self.store
            .deployment(id)
            .await?
            .ok_or_else(|| EngineError::Internal(format!("deployment #{id} vanished")))
    }
}
