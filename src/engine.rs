//! The engine: evaluate, probe, plan and deploy, recording everything.
//!
//! One deployment is owned by one call of [`Engine::deploy`]. It probes the
//! selected hosts in parallel (bounded), asks the pure planner what to do, then
//! runs each host's pipeline (DESIGN §4) in a task of its own, at most
//! `parallel_limit` at a time. Every state change is written to the [`Store`]
//! before it is sent to the event sink (the CLI's progress display, later the
//! API's stream).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::events::{
    DeploymentStatus, Event, EventKind, HostState, HostStatus, Step, SystemRef, now_ms,
};
use crate::inventory::{Host, Inventory, InventoryError, Selection};
use crate::nix::{Nix, NixError};
use crate::plan::{self, Action, HostFacts, Plan, PlanOptions};
use crate::remote::{self, Activation, ProbeResult};
use crate::ssh::{self, Connection, SshOptions};
use crate::store::{HostRun, NewDeployment, StepTiming, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be carried out as given; nothing was touched.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Eval(NixError),
    #[error("invalid option: {0}")]
    BadOption(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Whether the caller gave us something we cannot use (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            EngineError::Inventory(_) | EngineError::Eval(_) | EngineError::BadOption(_)
        )
    }
}

/// Everything a run needs to know, decided once at the edge (CLI or API).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub flake: String,
    pub nix: Nix,
    pub ssh: SshOptions,
    /// Hosts deployed at once.
    pub parallel_limit: usize,
    /// Hosts probed at once.
    pub probe_limit: usize,
    pub activation_timeout: Duration,
    pub substitute_on_destination: bool,
}

impl EngineConfig {
    pub fn new(flake: String, ssh: SshOptions) -> Self {
        EngineConfig {
            flake,
            nix: Nix::default(),
            ssh,
            parallel_limit: 4,
            probe_limit: 64,
            activation_timeout: Duration::from_secs(600),
            substitute_on_destination: false,
        }
    }
}

/// One deployment request.
#[derive(Clone, Debug, Default)]
pub struct DeployRequest {
    pub selection: Selection,
    pub force: bool,
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

impl Assessment {
    fn facts(&self) -> HostFacts {
        HostFacts {
            name: self.host.name.clone(),
            role: self.host.role.clone(),
            state: self.state,
            current: self.current.clone(),
            target_path: self.host.toplevel.clone(),
            probe_error: self.error.clone(),
        }
    }
}

/// What `plan` shows.
#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    pub flake: String,
    pub hosts: Vec<crate::plan::PlannedHost>,
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
    pub started_at: i64,
    pub finished_at: i64,
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

    fn check_options(&self) -> Result<(), EngineError> {
        if self.config.parallel_limit == 0 {
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

    /// Probe hosts in parallel. Returns each assessment, plus the open connection
    /// when `keep` says the host will be needed again.
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

    fn selected_hosts(
        inventory: &Inventory,
        selection: &Selection,
    ) -> Result<Vec<Host>, EngineError> {
        let names = inventory.select(selection)?;
        Ok(names
            .iter()
            .filter_map(|n| inventory.get(n).cloned())
            .collect())
    }

    /// What a deployment would do. Changes nothing on any host.
    pub async fn plan(
        &self,
        selection: &Selection,
        force: bool,
    ) -> Result<PlanReport, EngineError> {
        self.check_options()?;
        let inventory = self.inventory().await?;
        let hosts = Self::selected_hosts(&inventory, selection)?;
        let probed = self.probe_all(hosts, None).await?;
        let mut facts = Vec::new();
        for (assessment, connection) in probed {
            if let Some(connection) = connection {
                connection.close().await;
            }
            facts.push(assessment.facts());
        }
        let plan = plan::plan(&facts, PlanOptions { force });
        Ok(plan_report(&self.config.flake, plan))
    }

    /// Run a deployment to the end. `sink` receives every event after it is stored;
    /// `cancel` stops starting new hosts (running ones finish).
    pub async fn deploy(
        &self,
        request: DeployRequest,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<DeployReport, EngineError> {
        self.check_options()?;
        // Everything that can be wrong with the request is found before anything
        // is recorded or touched.
        let (inventory, flake_rev) = tokio::join!(
            self.inventory(),
            self.config.nix.flake_revision(&self.config.flake)
        );
        let inventory = inventory?;
        let hosts = Self::selected_hosts(&inventory, &request.selection)?;
        let started_at = now_ms();
        let host_names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        let id = self
            .store
            .create_deployment(&NewDeployment {
                trigger: request.trigger.clone(),
                requested_by: request.requested_by.clone(),
                flake: self.config.flake.clone(),
                flake_rev,
                strategy: "parallel".into(),
                options: serde_json::json!({
                    "force": request.force,
                    "parallel_limit": self.config.parallel_limit,
                    "activation_timeout_s": self.config.activation_timeout.as_secs(),
                }),
                hosts: host_names.clone(),
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
                    hosts: host_names,
                    strategy: "parallel".into(),
                },
            )
            .await?;

        let probed = self.probe_all(hosts, Some(&recorder)).await?;
        let facts: Vec<HostFacts> = probed.iter().map(|(a, _)| a.facts()).collect();
        let plan = plan::plan(
            &facts,
            PlanOptions {
                force: request.force,
            },
        );
        self.store
            .set_plan(id, &serde_json::to_value(&plan).unwrap_or_default())
            .await?;

        let mut runs: BTreeMap<String, HostRun> = BTreeMap::new();
        let mut work = Vec::new();
        for ((assessment, connection), planned) in probed.into_iter().zip(&plan.hosts) {
            let mut run = HostRun::new(id, &assessment.host.name);
            run.changed = Some(assessment.state == HostState::Changed);
            run.from = assessment.current.clone();
            run.to.path = Some(assessment.host.toplevel.clone());
            run.reason = planned.reason.clone();
            recorder
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
                    work.push((assessment, connection, run));
                }
                (action, connection) => {
                    if let Some(connection) = connection {
                        connection.close().await;
                    }
                    run.status = if action == Action::Unreachable {
                        HostStatus::Unreachable
                    } else {
                        HostStatus::Skipped
                    };
                    run.error = assessment.error.clone();
                    run.started_at = Some(now_ms());
                    run.finished_at = run.started_at;
                    self.finish_host(&recorder, &run).await?;
                    runs.insert(run.host.clone(), run);
                }
            }
        }

        let context = Arc::new(HostContext {
            nix: self.config.nix.clone(),
            ssh: self.config.ssh.clone(),
            activation_timeout: self.config.activation_timeout,
            substitute: self.config.substitute_on_destination,
            recorder: recorder.clone(),
        });
        let semaphore = Arc::new(Semaphore::new(self.config.parallel_limit));
        let mut tasks = JoinSet::new();
        for (assessment, connection, run) in work {
            let context = context.clone();
            let semaphore = semaphore.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                let permit = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => None,
                    permit = semaphore.acquire_owned() => permit.ok(),
                };
                let mut run = run;
                if permit.is_none() || cancel.is_cancelled() {
                    connection.close().await;
                    run.status = HostStatus::Cancelled;
                    run.reason = Some("deployment cancelled before this host started".into());
                    run.started_at = Some(now_ms());
                    run.finished_at = run.started_at;
                    return Ok(run);
                }
                let result = context.deploy_host(&assessment, &connection, run).await;
                connection.close().await;
                result
            });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(run)) => {
                    self.finish_host(&recorder, &run).await?;
                    runs.insert(run.host.clone(), run);
                }
                Ok(Err(e)) => first_error = first_error.or(Some(EngineError::Store(e))),
                Err(e) => {
                    first_error = first_error.or(Some(EngineError::Internal(format!(
                        "host task failed: {e}"
                    ))))
                }
            }
        }
        if let Some(error) = first_error {
            let _ = self
                .store
                .finish_deployment(id, DeploymentStatus::Failed, Some(&error.to_string()))
                .await;
            return Err(error);
        }

        let hosts: Vec<HostRun> = runs.into_values().collect();
        let status = if hosts.iter().any(|h| h.status.is_failure()) {
            DeploymentStatus::Failed
        } else if hosts.iter().any(|h| h.status == HostStatus::Cancelled) || cancel.is_cancelled() {
            DeploymentStatus::Cancelled
        } else {
            DeploymentStatus::Succeeded
        };
        self.store.finish_deployment(id, status, None).await?;
        recorder
            .emit(None, EventKind::DeploymentFinished { status })
            .await?;
        Ok(DeployReport {
            id,
            status,
            flake: self.config.flake.clone(),
            started_at,
            finished_at: now_ms(),
            hosts,
        })
    }

    async fn finish_host(&self, recorder: &Recorder, run: &HostRun) -> Result<(), StoreError> {
        self.store.save_host_run(run).await?;
        self.store.record_host_result(run).await?;
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
            .await
    }
}

fn plan_report(flake: &str, plan: Plan) -> PlanReport {
    let names = |action: Action| {
        plan.hosts
            .iter()
            .filter(|h| h.action == action)
            .map(|h| h.name.clone())
            .collect()
    };
    PlanReport {
        flake: flake.to_string(),
        to_deploy: names(Action::Deploy),
        skipped: names(Action::Skip),
        unreachable: names(Action::Unreachable),
        hosts: plan.hosts,
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

/// What a host task needs; shared by all host tasks of a deployment.
struct HostContext {
    nix: Nix,
    ssh: SshOptions,
    activation_timeout: Duration,
    substitute: bool,
    recorder: Recorder,
}

/// A step's failure, already phrased for the operator (names host and step).
type StepError = String;

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

    /// The pipeline of DESIGN §4 for one changed host.
    async fn deploy_host(
        &self,
        assessment: &Assessment,
        connection: &Connection,
        mut run: HostRun,
    ) -> Result<HostRun, StoreError> {
        let host = &assessment.host;
        run.status = HostStatus::Running;
        run.started_at = Some(now_ms());
        self.recorder.store.save_host_run(&run).await?;

        let outcome = self.pipeline(assessment, connection, &mut run).await?;
        run.finished_at = Some(now_ms());
        match outcome {
            Ok(()) => run.status = HostStatus::Deployed,
            Err(Failure::Untouched(error)) => {
                run.status = HostStatus::Failed;
                run.error = Some(error);
            }
            Err(Failure::Activated(error)) => {
                let old = assessment.current.clone();
                if !host.rollback_on_failure {
                    run.status = HostStatus::Failed;
                    run.error = Some(format!(
                        "{error}\n(rollbackOnFailure is off: left as it is)"
                    ));
                } else if let (Some(generation), Some(path)) = (old.generation, old.path.clone()) {
                    let rollback = self
                        .step(
                            &mut run,
                            Step::Rollback,
                            roll_back(connection, generation, &path),
                        )
                        .await?;
                    run.finished_at = Some(now_ms());
                    match rollback {
                        Ok(()) => {
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
                } else {
                    run.status = HostStatus::Failed;
                    run.error = Some(format!(
                        "{error}\nno previous generation to roll back to (first deployment)"
                    ));
                }
            }
        }
        run.step = None;
        Ok(run)
    }

    async fn pipeline(
        &self,
        assessment: &Assessment,
        connection: &Connection,
        run: &mut HostRun,
    ) -> Result<Result<(), Failure>, StoreError> {
        let host = &assessment.host;
        let nix = &self.nix;

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

        let copy = async {
            let opts = ssh::nix_ssh_opts(&host.target, &self.ssh).map_err(|e| e.to_string())?;
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

        // From here on the host's profile has changed: failures need a rollback.
        let switch = remote::switch_argv(&path, Activation::Switch);
        let activate = connection.run_privileged("activate", &switch, self.activation_timeout);
        if let Err(e) = self.step(run, Step::Activate, activate).await? {
            return Ok(Err(Failure::Activated(e)));
        }

        let verify = async {
            let current = connection
                .run("verify", &remote::current_system_argv(), timeout)
                .await
                .map_err(|e| e.to_string())?;
            let current = current.stdout.trim();
            if current == path {
                Ok(())
            } else {
                Err(format!(
                    "/run/current-system is {current} after activation, expected {path}"
                ))
            }
        };
        if let Err(e) = self.step(run, Step::Verify, verify).await? {
            return Ok(Err(Failure::Activated(e)));
        }
        Ok(Ok(()))
    }
}

/// Why a pipeline stopped.
enum Failure {
    /// Nothing on the host changed (build, copy or profile step failed).
    Untouched(StepError),
    /// The profile or the running system changed: roll back.
    Activated(StepError),
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
    let current = connection
        .run("rollback", &remote::current_system_argv(), timeout)
        .await
        .map_err(|e| e.to_string())?;
    let current = current.stdout.trim();
    if current != old_path {
        return Err(format!(
            "{}: rollback: /run/current-system is {current}, expected the old system {old_path}",
            connection.host()
        ));
    }
    Ok(())
}
