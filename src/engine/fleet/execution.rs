//! Executing a plan with real hosts: every selected host is probed, the
//! plan is made and recorded, then [`Schedule`] decides *when* each host
//! starts its pipeline ([`crate::engine::host::pipeline`]). When the plan's
//! failure policy stops the deployment, what it changed goes back (or,
//! blue-green, every staged host is committed or reverted together by
//! [`super::blue_green`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{EventKind, HostState, HostStatus};
use nix_deploy_core::options::{DeployOptions, Strategy};
use nix_deploy_core::plan::{self, Action, Plan};
use nix_deploy_core::remote::Activation;
use nix_deploy_core::run::HostRun;

use super::gates::Gates;
use super::leases::Leases;
use super::prepare::Prepared;
use super::schedule::Schedule;
use super::{FleetContext, blue_green, handoff, probe};
use crate::engine::EngineError;
use crate::engine::host::fence::HostFence;
use crate::engine::host::keys::KeyTexts;
use crate::engine::host::observe::{Assessment, Settle};
use crate::engine::host::pipeline::{self as host_pipeline, HostContext, HostJob, Outcome};
use crate::engine::host::recorder::Recorder;
use crate::engine::host::way_back;
use crate::now_ms;
use crate::store::StoreError;
use crate::transport::ssh::Connection;

/// One deployment's execution of its plan, with real hosts.
pub(crate) struct Execution<'a> {
    pub fleet: FleetContext<'a>,
    pub context: Arc<HostContext>,
    pub plan: &'a Plan,
    pub options: &'a DeployOptions,
    pub recorder: &'a Recorder,
    /// Every host run of this attempt, by host.
    pub runs: BTreeMap<String, HostRun>,
    /// Hosts that ran their pipeline: their probe and open connection, for a
    /// later rollback or commit.
    pub done: BTreeMap<String, (Assessment, Connection)>,
    schedule: Schedule,
    /// Windows, approvals and pauses: asked before each host starts.
    pub gates: Gates,
}

type HostTaskResult = Result<(HostJob, Outcome), StoreError>;

impl<'a> Execution<'a> {
    /// Finish a host that never started.
    async fn skip(
        &mut self,
        mut run: HostRun,
        status: HostStatus,
        reason: String,
    ) -> Result<(), StoreError> {
        run.status = status;
        run.reason = Some(reason);
        run.time.started_at = Some(now_ms());
        run.time.finished_at = run.time.started_at;
        if run.to.generation.is_none()
            && status == HostStatus::Skipped
            && run.changed == Some(false)
        {
            run.to = run.from.clone();
        }
        self.schedule.skipped(&run.host, status);
        self.recorder.finish_host(&mut run).await?;
        self.runs.insert(run.host.clone(), run);
        Ok(())
    }

    async fn run(
        &mut self,
        probed: Vec<(Assessment, Option<Connection>)>,
        cancel: &CancellationToken,
    ) -> Result<(), EngineError> {
        // Hosts the plan does not deploy finish now; the others wait their turn.
        let mut jobs: BTreeMap<String, HostJob> = BTreeMap::new();
        let mut waiting = Vec::new();
        for (assessment, connection) in probed {
            let name = assessment.host.name.clone();
            let planned =
                self.plan.get(&name).cloned().ok_or_else(|| {
                    EngineError::Internal(format!("{name} missing from the plan"))
                })?;
            let mut run = HostRun::new(self.recorder.deployment_id(), &name);
            run.changed = Some(assessment.state == HostState::Changed);
            run.from = assessment.current.clone();
            run.to.path = Some(assessment.host.toplevel().to_string());
            run.reason = planned.reason.clone();
            self.recorder
                .emit(
                    Some(&name),
                    EventKind::HostPlanned {
                        action: planned.action.as_str().into(),
                        reason: planned.reason.clone(),
                    },
                )
                .await?;
            match (planned.action, connection) {
                (Action::Deploy, Some(connection)) => {
                    self.recorder.save(&run).await?;
                    jobs.insert(
                        name,
                        HostJob {
                            assessment,
                            connection,
                            run,
                        },
                    );
                    waiting.push(planned);
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
        self.schedule = Schedule::new(self.plan, waiting);

        let blue_green = self.plan.strategy == Strategy::BlueGreen;
        let activation = if blue_green {
            Activation::Test
        } else {
            Activation::Switch
        };
        let soak = (self.plan.strategy == Strategy::Canary).then_some(self.options.canary_soak);
        let mut running: JoinSet<HostTaskResult> = JoinSet::new();
        loop {
            for (planned, reason) in self.schedule.take_blocked() {
                if let Some(job) = jobs.remove(&planned.name) {
                    job.connection.close().await;
                    self.skip(job.run, HostStatus::Skipped, reason).await?;
                }
            }
            if !cancel.is_cancelled() {
                let free = self.plan.parallel_limit.saturating_sub(running.len());
                let gates = &self.gates;
                for planned in self.schedule.take_ready_where(free, |h| gates.admit(h)) {
                    let Some(job) = jobs.remove(&planned.name) else {
                        continue;
                    };
                    let context = self.context.for_host(&job.assessment.host);
                    let soak = soak.filter(|_| planned.canary);
                    running.spawn(async move {
                        host_pipeline::run(context, job, activation, soak).await
                    });
                }
            }
            // Nothing runs, and what is left is held by a window or a gate:
            // wait for it, or end those hosts saying why they never start.
            if running.is_empty() && !cancel.is_cancelled() {
                let gates = &self.gates;
                let held = self.schedule.held(|h| gates.admit(h));
                if !held.is_empty() {
                    if let Some(reason) = self.gates.wait(&held, cancel).await? {
                        // Held hosts stay for whoever resumes a deployment
                        // handed over.
                        if handoff::wanted(self.fleet, self.recorder, cancel) {
                            continue;
                        }
                        let names: Vec<String> = held.iter().map(|h| h.name.clone()).collect();
                        for planned in self.schedule.take_named(&names) {
                            if let Some(job) = jobs.remove(&planned.name) {
                                job.connection.close().await;
                                self.skip(job.run, HostStatus::Cancelled, reason.clone())
                                    .await?;
                            }
                        }
                    }
                    continue;
                }
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            let (job, outcome) = match joined {
                Ok(result) => result?,
                Err(e) => return Err(EngineError::Internal(format!("host task failed: {e}"))),
            };
            let HostJob {
                assessment,
                connection,
                mut run,
            } = job;
            let host = run.host.clone();
            let abort = self.schedule.finished(&host, outcome, run.status);
            if blue_green && outcome == Outcome::Healthy {
                // Staged, not finished: committed or reverted together below.
                self.recorder.save(&run).await?;
            } else {
                self.recorder.finish_host(&mut run).await?;
            }
            self.runs.insert(host.clone(), run);
            self.done.insert(host, (assessment, connection));
            if let Some(reason) = abort {
                self.recorder
                    .log(None, format!("aborting: {reason}"))
                    .await?;
            }
        }

        // Stopped at a safe point to be handed over: what did not start is
        // left for the coordinator that resumes it.
        if self.schedule.aborted().is_none() && handoff::wanted(self.fleet, self.recorder, cancel) {
            for (_, job) in std::mem::take(&mut jobs) {
                job.connection.close().await;
            }
            return Err(handoff::hand_over(self.fleet, self.recorder).await);
        }
        for (planned, status, reason) in self.schedule.take_rest(cancel.is_cancelled()) {
            if let Some(job) = jobs.remove(&planned.name) {
                job.connection.close().await;
                self.skip(job.run, status, reason).await?;
            }
        }

        if blue_green {
            blue_green::settle(
                &self.context,
                &mut self.runs,
                &mut self.done,
                cancel.is_cancelled(),
            )
            .await?;
        } else if self.schedule.aborted().is_some() && self.options.rollback_all_on_abort {
            self.roll_back_deployed().await?;
        }
        Ok(())
    }

    pub fn aborted(&self) -> Option<String> {
        self.schedule.aborted().map(str::to_string)
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
        let reason = self.aborted().unwrap_or_default();
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
            let (Some(run), Some((assessment, connection))) =
                (self.runs.remove(&host), self.done.get_mut(&host))
            else {
                continue;
            };
            let note =
                format!("deployed, then rolled back because the deployment aborted: {reason}");
            let run = way_back::take_back(
                &self.context.for_host(&assessment.host),
                run,
                assessment,
                connection,
                Activation::Switch,
                note,
                "no previous generation (first deployment); left on the new system",
            )
            .await?;
            self.runs.insert(host, run);
        }
        Ok(())
    }
}

/// How an execution ended: every host run of this attempt, why it stopped
/// starting hosts when its failure policy said so (`aborted`), and why the
/// hosts it held never started when a gate or window said so (`stopped`:
/// rejected, timed out, outside its window for good).
pub(crate) struct Executed {
    pub runs: Vec<HostRun>,
    pub aborted: Option<String>,
    pub stopped: Option<String>,
}

/// Probe, plan and execute `prepared` under the recorder's deployment. The
/// caller ends the deployment (`Engine::finish`, or `Engine::fail` on an
/// error).
pub(crate) async fn execute(
    cx: FleetContext<'_>,
    prepared: Prepared,
    options: &DeployOptions,
    recorder: &Recorder,
    leases: &Leases,
    cancel: &CancellationToken,
) -> Result<Executed, EngineError> {
    let _cancel_watch = leases.watch_cancel(recorder.deployment_id(), cancel).await;
    let id = recorder.deployment_id();
    let fetch_from = prepared
        .promotion
        .as_ref()
        .map(|p| p.fetch_from())
        .unwrap_or_default();
    let keys = Arc::new(KeyTexts::new(
        &cx.config.flake,
        prepared.index.source,
        &cx.config.nix,
        &prepared.hosts.iter().map(|h| &h.meta).collect::<Vec<_>>(),
    ));
    // Every host this run touches records its epoch first (see
    // `engine::host::fence`).
    let fence = HostFence::of(cx.store, id).await?;
    // The fleet's remote builders (colmena's `meta.machinesFile`) unless
    // `--builders` chose others.
    let nix = cx.config.nix.for_fleet(&prepared.index.meta);
    let settle = Settle::Yes {
        activation_timeout: options.activation_timeout,
        fence: Some(fence.clone()),
    };
    let mut gates = Gates::new(
        cx.config.policy.clone(),
        recorder.clone(),
        options,
        &prepared.hosts,
    )
    .await?;
    if let Some(reason) = &options.override_window {
        recorder
            .log(None, format!("maintenance windows overridden: {reason}"))
            .await?;
    }
    // Nothing may start yet: wait before probing (connections are not held
    // open through a long wait).
    if let Some(reason) = gates
        .wait_for_window(prepared.hosts.iter().map(|h| h.name.as_str()), cancel)
        .await?
    {
        prepared.discard().await;
        if handoff::wanted(cx, recorder, cancel) {
            return Err(handoff::hand_over(cx, recorder).await);
        }
        return Ok(Executed {
            runs: Vec::new(),
            aborted: None,
            stopped: Some(reason),
        });
    }
    let mut probed =
        probe::probe_all(cx, prepared.hosts, Some(recorder), settle, prepared.early).await?;
    // Hosts a resumed deployment had touched go back to what they had
    // before it did.
    for (assessment, _) in &mut probed {
        if let Some(before) = prepared.before.get(&assessment.host.name) {
            assessment.before = before.clone();
        }
    }
    let mut facts = Vec::new();
    for (assessment, _) in &probed {
        facts.push(probe::facts(cx, assessment, None).await?);
    }
    let fleet_size = prepared.inventory.len() + prepared.evaluation.failed.len();
    let plan = match plan::plan(&facts, &prepared.graph, fleet_size, options) {
        Ok(plan) => plan,
        Err(e) => {
            for (_, connection) in probed {
                if let Some(c) = connection {
                    c.close().await;
                }
            }
            return Err(e.into());
        }
    };
    cx.store.set_plan(id, &plan).await?;
    gates.set_plan(&plan);
    recorder
        .emit(
            None,
            EventKind::Planned {
                strategy: options.strategy.as_str().to_string(),
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
        nix,
        ssh: cx.config.ssh.clone(),
        options: options.clone(),
        recorder: recorder.clone(),
        keys,
        fetch_from,
        fence,
    });
    let mut execution = Execution {
        fleet: cx,
        context,
        plan: &plan,
        options,
        recorder,
        runs: BTreeMap::new(),
        done: BTreeMap::new(),
        schedule: Schedule::new(&plan, Vec::new()),
        gates,
    };
    let result = execution.run(probed, cancel).await;
    for (_, (_, connection)) in std::mem::take(&mut execution.done) {
        connection.close().await;
    }
    result?;
    Ok(Executed {
        aborted: execution.aborted(),
        stopped: execution.gates.stopped().map(str::to_string),
        runs: execution.runs.into_values().collect(),
    })
}
