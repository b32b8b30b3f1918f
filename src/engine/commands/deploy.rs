//! `deploy`: validate the request, lease its hosts, record the deployment,
//! then probe, plan and execute it. Also `enqueue`: a request recorded at
//! once (for callers with a deadline) and run later.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{DeploymentStatus, Event, EventKind};
use nix_deploy_core::fleet::Selection;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::run::Deployment;

use super::Engine;
use crate::engine::EngineError;
use crate::engine::fleet::leases::Leases;
use crate::engine::fleet::prepare::{self, Prepared, Purpose};
use crate::engine::fleet::{execution, gates};
use crate::engine::host::recorder::{self, Recorder};
use crate::store::NewDeployment;

/// One deployment request.
#[derive(Clone, Debug, Default)]
pub struct DeployRequest {
    pub selection: Selection,
    /// Wait for busy hosts instead of refusing.
    pub wait: bool,
    pub options: DeployOptions,
    pub trigger: String,
    pub requested_by: String,
    /// A deployment of a pushed commit: the newest push of its branch wins.
    pub source: Option<PushSource>,
}

/// Where a deployment of a pushed commit comes from. A newer push of the
/// same branch supersedes the older ones still queued, and a deployment
/// starts only while its commit is still the newest its branch has seen
/// (`Store::branch_head`): the fleet never ends on an older commit because
/// queued deployments started out of order.
#[derive(Clone, Debug)]
pub struct PushSource {
    /// `github`, `pull`.
    pub kind: String,
    pub branch: String,
    pub commit: String,
}

impl PushSource {
    /// How deployments of this source are recorded (`github:main`).
    pub fn name(&self) -> String {
        format!("{}:{}", self.kind, self.branch)
    }
}

impl Engine {
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
        let id = self
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
                source: request.source.as_ref().map(PushSource::name),
            })
            .await?;
        if let Some(source) = &request.source {
            let why = format!("superseded by #{id}, a newer push of {}", source.branch);
            self.store
                .supersede_queued(&source.name(), id, &why)
                .await?;
        }
        Ok(id)
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
        let queue_recorder = queued.map(|id| Recorder::new(self.store.clone(), id, sink.clone()));
        let prepared = async {
            self.preamble().await?;
            prepare::prepare(
                self.fleet(),
                &request.selection,
                &request.options,
                Purpose::DEPLOY,
            )
            .await
        }
        .await;
        match prepared {
            Ok(prepared) => {
                let strategy = request.options.strategy.as_str().to_string();
                self.run_prepared(queue_recorder, &request, prepared, strategy, sink, cancel)
                    .await
            }
            Err(e) => Err(self.refuse(queue_recorder.as_ref(), e).await),
        }
    }

    /// A request refused before it ran. A queued one is recorded already:
    /// it ends `failed` with the reason (or `superseded`, when a newer push
    /// came first).
    async fn refuse(&self, queue_recorder: Option<&Recorder>, e: EngineError) -> EngineError {
        match (queue_recorder, &e) {
            (Some(recorder), EngineError::Superseded(why)) => {
                let _ = recorder.log(None, why.clone()).await;
                let _ = self
                    .end(recorder, DeploymentStatus::Superseded, Some(why.clone()))
                    .await;
                e
            }
            (Some(recorder), _) => self.fail(recorder, "refused", e).await,
            (None, _) => e,
        }
    }

    /// A validated request (`prepared`), recorded as `strategy` (queued
    /// already when `queue_recorder` is given): its windows, leases, record,
    /// then its execution.
    pub(super) async fn run_prepared(
        &self,
        queue_recorder: Option<Recorder>,
        request: &DeployRequest,
        prepared: Prepared,
        strategy: String,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<Deployment, EngineError> {
        let queued = queue_recorder.as_ref().map(Recorder::deployment_id);
        let refused = async |e: EngineError| self.refuse(queue_recorder.as_ref(), e).await;
        let options = &request.options;
        if let Err(e) = gates::refuse_outside_windows(&self.config.policy, &prepared.hosts, options)
        {
            prepared.discard().await;
            return Err(refused(e).await);
        }
        let flake_rev = prepared.revision.clone();
        let host_names = prepared.host_names();
        if let Some(id) = queued
            && let Err(e) = self.store.set_waiting_for(id, &host_names).await
        {
            prepared.discard().await;
            return Err(refused(e.into()).await);
        }
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
        // Its hosts are ours now; a push that is not the newest any more
        // does not start.
        if let Err(e) = self.still_newest(queued, request.source.as_ref()).await {
            leases.release().await;
            prepared.discard().await;
            return Err(refused(e).await);
        }
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
                        source: request.source.as_ref().map(PushSource::name),
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
        let executed = async {
            // What it deploys is fixed before anything is touched.
            let pinned = prepared.pinned();
            recorder::durably(|| self.store.pin_deployment(id, &pinned)).await?;
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
            execution::execute(self.fleet(), prepared, options, &recorder, &leases, &cancel).await
        }
        .await;
        // Ended and recorded before its hosts are free for another run.
        let result = match executed {
            Ok(executed) => {
                self.finish_executed(&recorder, Vec::new(), executed, &cancel)
                    .await
            }
            Err(e) => Err(self.fail(&recorder, "failed", e).await),
        };
        leases.release().await;
        result
    }

    /// A pushed deployment starts only while its commit is the newest of
    /// its branch, and while no newer push superseded it.
    async fn still_newest(
        &self,
        queued: Option<i64>,
        source: Option<&PushSource>,
    ) -> Result<(), EngineError> {
        if let Some(id) = queued
            && let Some(why) = self.store.superseded_by(id).await?
        {
            return Err(EngineError::Superseded(why));
        }
        let Some(source) = source else {
            return Ok(());
        };
        match self.store.branch_head(&source.branch).await? {
            Some(head) if head.commit != source.commit => Err(EngineError::Superseded(format!(
                "superseded: {} is at {} now, newer than {}",
                source.branch, head.commit, source.commit
            ))),
            _ => Ok(()),
        }
    }
}
