//! The engine: evaluate, probe, plan and deploy, recording everything.
//!
//! One deployment is owned by one call of [`Engine::deploy`]. It validates the
//! request (evaluation, selection, dependency graph) before recording
//! anything, probes the selected hosts in parallel (bounded), asks the pure
//! planner what to do, then executes the plan: a host starts as soon as every
//! host it `waits_for` finished healthy, at most `parallel_limit` at a time.
//! Every state change is written to the [`Store`] before it is sent to the
//! event sink (the CLI's progress display, later the API's stream).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::events::{
    DeploymentStatus, Event, EventKind, HostState, HostStatus, Step, SystemRef, now_ms,
};
use crate::inventory::{Host, Inventory, InventoryError, Selection};
use crate::nix::{Nix, NixError};
use crate::plan::{
    self, Action, DependencyGraph, GraphHost, HostFacts, HostHistory, Plan, PlanError, PlanOptions,
    PlannedHost, Strategy,
};
use crate::remote::{self, Activation, ProbeResult};
use crate::ssh::{self, Connection, SshOptions};
use crate::store::{HostRun, NewDeployment, StepTiming, Store, StoreError};
use crate::summary::{self, ChangeSummary};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be carried out as given; nothing was touched.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Eval(NixError),
    #[error(transparent)]
    Plan(#[from] PlanError),
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
                | EngineError::BadOption(_)
                | EngineError::Busy { .. }
        )
    }
}

/// Everything a run needs to know, decided once at the edge (CLI or API).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub flake: String,
    pub nix: Nix,
    pub ssh: SshOptions,
    /// Hosts probed at once.
    pub probe_limit: usize,
    pub activation_timeout: Duration,
    /// Overall deadline of a host's health validation.
    pub health_timeout: Duration,
    /// How long the watchdog on a host waits for confirmation before reverting.
    pub confirm_timeout: Duration,
    /// Pre-flight: free space `/nix/store` must have, in KiB.
    pub min_free_kib: u64,
    /// Skip pre-flight and health checks (never the current-system check).
    pub skip_validation: bool,
    pub substitute_on_destination: bool,
}

impl EngineConfig {
    pub fn new(flake: String, ssh: SshOptions) -> Self {
        EngineConfig {
            flake,
            nix: Nix::default(),
            ssh,
            probe_limit: 64,
            activation_timeout: Duration::from_secs(600),
            health_timeout: Duration::from_secs(120),
            confirm_timeout: Duration::from_secs(30),
            min_free_kib: 1024 * 1024,
            skip_validation: false,
            substitute_on_destination: false,
        }
    }
}

/// One deployment request.
#[derive(Clone, Debug, Default)]
pub struct DeployRequest {
    pub selection: Selection,
    /// Wait for busy hosts instead of refusing.
    pub wait: bool,
    pub options: PlanOptions,
    pub trigger: String,
    pub requested_by: String,
}

/// A host as probed.
#[derive(Clone, Debug, Serialize)]
pub struct Assessment {
    pub host: Host,
    pub state: HostState,
    pub current: SystemRef,
    pub probe: Option<ProbeResult>,
    pub error: Option<String>,
}

/// What `plan` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanReport {
    pub flake: String,
    pub fleet_size: usize,
    #[serde(flatten)]
    pub plan: Plan,
    pub to_deploy: Vec<String>,
    pub skipped: Vec<String>,
    pub unreachable: Vec<String>,
}

/// How a deployment ended.
#[derive(Clone, Debug, Serialize)]
pub struct DeployReport {
    pub id: i64,
    pub status: DeploymentStatus,
    pub flake: String,
    pub strategy: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub error: Option<String>,
    pub hosts: Vec<HostRun>,
}

impl DeployReport {
    pub fn any_failure(&self) -> bool {
        self.hosts.iter().any(|h| h.status.is_failure())
    }
}

/// Writes events to the store, then hands them to whoever watches.
#[derive(Clone)]
struct Recorder {
    store: Store,
    deployment_id: i64,
    sink: Option<mpsc::UnboundedSender<Event>>,
}

impl Recorder {
    async fn emit(&self, host: Option<&str>, kind: EventKind) -> Result<(), StoreError> {
        let event = self
            .store
            .append_event(self.deployment_id, host, kind)
            .await?;
        if let Some(sink) = &self.sink {
            // A watcher that went away does not stop the deployment.
            let _ = sink.send(event);
        }
        Ok(())
    }

    async fn log(&self, host: Option<&str>, message: String) -> Result<(), StoreError> {
        self.emit(host, EventKind::Log { message }).await
    }
}

/// The request, validated: what every later stage works from.
struct Prepared {
    inventory: Inventory,
    graph: DependencyGraph,
    hosts: Vec<Host>,
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

    fn check_options(&self, options: &PlanOptions) -> Result<(), EngineError> {
        if options.parallel_limit == 0 {
            return Err(EngineError::BadOption(
                "--parallel-limit must be at least 1".into(),
            ));
        }
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
    /// recorded or touched: the flake, the selection, the dependency graph and
    /// the canaries.
    async fn prepare(
        &self,
        selection: &Selection,
        options: &PlanOptions,
    ) -> Result<Prepared, EngineError> {
        self.check_options(options)?;
        let inventory = self.inventory().await?;
        let graph = DependencyGraph::build(
            &inventory
                .hosts()
                .map(|h| GraphHost {
                    name: h.name.clone(),
                    tags: h.tags.clone(),
                    dependencies: h.dependencies.clone(),
                })
                .collect::<Vec<_>>(),
        )?;
        let names = inventory.select(selection)?;
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
        })
    }

    /// Probe hosts in parallel. Returns each assessment and its open connection.
    async fn probe_all(
        &self,
        hosts: Vec<Host>,
        recorder: Option<&Recorder>,
    ) -> Result<Vec<(Assessment, Option<Connection>)>, EngineError> {
        let semaphore = Arc::new(Semaphore::new(self.config.probe_limit.max(1)));
        let mut tasks = JoinSet::new();
        for (index, host) in hosts.into_iter().enumerate() {
            let semaphore = semaphore.clone();
            let options = self.config.ssh.clone();
            tasks.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                (index, probe_host(host, &options).await)
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (index, (assessment, connection)) =
                joined.map_err(|e| EngineError::Internal(format!("probe task failed: {e}")))?;
            self.store
                .record_probe(
                    &assessment.host.name,
                    &assessment.current,
                    assessment.error.as_deref(),
                )
                .await?;
            if let Some(recorder) = recorder {
                recorder
                    .emit(
                        Some(&assessment.host.name),
                        EventKind::HostProbed {
                            state: assessment.state,
                            probe: assessment.probe.clone(),
                            error: assessment.error.clone(),
                        },
                    )
                    .await?;
            }
            results.push((index, assessment, connection));
        }
        results.sort_by_key(|(index, _, _)| *index);
        Ok(results.into_iter().map(|(_, a, c)| (a, c)).collect())
    }

    async fn facts(
        &self,
        assessment: &Assessment,
        summary: Option<ChangeSummary>,
    ) -> Result<HostFacts, EngineError> {
        Ok(HostFacts {
            name: assessment.host.name.clone(),
            role: assessment.host.role.clone(),
            state: assessment.state,
            current: assessment.current.clone(),
            target_path: assessment.host.toplevel.clone(),
            probe_error: assessment.error.clone(),
            summary,
            history: self.history(&assessment.host.name).await?,
        })
    }

    async fn history(&self, host: &str) -> Result<HostHistory, EngineError> {
        let runs = self.store.recent_host_runs(host, 10).await?;
        let fleet = self.store.recent_successful_durations(200).await?;
        Ok(HostHistory {
            successful_ms: runs
                .iter()
                .filter(|r| r.status == HostStatus::Deployed)
                .filter_map(|r| r.duration_ms())
                .map(|ms| ms.max(0) as u64)
                .collect(),
            recent_failures: runs
                .iter()
                .take(5)
                .filter(|r| r.status.is_failure() && r.status != HostStatus::Unreachable)
                .count() as u32,
            fleet_median_ms: plan::median_ms(&fleet),
        })
    }

    /// What a deployment would do. Changes nothing on any host; with
    /// `summaries`, builds the changed toplevels locally to compare closures.
    pub async fn plan(
        &self,
        selection: &Selection,
        options: &PlanOptions,
        summaries: bool,
    ) -> Result<PlanReport, EngineError> {
        let prepared = self.prepare(selection, options).await?;
        let probed = self.probe_all(prepared.hosts, None).await?;
        let mut facts = Vec::new();
        for (assessment, connection) in probed {
            let summary = match (&connection, summaries, assessment.state) {
                (Some(connection), true, HostState::Changed) => {
                    let nix = &self.config.nix;
                    match nix.build(&assessment.host.drv_path, |_, _| {}).await {
                        Ok(built) => change_summary(nix, connection, &built).await.ok(),
                        Err(_) => None,
                    }
                }
                _ => None,
            };
            if let Some(connection) = connection {
                connection.close().await;
            }
            facts.push(self.facts(&assessment, summary).await?);
        }
        let plan = plan::plan(&facts, &prepared.graph, prepared.inventory.len(), options)?;
        Ok(plan_report(
            &self.config.flake,
            prepared.inventory.len(),
            plan,
        ))
    }

    /// Take the leases of `hosts` for `owner`, all or none. With `wait`, wait
    /// for busy hosts to be released.
    async fn lease_hosts(
        &self,
        hosts: &[String],
        owner: &str,
        wait: bool,
        cancel: &CancellationToken,
    ) -> Result<(), EngineError> {
        loop {
            let mut refused = None;
            for host in hosts {
                if let Err(holder) = self.store.try_lease(host, owner, None, LEASE_TTL).await? {
                    refused = Some((host.clone(), holder));
                    break;
                }
            }
            let Some((host, holder)) = refused else {
                return Ok(());
            };
            self.store.release_leases(owner).await?;
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

    /// Run a deployment to the end. `sink` receives every event after it is stored;
    /// `cancel` stops starting new hosts (running ones finish or roll back).
    pub async fn deploy(
        &self,
        request: DeployRequest,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<DeployReport, EngineError> {
        self.store.mark_interrupted().await?;
        let options = &request.options;
        let (prepared, flake_rev) = tokio::join!(
            self.prepare(&request.selection, options),
            self.config.nix.flake_revision(&self.config.flake)
        );
        let prepared = prepared?;
        let host_names: Vec<String> = prepared.hosts.iter().map(|h| h.name.clone()).collect();
        let owner = uuid::Uuid::new_v4().simple().to_string();
        self.lease_hosts(&host_names, &owner, request.wait, &cancel)
            .await?;
        let strategy = options.strategy.as_str().to_string();
        let created = self
            .store
            .create_deployment(&NewDeployment {
                trigger: request.trigger.clone(),
                requested_by: request.requested_by.clone(),
                flake: self.config.flake.clone(),
                flake_rev,
                strategy: strategy.clone(),
                options: options_to_json(options, &self.config),
                hosts: host_names.clone(),
            })
            .await;
        let id = match created {
            Ok(id) => id,
            Err(e) => {
                let _ = self.store.release_leases(&owner).await;
                return Err(e.into());
            }
        };
        let recorder = Recorder {
            store: self.store.clone(),
            deployment_id: id,
            sink,
        };
        let result = async {
            recorder
                .emit(
                    None,
                    EventKind::DeploymentStarted {
                        hosts: host_names,
                        strategy: strategy.clone(),
                    },
                )
                .await?;
            self.execute(
                id,
                prepared,
                options,
                &recorder,
                &owner,
                &cancel,
                BTreeMap::new(),
            )
            .await
        }
        .await;
        let _ = self.store.release_leases(&owner).await;
        result
    }

    /// Continue a cancelled, failed or interrupted deployment with the hosts
    /// not yet done, re-probing every one of them first.
    pub async fn resume(
        &self,
        id: Option<i64>,
        wait: bool,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<DeployReport, EngineError> {
        self.store.mark_interrupted().await?;
        let deployment = match id {
            Some(id) => self.store.deployment(id).await?,
            None => self.store.deployments(50).await?.into_iter().find(|d| {
                d.status != DeploymentStatus::Succeeded && d.status != DeploymentStatus::Running
            }),
        }
        .ok_or_else(|| {
            EngineError::BadOption(match id {
                Some(id) => format!("no deployment #{id}"),
                None => "no cancelled, failed or interrupted deployment to resume".into(),
            })
        })?;
        match deployment.status {
            DeploymentStatus::Running => {
                return Err(EngineError::BadOption(format!(
                    "deployment #{} is still running (pid {})",
                    deployment.id,
                    deployment.pid.unwrap_or(0)
                )));
            }
            DeploymentStatus::Succeeded => {
                return Err(EngineError::BadOption(format!(
                    "deployment #{} succeeded; there is nothing to resume",
                    deployment.id
                )));
            }
            _ => {}
        }
        if deployment.flake != self.config.flake {
            return Err(EngineError::BadOption(format!(
                "deployment #{} was made from --flake {}; resume it with the same flake",
                deployment.id, deployment.flake
            )));
        }
        let options = options_from_json(&deployment.options)?;
        let done: BTreeMap<String, HostRun> = self
            .store
            .host_runs(deployment.id)
            .await?
            .into_iter()
            .filter(|r| {
                r.status == HostStatus::Deployed
                    || (r.status == HostStatus::Skipped && r.changed == Some(false))
            })
            .map(|r| (r.host.clone(), r))
            .collect();
        let remaining: Vec<String> = deployment
            .hosts
            .iter()
            .filter(|h| !done.contains_key(*h))
            .cloned()
            .collect();
        let selection = Selection {
            names: remaining.clone(),
            ..Selection::default()
        };
        let prepared = if remaining.is_empty() {
            None
        } else {
            Some(self.prepare(&selection, &options).await?)
        };
        // Activations the dead coordinator never confirmed are still armed on
        // their hosts; let their watchdogs settle before we look at the hosts.
        let unsettled: Vec<(Host, String)> = match &prepared {
            Some(p) => self
                .store
                .host_runs(deployment.id)
                .await?
                .into_iter()
                .filter(|r| r.status == HostStatus::Interrupted)
                .filter_map(|r| {
                    let host = p.inventory.get(&r.host)?.clone();
                    Some((host, r.token?))
                })
                .collect(),
            None => Vec::new(),
        };
        let confirm_timeout = deployment
            .options
            .get("confirm_timeout_s")
            .and_then(|v| v.as_u64())
            .map(Duration::from_secs)
            .unwrap_or(self.config.confirm_timeout);
        let owner = uuid::Uuid::new_v4().simple().to_string();
        self.lease_hosts(&remaining, &owner, wait, &cancel).await?;
        self.store.reopen_deployment(deployment.id).await?;
        let recorder = Recorder {
            store: self.store.clone(),
            deployment_id: deployment.id,
            sink,
        };
        let result = async {
            recorder
                .emit(
                    None,
                    EventKind::DeploymentStarted {
                        hosts: remaining.clone(),
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
                        remaining.len(),
                        remaining.join(", ")
                    ),
                )
                .await?;
            for (host, token) in &unsettled {
                self.settle_watchdog(&recorder, host, token, confirm_timeout)
                    .await?;
            }
            match prepared {
                Some(prepared) => {
                    self.execute(
                        deployment.id,
                        prepared,
                        &options,
                        &recorder,
                        &owner,
                        &cancel,
                        done,
                    )
                    .await
                }
                None => {
                    self.finish(
                        deployment.id,
                        &recorder,
                        done.into_values().collect(),
                        None,
                        &cancel,
                    )
                    .await
                }
            }
        }
        .await;
        let _ = self.store.release_leases(&owner).await;
        result
    }

    /// Wait until the activator of an interrupted host run has finished and its
    /// watchdog has decided (confirmed or reverted), so the probe that follows
    /// sees what the host will keep running.
    async fn settle_watchdog(
        &self,
        recorder: &Recorder,
        host: &Host,
        token: &str,
        confirm_timeout: Duration,
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
        let deadline = Instant::now()
            + self.config.activation_timeout
            + confirm_timeout
            + Duration::from_secs(30);
        loop {
            let result = connection
                .run(
                    "resume",
                    &remote::watchdog_result_argv(token),
                    self.config.ssh.command_timeout,
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
                            self.config.ssh.command_timeout,
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
                                self.config.ssh.command_timeout,
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

    /// Probe, plan and execute `prepared` under deployment `id`. `done` are
    /// host runs of an earlier attempt that count towards the result.
    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        id: i64,
        prepared: Prepared,
        options: &PlanOptions,
        recorder: &Recorder,
        owner: &str,
        cancel: &CancellationToken,
        done: BTreeMap<String, HostRun>,
    ) -> Result<DeployReport, EngineError> {
        // Keep our leases alive and listen for `nix-deploy cancel`.
        let watcher = {
            let store = self.store.clone();
            let owner = owner.to_string();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let _ = store.renew_leases(&owner, Some(id), LEASE_TTL).await;
                let mut tick = 0u32;
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    tick += 1;
                    if tick % 40 == 0 {
                        let _ = store.renew_leases(&owner, Some(id), LEASE_TTL).await;
                    }
                    if !cancel.is_cancelled() && store.cancel_requested(id).await.unwrap_or(false) {
                        cancel.cancel();
                    }
                }
            })
        };
        let result = self
            .execute_inner(id, prepared, options, recorder, cancel, done)
            .await;
        watcher.abort();
        result
    }

    async fn execute_inner(
        &self,
        id: i64,
        prepared: Prepared,
        options: &PlanOptions,
        recorder: &Recorder,
        cancel: &CancellationToken,
        done: BTreeMap<String, HostRun>,
    ) -> Result<DeployReport, EngineError> {
        let strategy = options.strategy.as_str().to_string();
        let probed = self.probe_all(prepared.hosts, Some(recorder)).await?;
        let mut facts = Vec::new();
        for (assessment, _) in &probed {
            facts.push(self.facts(assessment, None).await?);
        }
        let plan = match plan::plan(&facts, &prepared.graph, prepared.inventory.len(), options) {
            Ok(plan) => plan,
            Err(e) => {
                for (_, connection) in probed {
                    if let Some(c) = connection {
                        c.close().await;
                    }
                }
                self.store
                    .finish_deployment(id, DeploymentStatus::Failed, Some(&e.to_string()))
                    .await?;
                return Err(e.into());
            }
        };
        self.store
            .set_plan(id, &serde_json::to_value(&plan).unwrap_or_default())
            .await?;
        recorder
            .emit(
                None,
                EventKind::Planned {
                    strategy: strategy.clone(),
                    reason: plan.strategy_reason.clone(),
                    phases: plan.phases.iter().map(|p| p.hosts.clone()).collect(),
                    eta_seconds: plan.eta_seconds,
                    risk: plan.risk.as_str().into(),
                },
            )
            .await?;
        for warning in &plan.warnings {
            recorder.log(None, format!("warning: {warning}")).await?;
        }

        let context = Arc::new(HostContext {
            nix: self.config.nix.clone(),
            ssh: self.config.ssh.clone(),
            activation_timeout: self.config.activation_timeout,
            health_timeout: self.config.health_timeout,
            confirm_timeout: self.config.confirm_timeout,
            min_free_kib: self.config.min_free_kib,
            skip_validation: self.config.skip_validation,
            force: options.force,
            substitute: self.config.substitute_on_destination,
            recorder: recorder.clone(),
        });
        let mut execution = Execution {
            context,
            plan: &plan,
            options,
            store: &self.store,
            recorder,
            runs: BTreeMap::new(),
            outcome: BTreeMap::new(),
            connections: BTreeMap::new(),
            assessments: BTreeMap::new(),
            aborted: None,
        };
        let result = execution.run(probed, cancel).await;
        let connections = std::mem::take(&mut execution.connections);
        for (_, connection) in connections {
            connection.close().await;
        }
        if let Err(error) = result {
            let _ = self
                .store
                .finish_deployment(id, DeploymentStatus::Failed, Some(&error.to_string()))
                .await;
            return Err(error);
        }
        let mut hosts: Vec<HostRun> = done.into_values().collect();
        hosts.extend(execution.runs.into_values());
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        self.finish(id, recorder, hosts, execution.aborted.clone(), cancel)
            .await
    }

    /// Record how the deployment ended and build its report.
    async fn finish(
        &self,
        id: i64,
        recorder: &Recorder,
        hosts: Vec<HostRun>,
        error: Option<String>,
        cancel: &CancellationToken,
    ) -> Result<DeployReport, EngineError> {
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
        let row = self.store.deployment(id).await?;
        Ok(DeployReport {
            id,
            status,
            flake: self.config.flake.clone(),
            strategy: row.as_ref().map(|d| d.strategy.clone()).unwrap_or_default(),
            started_at: row.as_ref().map(|d| d.created_at).unwrap_or_default(),
            finished_at: now_ms(),
            error,
            hosts,
        })
    }

    /// `nix-deploy rollback HOST [--to-generation N]`: switch a host back to an
    /// earlier generation on request, verified and recorded like a deployment.
    pub async fn rollback(
        &self,
        host_name: &str,
        to_generation: Option<u32>,
        requested_by: &str,
        sink: Option<mpsc::UnboundedSender<Event>>,
    ) -> Result<DeployReport, EngineError> {
        self.store.mark_interrupted().await?;
        let inventory = self.inventory().await?;
        let host =
            inventory
                .get(host_name)
                .cloned()
                .ok_or_else(|| InventoryError::UnknownHost {
                    name: host_name.to_string(),
                    known: inventory
                        .hosts()
                        .map(|h| h.name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        let never = CancellationToken::new();
        let owner = uuid::Uuid::new_v4().simple().to_string();
        self.lease_hosts(std::slice::from_ref(&host.name), &owner, false, &never)
            .await?;
        let result = self
            .rollback_leased(&host, to_generation, requested_by, sink)
            .await;
        let _ = self.store.release_leases(&owner).await;
        result
    }

    async fn rollback_leased(
        &self,
        host: &Host,
        to_generation: Option<u32>,
        requested_by: &str,
        sink: Option<mpsc::UnboundedSender<Event>>,
    ) -> Result<DeployReport, EngineError> {
        let (assessment, connection) = probe_host(host.clone(), &self.config.ssh).await;
        let Some(connection) = connection else {
            return Err(EngineError::Unreachable(
                assessment
                    .error
                    .unwrap_or_else(|| format!("{}: unreachable", host.name)),
            ));
        };
        let timeout = self.config.ssh.command_timeout;
        let listing = connection
            .run("rollback", &remote::list_generations_argv(), timeout)
            .await;
        let generations = listing
            .map(|o| remote::parse_generations(&o.stdout))
            .unwrap_or_default();
        let current = assessment.current.generation;
        let target = match to_generation {
            Some(n) if generations.contains(&n) => n,
            Some(n) => {
                connection.close().await;
                return Err(EngineError::BadOption(format!(
                    "{} has no generation {n} (it has {})",
                    host.name,
                    generations
                        .iter()
                        .map(|g| g.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            None => match generations.iter().rev().find(|g| Some(**g) < current) {
                Some(g) => *g,
                None => {
                    connection.close().await;
                    return Err(EngineError::BadOption(format!(
                        "{} has no generation before {} to roll back to",
                        host.name,
                        current.map(|g| g.to_string()).unwrap_or("-".into())
                    )));
                }
            },
        };
        let id = self
            .store
            .create_deployment(&NewDeployment {
                trigger: "cli".into(),
                requested_by: requested_by.to_string(),
                flake: self.config.flake.clone(),
                flake_rev: None,
                strategy: "rollback".into(),
                options: serde_json::json!({ "host": host.name, "to_generation": target }),
                hosts: vec![host.name.clone()],
            })
            .await?;
        let recorder = Recorder {
            store: self.store.clone(),
            deployment_id: id,
            sink,
        };
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
            activation_timeout: self.config.activation_timeout,
            health_timeout: self.config.health_timeout,
            confirm_timeout: self.config.confirm_timeout,
            min_free_kib: 0,
            skip_validation: self.config.skip_validation,
            force: true,
            substitute: false,
            recorder: recorder.clone(),
        };
        let mut run = HostRun::new(id, &host.name);
        run.status = HostStatus::Running;
        run.changed = Some(true);
        run.from = assessment.current.clone();
        run.to.generation = Some(target);
        run.reason = Some(format!("rollback to generation {target} on request"));
        run.started_at = Some(now_ms());
        self.store.save_host_run(&run).await?;
        let checks = context.checks(host);
        let health_timeout = self.config.health_timeout;
        let work = async {
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
                .map_err(|e| e.to_string())?;
            let path = link.stdout.trim().to_string();
            roll_back(&connection, target, &path).await?;
            crate::health::validate(&connection, &checks, health_timeout)
                .await
                .map_err(|(m, _)| format!("{}: rollback: {m}", host.name))?;
            Ok::<String, String>(path)
        };
        let outcome = context.step(&mut run, Step::Rollback, work).await?;
        run.finished_at = Some(now_ms());
        run.step = None;
        match outcome {
            Ok(path) => {
                run.status = HostStatus::Deployed;
                run.to.path = Some(path);
            }
            Err(e) => {
                run.status = HostStatus::RollbackFailed;
                run.error = Some(e);
            }
        }
        connection.close().await;
        self.store.save_host_run(&run).await?;
        self.store.record_host_result(&run).await?;
        recorder
            .emit(
                Some(&run.host),
                EventKind::HostFinished {
                    status: run.status,
                    from: run.from.clone(),
                    to: run.to.clone(),
                    duration_ms: run.duration_ms().unwrap_or(0).max(0) as u64,
                    error: run.error.clone(),
                },
            )
            .await?;
        self.finish(id, &recorder, vec![run], None, &CancellationToken::new())
            .await
    }
}

/// A host's health right now, for `POST /hosts/{host}/health` and `just health-check`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostHealth {
    pub host: String,
    pub reachable: bool,
    pub current: SystemRef,
    /// Whether it runs what the flake evaluates to.
    pub state: HostState,
    pub healthy: bool,
    pub results: Vec<crate::health::CheckResult>,
    pub error: Option<String>,
}

impl Engine {
    /// Probe one host and run its health checks once (retrying within `within`).
    pub async fn check_health(
        &self,
        host_name: &str,
        within: Duration,
    ) -> Result<HostHealth, EngineError> {
        let inventory = self.inventory().await?;
        let host =
            inventory
                .get(host_name)
                .cloned()
                .ok_or_else(|| InventoryError::UnknownHost {
                    name: host_name.to_string(),
                    known: inventory
                        .hosts()
                        .map(|h| h.name.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        let (assessment, connection) = probe_host(host.clone(), &self.config.ssh).await;
        let Some(connection) = connection else {
            return Ok(HostHealth {
                host: host.name,
                reachable: false,
                current: assessment.current,
                state: assessment.state,
                healthy: false,
                results: Vec::new(),
                error: assessment.error,
            });
        };
        let outcome = crate::health::validate(&connection, &host.health_checks, within).await;
        connection.close().await;
        let (healthy, results, error) = match outcome {
            Ok(results) => (true, results, None),
            Err((message, results)) => (false, results, Some(message)),
        };
        Ok(HostHealth {
            host: host.name,
            reachable: true,
            current: assessment.current,
            state: assessment.state,
            healthy,
            results,
            error,
        })
    }
}

/// How long a lease lasts without renewal (renewed every 10 s while working).
const LEASE_TTL: Duration = Duration::from_secs(60);

/// The request's options as stored with the deployment (and read back by `resume`).
fn options_to_json(options: &PlanOptions, config: &EngineConfig) -> serde_json::Value {
    serde_json::json!({
        "strategy": options.strategy.as_str(),
        "force": options.force,
        "parallel_limit": options.parallel_limit,
        "batch_size": options.batch_size.to_string(),
        "canaries": options.canaries,
        "canary_soak_s": options.canary_soak.as_secs(),
        "max_failures": options.max_failures.to_string(),
        "continue_on_failure": options.continue_on_failure,
        "rollback_all_on_abort": options.rollback_all_on_abort,
        "activation_timeout_s": config.activation_timeout.as_secs(),
        "health_timeout_s": config.health_timeout.as_secs(),
        "confirm_timeout_s": config.confirm_timeout.as_secs(),
        "skip_validation": config.skip_validation,
    })
}

fn options_from_json(json: &serde_json::Value) -> Result<PlanOptions, EngineError> {
    let text = |key: &str| json.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let flag =
        |key: &str, default: bool| json.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
    let number = |key: &str| json.get(key).and_then(|v| v.as_u64());
    let defaults = PlanOptions::default();
    let (strategy, _) = Strategy::parse(&text("strategy").unwrap_or_else(|| "smart".into()))?;
    Ok(PlanOptions {
        strategy,
        force: flag("force", false),
        parallel_limit: number("parallel_limit")
            .map(|n| n as usize)
            .unwrap_or(defaults.parallel_limit),
        batch_size: match text("batch_size") {
            Some(b) => plan::Amount::parse(&b)?,
            None => defaults.batch_size,
        },
        canaries: json
            .get("canaries")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        canary_soak: number("canary_soak_s")
            .map(Duration::from_secs)
            .unwrap_or(defaults.canary_soak),
        max_failures: match text("max_failures") {
            Some(m) => plan::Amount::parse(&m)?,
            None => defaults.max_failures,
        },
        continue_on_failure: flag("continue_on_failure", false),
        rollback_all_on_abort: flag("rollback_all_on_abort", true),
        ..defaults
    })
}

fn plan_report(flake: &str, fleet_size: usize, plan: Plan) -> PlanReport {
    let names = |action: Action| {
        plan.hosts
            .iter()
            .filter(|h| h.action == action)
            .map(|h| h.name.clone())
            .collect()
    };
    PlanReport {
        flake: flake.to_string(),
        fleet_size,
        to_deploy: names(Action::Deploy),
        skipped: names(Action::Skip),
        unreachable: names(Action::Unreachable),
        plan,
    }
}

/// Connect and probe one host. Never fails: an unreachable host is a result.
async fn probe_host(host: Host, options: &SshOptions) -> (Assessment, Option<Connection>) {
    let unreachable = |host: Host, error: String| Assessment {
        host,
        state: HostState::Unreachable,
        current: SystemRef::default(),
        probe: None,
        error: Some(error),
    };
    let connection = match Connection::connect(&host.name, &host.target, options).await {
        Ok(c) => c,
        Err(e) => return (unreachable(host, e.to_string()), None),
    };
    let output = match connection
        .run("probe", &remote::probe_argv(), options.command_timeout)
        .await
    {
        Ok(o) => o,
        Err(e) => {
            connection.close().await;
            return (unreachable(host, e.to_string()), None);
        }
    };
    match remote::parse_probe(&output.stdout) {
        Ok(probe) => {
            let state = plan::classify(probe.current_system.as_deref(), &host.toplevel);
            let current = SystemRef {
                path: probe.current_system.clone(),
                generation: probe.generation,
            };
            (
                Assessment {
                    host,
                    state,
                    current,
                    probe: Some(probe),
                    error: None,
                },
                Some(connection),
            )
        }
        Err(e) => {
            connection.close().await;
            let error = format!("{}: probe: {e}", host.name);
            (unreachable(host, error), None)
        }
    }
}

/// Compare the closure of `built` (the host's new toplevel, already built
/// locally) with the one the host runs (queried on the host; nothing is copied).
async fn change_summary(
    nix: &Nix,
    connection: &Connection,
    built: &str,
) -> Result<ChangeSummary, String> {
    let new = nix.closure(built).await.map_err(|e| e.to_string())?;
    let old = match connection
        .run(
            "summary",
            &remote::closure_argv("/run/current-system"),
            Duration::from_secs(120),
        )
        .await
    {
        Ok(out) => out
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        // A host with no system yet has no closure to compare with.
        Err(_) => Vec::new(),
    };
    Ok(summary::summarize(&old, &new))
}

/// How one host's part ended, as the scheduler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Deployed (or, in blue-green, staged) and healthy.
    Healthy,
    /// Failed, rolled back, unreachable, skipped or cancelled.
    NotHealthy,
}

/// One deployment's execution of its plan.
struct Execution<'a> {
    context: Arc<HostContext>,
    plan: &'a Plan,
    options: &'a PlanOptions,
    store: &'a Store,
    recorder: &'a Recorder,
    runs: BTreeMap<String, HostRun>,
    outcome: BTreeMap<String, Outcome>,
    /// Open connections of hosts we may need again (rollback, commit).
    connections: BTreeMap<String, Connection>,
    assessments: BTreeMap<String, Assessment>,
    /// Why the deployment stopped starting hosts.
    aborted: Option<String>,
}

type HostTaskResult = Result<(HostRun, Connection, Outcome), StoreError>;

impl Execution<'_> {
    async fn finish_host(&mut self, run: HostRun) -> Result<(), StoreError> {
        self.store.save_host_run(&run).await?;
        self.store.record_host_result(&run).await?;
        self.recorder
            .emit(
                Some(&run.host),
                EventKind::HostFinished {
                    status: run.status,
                    from: run.from.clone(),
                    to: run.to.clone(),
                    duration_ms: run.duration_ms().unwrap_or(0).max(0) as u64,
                    error: run.error.clone(),
                },
            )
            .await?;
        self.runs.insert(run.host.clone(), run);
        Ok(())
    }

    /// Finish a host that never started.
    async fn skip(
        &mut self,
        mut run: HostRun,
        status: HostStatus,
        reason: String,
    ) -> Result<(), StoreError> {
        run.status = status;
        run.reason = Some(reason);
        run.started_at = Some(now_ms());
        run.finished_at = run.started_at;
        if run.to.generation.is_none()
            && status == HostStatus::Skipped
            && run.changed == Some(false)
        {
            run.to = run.from.clone();
        }
        self.outcome.insert(run.host.clone(), Outcome::NotHealthy);
        self.finish_host(run).await
    }

    fn failures(&self) -> usize {
        self.runs
            .values()
            .filter(|r| {
                matches!(
                    r.status,
                    HostStatus::Failed | HostStatus::RolledBack | HostStatus::RollbackFailed
                )
            })
            .count()
    }

    async fn run(
        &mut self,
        probed: Vec<(Assessment, Option<Connection>)>,
        cancel: &CancellationToken,
    ) -> Result<(), EngineError> {
        // Hosts the plan does not deploy finish now; the others wait their turn.
        let mut pending: Vec<(PlannedHost, Assessment, Connection, HostRun)> = Vec::new();
        for (assessment, connection) in probed {
            let planned = self
                .plan
                .get(&assessment.host.name)
                .cloned()
                .ok_or_else(|| {
                    EngineError::Internal(format!("{} missing from the plan", assessment.host.name))
                })?;
            let mut run = HostRun::new(self.recorder.deployment_id, &assessment.host.name);
            run.changed = Some(assessment.state == HostState::Changed);
            run.from = assessment.current.clone();
            run.to.path = Some(assessment.host.toplevel.clone());
            run.reason = planned.reason.clone();
            self.recorder
                .emit(
                    Some(&run.host),
                    EventKind::HostPlanned {
                        action: planned.action.as_str().into(),
                        reason: planned.reason.clone(),
                    },
                )
                .await?;
            match (planned.action, connection) {
                (Action::Deploy, Some(connection)) => {
                    self.store.save_host_run(&run).await?;
                    self.assessments
                        .insert(run.host.clone(), assessment.clone());
                    pending.push((planned, assessment, connection, run));
                }
                (action, connection) => {
                    if let Some(connection) = connection {
                        connection.close().await;
                    }
                    let status = if action == Action::Unreachable {
                        HostStatus::Unreachable
                    } else {
                        HostStatus::Skipped
                    };
                    run.error = assessment.error.clone();
                    let reason = planned.reason.clone().unwrap_or_default();
                    self.skip(run, status, reason).await?;
                }
            }
        }
        // Plan order: phase, then name.
        pending.sort_by(|a, b| (a.0.phase, &a.0.name).cmp(&(b.0.phase, &b.0.name)));

        let blue_green = self.plan.strategy == Strategy::BlueGreen;
        let activation = if blue_green {
            Activation::Test
        } else {
            Activation::Switch
        };
        let soak = (self.plan.strategy == Strategy::Canary).then_some(self.options.canary_soak);
        let max_failures = self.plan.max_failures;
        let mut running: JoinSet<HostTaskResult> = JoinSet::new();
        loop {
            // Hosts whose prerequisites did not end healthy are skipped, with the reason.
            let mut index = 0;
            while index < pending.len() {
                let blocker = pending[index]
                    .0
                    .waits_for
                    .iter()
                    .find(|w| self.outcome.get(*w) == Some(&Outcome::NotHealthy))
                    .cloned();
                if let Some(blocker) = blocker {
                    let (planned, _, connection, run) = pending.remove(index);
                    connection.close().await;
                    let status = self
                        .runs
                        .get(&blocker)
                        .map(|r| r.status.to_string())
                        .unwrap_or_default();
                    let what = if self.plan.get(&blocker).is_some_and(|p| p.canary)
                        && !planned.depends_on.contains(&blocker)
                    {
                        "canary"
                    } else if planned.depends_on.contains(&blocker) {
                        "dependency"
                    } else {
                        "previous batch host"
                    };
                    self.skip(
                        run,
                        HostStatus::Skipped,
                        format!("{what} {blocker} {status}"),
                    )
                    .await?;
                } else {
                    index += 1;
                }
            }
            // Start what is ready, up to the limit, unless stopping.
            if self.aborted.is_none() && !cancel.is_cancelled() {
                let mut index = 0;
                while index < pending.len() && running.len() < self.plan.parallel_limit {
                    let ready = pending[index]
                        .0
                        .waits_for
                        .iter()
                        .all(|w| self.outcome.get(w) == Some(&Outcome::Healthy));
                    if !ready {
                        index += 1;
                        continue;
                    }
                    let (planned, assessment, connection, run) = pending.remove(index);
                    let context = self.context.clone();
                    let soak = soak.filter(|_| planned.canary);
                    running.spawn(async move {
                        context
                            .host_task(assessment, connection, run, activation, soak)
                            .await
                    });
                }
            }
            if running.is_empty() {
                break;
            }
            let joined = running.join_next().await.expect("running is not empty");
            let (run, connection, outcome) = match joined {
                Ok(result) => result?,
                Err(e) => return Err(EngineError::Internal(format!("host task failed: {e}"))),
            };
            let host = run.host.clone();
            self.outcome.insert(host.clone(), outcome);
            self.connections.insert(host.clone(), connection);
            let canary_failed = outcome == Outcome::NotHealthy
                && self.plan.strategy == Strategy::Canary
                && self.plan.get(&host).is_some_and(|p| p.canary);
            if blue_green && outcome == Outcome::Healthy {
                // Staged, not finished: committed or reverted together below.
                self.store.save_host_run(&run).await?;
                self.runs.insert(host.clone(), run);
            } else {
                self.finish_host(run).await?;
            }
            if self.aborted.is_none() {
                if canary_failed {
                    self.aborted = Some(format!("canary {host} failed; the deployment stopped"));
                } else if let Some(allowed) = max_failures
                    && self.failures() > allowed
                {
                    self.aborted = Some(format!(
                        "{} host(s) failed, more than --max-failures allows ({allowed})",
                        self.failures()
                    ));
                }
                if let Some(reason) = &self.aborted {
                    self.recorder
                        .log(None, format!("aborting: {reason}"))
                        .await?;
                }
            }
        }

        // Whatever did not start.
        let stop_reason = match (&self.aborted, cancel.is_cancelled()) {
            (Some(reason), _) => Some((HostStatus::Skipped, format!("not started: {reason}"))),
            (None, true) => Some((
                HostStatus::Cancelled,
                "deployment cancelled before this host started".to_string(),
            )),
            (None, false) => None,
        };
        for (planned, _, connection, run) in pending {
            connection.close().await;
            let (status, reason) = stop_reason.clone().unwrap_or((
                HostStatus::Skipped,
                format!(
                    "waits for {} which did not finish",
                    planned.waits_for.join(", ")
                ),
            ));
            self.skip(run, status, reason).await?;
        }

        if blue_green {
            self.settle_blue_green().await?;
        } else if self.aborted.is_some() && self.options.rollback_all_on_abort {
            self.roll_back_deployed().await?;
        }
        Ok(())
    }

    /// Blue-green: commit every staged host if all are healthy, else revert all.
    async fn settle_blue_green(&mut self) -> Result<(), StoreError> {
        let staged: Vec<String> = self
            .runs
            .values()
            .filter(|r| r.status == HostStatus::Running)
            .map(|r| r.host.clone())
            .collect();
        let failed: Vec<String> = self
            .runs
            .values()
            .filter(|r| {
                r.status.is_failure()
                    || r.status == HostStatus::Skipped
                        && r.changed == Some(true)
                        && r.reason
                            .as_deref()
                            .is_some_and(|x| x.starts_with("not started"))
            })
            .map(|r| r.host.clone())
            .collect();
        let commit = failed.is_empty();
        if !commit {
            self.recorder
                .log(
                    None,
                    format!(
                        "blue-green: {} did not pass; every staged host goes back to its old system",
                        failed.join(", ")
                    ),
                )
                .await?;
        }
        for host in staged {
            let Some(mut run) = self.runs.remove(&host) else {
                continue;
            };
            let Some(connection) = self.connections.get(&host) else {
                continue;
            };
            let assessment = &self.assessments[&host];
            let context = self.context.clone();
            if commit {
                let path = assessment.host.toplevel.clone();
                let result = context
                    .step(
                        &mut run,
                        Step::Commit,
                        commit_system(connection, &path, context.activation_timeout),
                    )
                    .await?;
                run.finished_at = Some(now_ms());
                match result {
                    Ok(generation) => {
                        run.to.generation = generation;
                        run.status = HostStatus::Deployed;
                    }
                    Err(e) => {
                        run.status = HostStatus::Failed;
                        run.error = Some(e);
                    }
                }
            } else {
                let reverted = match (
                    assessment.current.generation,
                    assessment.current.path.clone(),
                ) {
                    (Some(generation), Some(path)) => {
                        context
                            .step(
                                &mut run,
                                Step::Rollback,
                                revert_test(connection, generation, &path),
                            )
                            .await?
                    }
                    _ => Err(format!("{host}: rollback: no previous system to return to")),
                };
                run.finished_at = Some(now_ms());
                match reverted {
                    Ok(()) => {
                        run.status = HostStatus::RolledBack;
                        run.error = Some(format!(
                            "blue-green: reverted to its old system because {} failed",
                            failed.join(", ")
                        ));
                    }
                    Err(e) => {
                        run.status = HostStatus::RollbackFailed;
                        run.error = Some(e);
                    }
                }
            }
            run.step = None;
            self.finish_host(run).await?;
        }
        Ok(())
    }

    /// After an abort: every host this deployment changed goes back.
    async fn roll_back_deployed(&mut self) -> Result<(), StoreError> {
        let deployed: Vec<String> = self
            .runs
            .values()
            .filter(|r| r.status == HostStatus::Deployed)
            .map(|r| r.host.clone())
            .collect();
        if deployed.is_empty() {
            return Ok(());
        }
        let reason = self.aborted.clone().unwrap_or_default();
        self.recorder
            .log(
                None,
                format!(
                    "rolling back {} because the deployment aborted",
                    deployed.join(", ")
                ),
            )
            .await?;
        for host in deployed {
            let Some(mut run) = self.runs.remove(&host) else {
                continue;
            };
            let assessment = &self.assessments[&host];
            let context = self.context.clone();
            let rolled = match (
                self.connections.get(&host),
                assessment.current.generation,
                assessment.current.path.clone(),
            ) {
                (Some(connection), Some(generation), Some(path)) => {
                    context
                        .step(
                            &mut run,
                            Step::Rollback,
                            roll_back(connection, generation, &path),
                        )
                        .await?
                }
                (_, None, _) | (_, _, None) => Err(format!(
                    "{host}: rollback: no previous generation (first deployment); left on the new system"
                )),
                (None, _, _) => Err(format!("{host}: rollback: no connection")),
            };
            run.finished_at = Some(now_ms());
            match rolled {
                Ok(()) => {
                    run.status = HostStatus::RolledBack;
                    run.error = Some(format!(
                        "deployed, then rolled back to generation {} because the deployment aborted: {reason}",
                        assessment.current.generation.unwrap_or_default()
                    ));
                }
                Err(e) => {
                    run.status = HostStatus::RollbackFailed;
                    run.error = Some(e);
                }
            }
            run.step = None;
            self.finish_host(run).await?;
        }
        Ok(())
    }
}

/// What a host task needs; shared by all host tasks of a deployment.
struct HostContext {
    nix: Nix,
    ssh: SshOptions,
    activation_timeout: Duration,
    health_timeout: Duration,
    confirm_timeout: Duration,
    min_free_kib: u64,
    skip_validation: bool,
    force: bool,
    substitute: bool,
    recorder: Recorder,
}

/// A step's failure, already phrased for the operator (names host and step).
type StepError = String;

/// Why a pipeline stopped.
enum Failure {
    /// Nothing on the host changed (pre-flight, build, copy or profile step failed).
    Untouched(StepError),
    /// The host was unhealthy before we touched it.
    Unhealthy(StepError),
    /// The profile or the running system changed: roll back.
    Activated(StepError),
    /// The new system runs but refuses new SSH connections: the watchdog reverts it.
    Unconfirmed(StepError),
}

impl HostContext {
    /// Run one step: record its start, run it, record its end.
    async fn step<T, E: std::fmt::Display>(
        &self,
        run: &mut HostRun,
        step: Step,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<Result<T, StepError>, StoreError> {
        let started = Instant::now();
        run.step = Some(step.as_str().into());
        run.steps.push(StepTiming {
            step,
            started_at: now_ms(),
            finished_at: None,
            ok: None,
        });
        self.recorder.store.save_host_run(run).await?;
        self.recorder
            .emit(Some(&run.host), EventKind::StepStarted { step })
            .await?;
        let result = work.await;
        let ok = result.is_ok();
        let message = result.as_ref().err().map(|e| {
            let text = e.to_string();
            // Errors from ssh already name host and step; others get them here.
            if text.starts_with(&format!("{}: ", run.host)) {
                text
            } else {
                format!("{}: {step}: {text}", run.host)
            }
        });
        if let Some(timing) = run.steps.last_mut() {
            timing.finished_at = Some(now_ms());
            timing.ok = Some(ok);
        }
        self.recorder.store.save_host_run(run).await?;
        self.recorder
            .emit(
                Some(&run.host),
                EventKind::StepFinished {
                    step,
                    ok,
                    duration_ms: started.elapsed().as_millis() as u64,
                    message: message.clone(),
                },
            )
            .await?;
        Ok(match result {
            Ok(value) => Ok(value),
            Err(_) => Err(message.unwrap_or_default()),
        })
    }

    /// One host's whole part: pipeline, rollback on failure, canary soak.
    async fn host_task(
        self: Arc<Self>,
        assessment: Assessment,
        mut connection: Connection,
        mut run: HostRun,
        activation: Activation,
        soak: Option<Duration>,
    ) -> HostTaskResult {
        let host = &assessment.host;
        run.status = HostStatus::Running;
        run.started_at = Some(now_ms());
        self.recorder.store.save_host_run(&run).await?;

        let mut outcome = self
            .pipeline(&assessment, &mut connection, &mut run, activation)
            .await?;
        if outcome.is_ok()
            && let Some(soak) = soak
        {
            let checks = self.checks(host);
            let soaked = self
                .step(
                    &mut run,
                    Step::Soak,
                    soak_host(&connection, host, &checks, soak, self.health_timeout),
                )
                .await?;
            if let Err(e) = soaked {
                outcome = Err(Failure::Activated(e));
            }
        }
        run.finished_at = Some(now_ms());
        let healthy = match outcome {
            Ok(()) => {
                if activation == Activation::Switch {
                    run.status = HostStatus::Deployed;
                }
                Outcome::Healthy
            }
            Err(Failure::Untouched(error)) => {
                run.status = HostStatus::Failed;
                run.error = Some(error);
                Outcome::NotHealthy
            }
            Err(Failure::Unhealthy(error)) => {
                run.status = HostStatus::Unhealthy;
                run.error = Some(error);
                Outcome::NotHealthy
            }
            Err(Failure::Activated(error)) => {
                self.recover(&assessment, &connection, &mut run, activation, error)
                    .await?;
                Outcome::NotHealthy
            }
            Err(Failure::Unconfirmed(error)) => {
                self.await_watchdog(&assessment, &connection, &mut run, error)
                    .await?;
                Outcome::NotHealthy
            }
        };
        run.finished_at = Some(now_ms());
        if run.status != HostStatus::Running {
            run.step = None;
        }
        Ok((run, connection, healthy))
    }

    /// The checks this run validates with (none with `--skip-validation`).
    fn checks(&self, host: &Host) -> Vec<crate::inventory::HealthCheck> {
        if self.skip_validation {
            Vec::new()
        } else {
            host.health_checks.clone()
        }
    }

    /// After a failure that changed the host: roll back if allowed and possible,
    /// then disarm the watchdog (the coordinator has taken care of the host).
    async fn recover(
        &self,
        assessment: &Assessment,
        connection: &Connection,
        run: &mut HostRun,
        activation: Activation,
        error: String,
    ) -> Result<(), StoreError> {
        let host = &assessment.host;
        let old = assessment.current.clone();
        let token = run.token.clone();
        let disarm = || async {
            if let Some(token) = &token {
                let _ = connection
                    .run_privileged(
                        "disarm",
                        &remote::confirm_argv(token),
                        Duration::from_secs(30),
                    )
                    .await;
            }
        };
        if !host.rollback_on_failure {
            disarm().await;
            run.status = HostStatus::Failed;
            run.error = Some(format!(
                "{error}\n(rollbackOnFailure is off: left as it is)"
            ));
            return Ok(());
        }
        let (Some(generation), Some(path)) = (old.generation, old.path.clone()) else {
            disarm().await;
            run.status = HostStatus::Failed;
            run.error = Some(format!(
                "{error}\nno previous generation to roll back to (first deployment)"
            ));
            return Ok(());
        };
        let checks = self.checks(host);
        let health_timeout = self.health_timeout;
        let work = async {
            if activation == Activation::Test {
                revert_test(connection, generation, &path).await?;
            } else {
                roll_back(connection, generation, &path).await?;
            }
            // The old system must be healthy again, too.
            crate::health::validate(connection, &checks, health_timeout)
                .await
                .map(|_| ())
                .map_err(|(message, _)| {
                    format!(
                        "{}: rollback: the old system is not healthy: {message}",
                        host.name
                    )
                })
        };
        let rollback = self.step(run, Step::Rollback, work).await?;
        run.finished_at = Some(now_ms());
        match rollback {
            Ok(()) => {
                disarm().await;
                run.status = HostStatus::RolledBack;
                run.error = Some(format!(
                    "{error}\nrolled back to generation {generation} ({path})"
                ));
            }
            Err(rollback_error) => {
                run.status = HostStatus::RollbackFailed;
                run.error = Some(format!("{error}\n{rollback_error}"));
            }
        }
        Ok(())
    }

    /// The new system could not be confirmed over a new connection: the
    /// watchdog on the host reverts it by itself. Wait for that and report
    /// what the host runs afterwards.
    async fn await_watchdog(
        &self,
        assessment: &Assessment,
        connection: &Connection,
        run: &mut HostRun,
        error: String,
    ) -> Result<(), StoreError> {
        let host = &assessment.host.name;
        let old = assessment.current.clone();
        let Some(token) = run.token.clone() else {
            run.status = HostStatus::Failed;
            run.error = Some(error);
            return Ok(());
        };
        let confirm_timeout = self.confirm_timeout;
        let work = async {
            // The watchdog fires `confirm_timeout` after activation ended; give it
            // time to switch back, then look through the connection we still have.
            let deadline = Instant::now() + confirm_timeout + Duration::from_secs(60);
            tokio::time::sleep(confirm_timeout).await;
            loop {
                let result = connection
                    .run(
                        "watchdog",
                        &remote::watchdog_result_argv(&token),
                        Duration::from_secs(10),
                    )
                    .await;
                match result {
                    Ok(out) if out.stdout.trim().starts_with("reverted") => break,
                    Ok(out) if out.stdout.trim() == "confirmed" => {
                        return Err(format!("{host}: watchdog: unexpectedly confirmed"));
                    }
                    Err(e) if e.is_connection() => {
                        return Err(format!(
                            "{host}: watchdog: cannot reach the host to verify ({e}); its watchdog reverts it to generation {} by itself",
                            old.generation.map(|g| g.to_string()).unwrap_or("-".into())
                        ));
                    }
                    _ => {}
                }
                if Instant::now() > deadline {
                    return Err(format!("{host}: watchdog: did not revert in time"));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            match &old.path {
                Some(path) => verify_current(connection, path).await,
                None => Ok(()),
            }
        };
        let outcome = self.step(run, Step::Rollback, work).await?;
        match outcome {
            Ok(()) => {
                run.status = HostStatus::RolledBack;
                run.error = Some(format!(
                    "{error}\nthe host's watchdog reverted it to generation {} by itself",
                    old.generation.map(|g| g.to_string()).unwrap_or("-".into())
                ));
            }
            Err(e) => {
                run.status = HostStatus::RollbackFailed;
                run.error = Some(format!("{error}\n{e}"));
            }
        }
        Ok(())
    }

    /// DESIGN §4 for one changed host: pre-flight, build, copy, profile (unless
    /// staging), activate (with the watchdog armed), validate, confirm.
    async fn pipeline(
        &self,
        assessment: &Assessment,
        connection: &mut Connection,
        run: &mut HostRun,
        activation: Activation,
    ) -> Result<Result<(), Failure>, StoreError> {
        let host = &assessment.host;
        let nix = &self.nix;

        if !self.skip_validation {
            let preflight = self.preflight(assessment, connection);
            match self.step(run, Step::Preflight, preflight).await? {
                Ok(()) => {}
                Err(e) if e.contains("unhealthy before") => return Ok(Err(Failure::Unhealthy(e))),
                Err(e) => return Ok(Err(Failure::Untouched(e))),
            }
        }

        let built = self
            .step(run, Step::Build, nix.build(&host.drv_path, |_, _| {}))
            .await?;
        let path = match built {
            Ok(path) if path == host.toplevel => path,
            Ok(other) => {
                return Ok(Err(Failure::Untouched(format!(
                    "{}: build: produced {other}, but the flake evaluated to {}",
                    host.name, host.toplevel
                ))));
            }
            Err(e) => return Ok(Err(Failure::Untouched(e))),
        };
        match change_summary(nix, connection, &path).await {
            Ok(summary) => {
                run.summary = serde_json::to_value(&summary).ok();
                self.recorder
                    .log(Some(&host.name), format!("changes: {}", summary.one_line()))
                    .await?;
            }
            Err(e) => {
                self.recorder
                    .log(Some(&host.name), format!("no change summary: {e}"))
                    .await?
            }
        }

        let copy = async {
            let opts =
                ssh::nix_ssh_opts(&host.target, &self.ssh, Some(connection.control_socket()))
                    .map_err(|e| e.to_string())?;
            nix.copy(
                &host.target.store_uri(),
                &path,
                &opts,
                self.substitute,
                |_, _| {},
            )
            .await
            .map_err(|e| e.to_string())
        };
        if let Err(e) = self.step(run, Step::Copy, copy).await? {
            return Ok(Err(Failure::Untouched(e)));
        }

        let timeout = self.ssh.command_timeout;
        if activation == Activation::Switch {
            let set_profile = async {
                connection
                    .run_privileged("set-profile", &remote::set_profile_argv(&path), timeout)
                    .await?;
                let link = connection
                    .run("set-profile", &remote::profile_link_argv(), timeout)
                    .await?;
                Ok::<_, ssh::SshError>(remote::parse_generation_link(&link.stdout))
            };
            match self.step(run, Step::SetProfile, set_profile).await? {
                Ok(generation) => run.to.generation = generation,
                Err(e) => return Ok(Err(Failure::Untouched(e))),
            }
        }

        // From here on the host runs (or may run) the new system: failures roll back.
        let token = uuid::Uuid::new_v4().simple().to_string();
        run.token = Some(token.clone());
        let systemd = assessment.probe.as_ref().is_some_and(|p| p.systemd);
        let activate = self.activate(
            connection,
            host,
            &path,
            activation,
            assessment.current.generation,
            &token,
            systemd,
        );
        if let Err(e) = self.step(run, Step::Activate, activate).await? {
            return Ok(Err(Failure::Activated(e)));
        }

        let checks = self.checks(host);
        let validate = async {
            let (results, outcome) =
                validate_host(connection, host, &path, &checks, self.health_timeout).await;
            if !results.is_empty() {
                let _ = self
                    .recorder
                    .emit(
                        Some(&host.name),
                        EventKind::HealthChecked {
                            phase: "validate".into(),
                            results,
                        },
                    )
                    .await;
            }
            outcome
        };
        if let Err(e) = self.step(run, Step::Validate, validate).await? {
            return Ok(Err(Failure::Activated(e)));
        }

        // Only a new connection proves the new system still lets us in.
        let confirm = async {
            let fresh = Connection::connect(&host.name, &host.target, &self.ssh)
                .await
                .map_err(|e| {
                    format!(
                        "{}: confirm: the new system does not accept a new SSH connection: {e}",
                        host.name
                    )
                })?;
            let result = fresh
                .run_privileged("confirm", &remote::confirm_argv(&token), timeout)
                .await
                .map_err(|e| e.to_string());
            fresh.close().await;
            result.map(|_| ())
        };
        if let Err(e) = self.step(run, Step::Confirm, confirm).await? {
            return Ok(Err(Failure::Unconfirmed(e)));
        }
        Ok(Ok(()))
    }

    /// Reachable (we have a connection), enough free space, and healthy before
    /// we touch it.
    async fn preflight(
        &self,
        assessment: &Assessment,
        connection: &Connection,
    ) -> Result<(), String> {
        let host = &assessment.host;
        if let Some(free) = assessment.probe.as_ref().and_then(|p| p.free_kib)
            && free < self.min_free_kib
        {
            return Err(format!(
                "only {} MiB free in /nix/store, --min-free-space asks for {} MiB",
                free / 1024,
                self.min_free_kib / 1024
            ));
        }
        // A host with no system yet has nothing to be healthy; --force deploys anyway.
        if assessment.current.path.is_none() || self.force || host.health_checks.is_empty() {
            return Ok(());
        }
        // One round: is it healthy right now?
        match crate::health::validate(connection, &host.health_checks, Duration::ZERO).await {
            Ok(_) => Ok(()),
            Err((message, results)) => {
                let _ = self
                    .recorder
                    .emit(
                        Some(&host.name),
                        EventKind::HealthChecked {
                            phase: "pre-flight".into(),
                            results,
                        },
                    )
                    .await;
                Err(format!(
                    "{}: pre-flight: unhealthy before deployment, not caused by nix-deploy ({message}); not deployed, use --force to deploy anyway",
                    host.name
                ))
            }
        }
    }

    /// Start the activator on the host and wait for the activation to end,
    /// reconnecting if the connection drops (the activator keeps going).
    #[allow(clippy::too_many_arguments)]
    async fn activate(
        &self,
        connection: &mut Connection,
        host: &Host,
        path: &str,
        activation: Activation,
        old_generation: Option<u32>,
        token: &str,
        systemd: bool,
    ) -> Result<(), String> {
        let argv = remote::activator_argv(
            path,
            activation,
            old_generation,
            self.confirm_timeout.as_secs().max(1),
            token,
            systemd,
        );
        connection
            .run_privileged("activate", &argv, self.ssh.command_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + self.activation_timeout;
        let mut poll = Duration::from_millis(100);
        let code = loop {
            match connection
                .run(
                    "activate",
                    &remote::activation_status_argv(token),
                    self.ssh.command_timeout,
                )
                .await
            {
                Ok(out) => {
                    let text = out.stdout.trim();
                    break text.parse::<i32>().map_err(|_| {
                        format!("{}: activate: unexpected status `{text}`", host.name)
                    })?;
                }
                Err(ssh::SshError::Exit { .. }) => {} // not finished yet
                Err(e) if e.is_connection() => {
                    // The activator survives us; try to get back in.
                    if let Ok(fresh) =
                        Connection::connect(&host.name, &host.target, &self.ssh).await
                    {
                        let old = std::mem::replace(connection, fresh);
                        old.close().await;
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: activate: switch-to-configuration {} did not finish within {}s",
                    host.name,
                    activation.as_str(),
                    self.activation_timeout.as_secs()
                ));
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_millis(500));
        };
        if code == 0 {
            return Ok(());
        }
        let log = connection
            .run(
                "activate",
                &remote::activation_log_argv(token),
                self.ssh.command_timeout,
            )
            .await
            .map(|o| ssh::tail(&o.stdout))
            .unwrap_or_default();
        Err(format!(
            "{}: activate: `{path}/bin/switch-to-configuration {}` failed (exit code {code}){}",
            host.name,
            activation.as_str(),
            crate::exec::format_tail(&log)
        ))
    }
}

/// The host runs `path` and its health checks pass. Returns every check's
/// last result for the record, and the verdict.
async fn validate_host(
    connection: &Connection,
    host: &Host,
    path: &str,
    checks: &[crate::inventory::HealthCheck],
    health_timeout: Duration,
) -> (Vec<crate::health::CheckResult>, Result<String, String>) {
    // Never skipped, not even with --skip-validation.
    let current = match connection
        .run(
            "validate",
            &remote::current_system_argv(),
            Duration::from_secs(60),
        )
        .await
    {
        Ok(out) => out.stdout.trim().to_string(),
        Err(e) => return (Vec::new(), Err(e.to_string())),
    };
    if current != path {
        return (
            Vec::new(),
            Err(format!(
                "{}: validate: /run/current-system is {current} after activation, expected {path}",
                host.name
            )),
        );
    }
    match crate::health::validate(connection, checks, health_timeout).await {
        Ok(results) => {
            let text = results
                .iter()
                .map(|r| format!("{}: ok", r.check))
                .collect::<Vec<_>>()
                .join(", ");
            (results, Ok(text))
        }
        Err((message, results)) => (results, Err(format!("{}: validate: {message}", host.name))),
    }
}

/// Hold a canary and re-validate it until `soak` has passed.
async fn soak_host(
    connection: &Connection,
    host: &Host,
    checks: &[crate::inventory::HealthCheck],
    soak: Duration,
    health_timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + soak;
    let period = Duration::from_secs(5).min(soak.max(Duration::from_millis(500)) / 2);
    loop {
        let (_, verdict) = validate_host(
            connection,
            host,
            &host.toplevel,
            checks,
            health_timeout.min(soak.max(Duration::from_secs(5))),
        )
        .await;
        verdict.map_err(|e| format!("failed during the canary soak: {e}"))?;
        if tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(period.min(deadline - tokio::time::Instant::now())).await;
    }
}

/// Blue-green commit: make the staged system the profile's new generation and
/// the boot default.
async fn commit_system(
    connection: &Connection,
    path: &str,
    timeout: Duration,
) -> Result<Option<u32>, String> {
    connection
        .run_privileged("commit", &remote::set_profile_argv(path), timeout)
        .await
        .map_err(|e| e.to_string())?;
    connection
        .run_privileged(
            "commit",
            &remote::switch_argv(path, Activation::Boot),
            timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
    let link = connection
        .run("commit", &remote::profile_link_argv(), timeout)
        .await
        .map_err(|e| e.to_string())?;
    Ok(remote::parse_generation_link(&link.stdout))
}

/// Blue-green revert: the profile never changed, so activating the old
/// generation with `test` restores the old system and leaves the boot default.
async fn revert_test(
    connection: &Connection,
    generation: u32,
    old_path: &str,
) -> Result<(), String> {
    let timeout = Duration::from_secs(600);
    connection
        .run_privileged(
            "rollback",
            &remote::switch_argv(&remote::generation_link(generation), Activation::Test),
            timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
    verify_current(connection, old_path).await
}

/// Switch the profile back to `generation`, activate it, and check it runs.
async fn roll_back(connection: &Connection, generation: u32, old_path: &str) -> Result<(), String> {
    let timeout = Duration::from_secs(600);
    connection
        .run_privileged(
            "rollback",
            &remote::switch_generation_argv(generation),
            timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
    connection
        .run_privileged(
            "rollback",
            &remote::switch_argv(&remote::generation_link(generation), Activation::Switch),
            timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
    verify_current(connection, old_path).await
}

async fn verify_current(connection: &Connection, expected: &str) -> Result<(), String> {
    let current = connection
        .run(
            "rollback",
            &remote::current_system_argv(),
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| e.to_string())?;
    let current = current.stdout.trim();
    if current != expected {
        return Err(format!(
            "{}: rollback: /run/current-system is {current}, expected the old system {expected}",
            connection.host()
        ));
    }
    Ok(())
}
