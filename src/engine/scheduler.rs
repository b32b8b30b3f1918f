//! Executing a plan: the scheduler only decides *when* a host starts. A host
//! starts once every host it `waits_for` ended healthy, at most
//! `parallel_limit` at once; a host whose prerequisite did not end healthy is
//! skipped with the reason; the deployment stops starting hosts when the plan's
//! failure policy says so, then rolls back what it changed (or, blue-green,
//! commits or reverts every staged host together).
//!
//! The decisions are in [`Schedule`], which does no IO and is unit-tested;
//! [`Execution`] drives it with real hosts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{EventKind, HostState, HostStatus};
use nix_deploy_core::options::{DeployOptions, Strategy};
use nix_deploy_core::plan::{self, Action, Plan, PlannedHost};
use nix_deploy_core::remote::Activation;
use nix_deploy_core::run::{Deployment, HostRun};

use super::gates::Gates;
use super::keys::KeyTexts;
use super::pipeline::{HostContext, HostJob};
use super::prepare::{Leases, Prepared};
use super::probe::{Assessment, Settle};
use super::recorder::Recorder;
use super::{Engine, EngineError};
use crate::now_ms;
use crate::store::StoreError;
use crate::transport::ssh::Connection;

/// How one host's part ended, as the scheduler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Deployed (or, in blue-green, staged) and healthy.
    Healthy,
    /// Failed, rolled back, unreachable, skipped or cancelled.
    NotHealthy,
}

/// The scheduler's decisions, without IO.
pub(super) struct Schedule {
    /// Hosts not started yet, in plan order (phase, then name).
    waiting: Vec<PlannedHost>,
    ended: BTreeMap<String, (Outcome, HostStatus)>,
    canaries: BTreeSet<String>,
    /// Canary strategy: a failed canary stops the deployment.
    canary_gate: bool,
    max_failures: Option<usize>,
    failures: usize,
    aborted: Option<String>,
}

impl Schedule {
    pub fn new(plan: &Plan, mut waiting: Vec<PlannedHost>) -> Self {
        waiting.sort_by(|a, b| (a.phase, &a.name).cmp(&(b.phase, &b.name)));
        Schedule {
            waiting,
            ended: BTreeMap::new(),
            canaries: plan
                .hosts
                .iter()
                .filter(|h| h.canary)
                .map(|h| h.name.clone())
                .collect(),
            canary_gate: plan.strategy == Strategy::Canary,
            max_failures: plan.max_failures,
            failures: 0,
            aborted: None,
        }
    }

    /// Why the deployment stopped starting hosts, if it did.
    pub fn aborted(&self) -> Option<&str> {
        self.aborted.as_deref()
    }

    /// A host that never started ended (skipped, unreachable).
    pub fn skipped(&mut self, host: &str, status: HostStatus) {
        self.ended
            .insert(host.to_string(), (Outcome::NotHealthy, status));
    }

    /// A started host ended. Returns the reason to stop, when this host made
    /// the deployment stop (a failed canary, or failures beyond the allowance).
    pub fn finished(&mut self, host: &str, outcome: Outcome, status: HostStatus) -> Option<String> {
        self.ended.insert(host.to_string(), (outcome, status));
        if matches!(
            status,
            HostStatus::Failed | HostStatus::RolledBack | HostStatus::RollbackFailed
        ) {
            self.failures += 1;
        }
        if self.aborted.is_some() {
            return None;
        }
        if outcome == Outcome::NotHealthy && self.canary_gate && self.canaries.contains(host) {
            self.aborted = Some(format!("canary {host} failed; the deployment stopped"));
        } else if let Some(allowed) = self.max_failures
            && self.failures > allowed
        {
            self.aborted = Some(format!(
                "{} host(s) failed, more than --max-failures allows ({allowed})",
                self.failures
            ));
        }
        self.aborted.clone()
    }

    /// Waiting hosts that can never start because something they wait for
    /// did not end healthy, each with the reason.
    pub fn take_blocked(&mut self) -> Vec<(PlannedHost, String)> {
        let mut blocked = Vec::new();
        let mut index = 0;
        while index < self.waiting.len() {
            let blocker = self.waiting[index]
                .waits_for
                .iter()
                .find(|w| matches!(self.ended.get(*w), Some((Outcome::NotHealthy, _))))
                .cloned();
            let Some(blocker) = blocker else {
                index += 1;
                continue;
            };
            let planned = self.waiting.remove(index);
            let status = self.ended[&blocker].1;
            let what = if self.canaries.contains(&blocker) && !planned.depends_on.contains(&blocker)
            {
                "canary"
            } else if planned.depends_on.contains(&blocker) {
                "dependency"
            } else {
                "previous batch host"
            };
            blocked.push((planned, format!("{what} {blocker} {status}")));
        }
        blocked
    }

    /// Up to `free` waiting hosts whose prerequisites all ended healthy, in
    /// plan order; none once the deployment stopped.
    #[cfg(test)]
    pub fn take_ready(&mut self, free: usize) -> Vec<PlannedHost> {
        self.take_ready_where(free, |_| true)
    }

    /// [`Schedule::take_ready`], of the hosts `admit` lets start now (the
    /// others stay waiting: see `gates`).
    pub fn take_ready_where(
        &mut self,
        free: usize,
        admit: impl Fn(&PlannedHost) -> bool,
    ) -> Vec<PlannedHost> {
        let mut ready = Vec::new();
        if self.aborted.is_some() {
            return ready;
        }
        let mut index = 0;
        while index < self.waiting.len() && ready.len() < free {
            if self.prerequisites_healthy(&self.waiting[index]) && admit(&self.waiting[index]) {
                ready.push(self.waiting.remove(index));
            } else {
                index += 1;
            }
        }
        ready
    }

    fn prerequisites_healthy(&self, host: &PlannedHost) -> bool {
        host.waits_for
            .iter()
            .all(|w| matches!(self.ended.get(w), Some((Outcome::Healthy, _))))
    }

    /// Waiting hosts that could start but for `admit` (a window, a gate).
    pub fn held(&self, admit: impl Fn(&PlannedHost) -> bool) -> Vec<PlannedHost> {
        if self.aborted.is_some() {
            return Vec::new();
        }
        self.waiting
            .iter()
            .filter(|h| self.prerequisites_healthy(h) && !admit(h))
            .cloned()
            .collect()
    }

    /// Take these waiting hosts out: they will not start.
    pub fn take_named(&mut self, names: &[String]) -> Vec<PlannedHost> {
        let (taken, kept) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|h| names.contains(&h.name));
        self.waiting = kept;
        taken
    }

    /// When nothing runs any more: the hosts that never started, with how
    /// they end and why.
    pub fn take_rest(&mut self, cancelled: bool) -> Vec<(PlannedHost, HostStatus, String)> {
        let aborted = self.aborted.clone();
        std::mem::take(&mut self.waiting)
            .into_iter()
            .map(|planned| {
                let (status, reason) = match (&aborted, cancelled) {
                    (Some(reason), _) => (HostStatus::Skipped, format!("not started: {reason}")),
                    (None, true) => (
                        HostStatus::Cancelled,
                        "deployment cancelled before this host started".to_string(),
                    ),
                    (None, false) => (
                        HostStatus::Skipped,
                        format!(
                            "waits for {} which did not finish",
                            planned.waits_for.join(", ")
                        ),
                    ),
                };
                (planned, status, reason)
            })
            .collect()
    }
}

/// One deployment's execution of its plan, with real hosts.
pub(super) struct Execution<'a> {
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
            run.to.path = Some(assessment.host.toplevel.clone());
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
                    let context = self.context.clone();
                    let soak = soak.filter(|_| planned.canary);
                    running.spawn(async move { context.host_task(job, activation, soak).await });
                }
            }
            if running.is_empty() && !cancel.is_cancelled() {
                let gates = &self.gates;
                let held = self.schedule.held(|h| gates.admit(h));
                if !held.is_empty() {
                    if let Some(reason) = self.gates.wait(&held, cancel).await? {
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

        for (planned, status, reason) in self.schedule.take_rest(cancel.is_cancelled()) {
            if let Some(job) = jobs.remove(&planned.name) {
                job.connection.close().await;
                self.skip(job.run, status, reason).await?;
            }
        }

        if blue_green {
            self.settle_blue_green(cancel.is_cancelled()).await?;
        } else if self.schedule.aborted().is_some() && self.options.rollback_all_on_abort {
            self.roll_back_deployed().await?;
        }
        Ok(())
    }

    pub fn aborted(&self) -> Option<String> {
        self.schedule.aborted().map(str::to_string)
    }
}

impl Engine {
    /// Probe, plan and execute `prepared` under the recorder's deployment.
    /// `done` are host runs of an earlier attempt that count towards the result.
    pub(super) async fn execute(
        &self,
        prepared: Prepared,
        options: &DeployOptions,
        recorder: &Recorder,
        leases: &Leases,
        cancel: &CancellationToken,
        done: Vec<HostRun>,
    ) -> Result<Deployment, EngineError> {
        let _cancel_watch = leases.watch_cancel(recorder.deployment_id(), cancel).await;
        let id = recorder.deployment_id();
        let keys = Arc::new(KeyTexts::new(
            &self.config.flake,
            &self.config.nix,
            &prepared.hosts,
        ));
        let settle = Settle::Yes {
            activation_timeout: options.activation_timeout,
        };
        let mut gates = Gates::new(
            self.config.policy.clone(),
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
        // Nothing may start yet: wait before probing (connections are not
        // held open through a long wait).
        if let Some(reason) = gates
            .wait_for_window(prepared.hosts.iter().map(|h| h.name.as_str()), cancel)
            .await?
        {
            prepared.discard().await;
            return self
                .finish_as(
                    recorder,
                    nix_deploy_core::events::DeploymentStatus::Cancelled,
                    Some(reason),
                )
                .await;
        }
        let probed = self
            .probe_all(prepared.hosts, Some(recorder), settle, prepared.early)
            .await?;
        let mut facts = Vec::new();
        for (assessment, _) in &probed {
            facts.push(self.facts(assessment, None).await?);
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
                self.store
                    .finish_deployment(
                        id,
                        nix_deploy_core::events::DeploymentStatus::Failed,
                        Some(&e.to_string()),
                    )
                    .await?;
                return Err(e.into());
            }
        };
        self.store.set_plan(id, &plan).await?;
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
            nix: self.config.nix.clone(),
            ssh: self.config.ssh.clone(),
            options: options.clone(),
            recorder: recorder.clone(),
            keys,
        });
        let mut execution = Execution {
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
        if let Err(error) = result {
            let _ = self
                .store
                .finish_deployment(
                    id,
                    nix_deploy_core::events::DeploymentStatus::Failed,
                    Some(&error.to_string()),
                )
                .await;
            return Err(error);
        }
        let aborted = execution.aborted();
        let stopped = execution.gates.stopped().map(str::to_string);
        let mut hosts = done;
        hosts.extend(execution.runs.into_values());
        // Rejected, timed out, or outside its window for good: cancelled,
        // saying why (unless something failed).
        if aborted.is_none()
            && let Some(reason) = stopped
            && !hosts.iter().any(|h| h.status.is_failure())
        {
            return self
                .finish_as(
                    recorder,
                    nix_deploy_core::events::DeploymentStatus::Cancelled,
                    Some(reason),
                )
                .await;
        }
        self.finish(recorder, hosts, aborted, cancel).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix_deploy_core::events::SystemRef;
    use nix_deploy_core::plan::Risk;

    fn host(name: &str, waits_for: &[&str], depends_on: &[&str], canary: bool) -> PlannedHost {
        PlannedHost {
            name: name.into(),
            role: "client".into(),
            state: HostState::Changed,
            changed: true,
            current: SystemRef::default(),
            target_path: String::new(),
            action: Action::Deploy,
            reason: None,
            error: None,
            depends_on: depends_on.iter().map(|s| s.to_string()).collect(),
            waits_for: waits_for.iter().map(|s| s.to_string()).collect(),
            phase: Some(0),
            canary,
            batch: None,
            estimate_seconds: 1.0,
            estimate_from_history: false,
            estimate_source: nix_deploy_core::plan::EstimateSource::Default,
            risk: Risk::Low,
            risk_reasons: Vec::new(),
            summary: None,
            eval_cached: false,
        }
    }

    fn plan(strategy: Strategy, hosts: Vec<PlannedHost>, max_failures: Option<usize>) -> Plan {
        Plan {
            strategy,
            strategy_reason: String::new(),
            hosts,
            phases: Vec::new(),
            eta_seconds: 0.0,
            risk: Risk::Low,
            risk_reasons: Vec::new(),
            rollback_strategy: String::new(),
            warnings: Vec::new(),
            parallel_limit: 2,
            max_failures,
            rollback_all_on_abort: true,
            canary_soak_seconds: None,
        }
    }

    fn names(hosts: &[PlannedHost]) -> Vec<&str> {
        hosts.iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn a_host_starts_only_after_what_it_waits_for_ended_healthy() {
        let hosts = vec![
            host("db", &[], &[], false),
            host("web", &["db"], &["db"], false),
        ];
        let p = plan(Strategy::Smart, hosts.clone(), Some(0));
        let mut s = Schedule::new(&p, hosts);
        assert_eq!(names(&s.take_ready(4)), ["db"]);
        assert!(s.take_ready(4).is_empty(), "web waits for db");
        assert_eq!(
            s.finished("db", Outcome::Healthy, HostStatus::Deployed),
            None
        );
        assert!(s.take_blocked().is_empty());
        assert_eq!(names(&s.take_ready(4)), ["web"]);
        assert!(s.take_rest(false).is_empty());
    }

    #[test]
    fn dependents_of_a_failed_host_are_skipped_with_the_reason() {
        let hosts = vec![
            host("db", &[], &[], false),
            host("web", &["db"], &["db"], false),
        ];
        let p = plan(Strategy::Smart, hosts.clone(), None);
        let mut s = Schedule::new(&p, hosts);
        s.take_ready(4);
        assert_eq!(
            s.finished("db", Outcome::NotHealthy, HostStatus::RolledBack),
            None
        );
        let blocked = s.take_blocked();
        assert_eq!(blocked.len(), 1);
        assert_eq!(blocked[0].0.name, "web");
        assert_eq!(blocked[0].1, "dependency db rolled-back");
    }

    #[test]
    fn the_parallel_limit_bounds_what_starts() {
        let hosts: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| host(n, &[], &[], false))
            .collect();
        let p = plan(Strategy::Parallel, hosts.clone(), Some(0));
        let mut s = Schedule::new(&p, hosts);
        assert_eq!(names(&s.take_ready(2)), ["a", "b"]);
        assert!(s.take_ready(0).is_empty());
        s.finished("a", Outcome::Healthy, HostStatus::Deployed);
        assert_eq!(names(&s.take_ready(1)), ["c"]);
    }

    #[test]
    fn failures_beyond_the_allowance_stop_the_deployment() {
        let hosts: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| host(n, &[], &[], false))
            .collect();
        let p = plan(Strategy::Parallel, hosts.clone(), Some(1));
        let mut s = Schedule::new(&p, hosts);
        s.take_ready(2);
        // Equal to the allowance: go on.
        assert_eq!(
            s.finished("a", Outcome::NotHealthy, HostStatus::Failed),
            None
        );
        assert_eq!(names(&s.take_ready(1)), ["c"]);
        // Unreachable and unhealthy hosts are not failures of ours.
        assert_eq!(
            s.finished("c", Outcome::NotHealthy, HostStatus::Unhealthy),
            None
        );
        let reason = s
            .finished("b", Outcome::NotHealthy, HostStatus::RolledBack)
            .unwrap();
        assert!(reason.contains("2 host(s) failed"), "{reason}");
        assert!(s.take_ready(4).is_empty(), "nothing starts after an abort");
        let rest = s.take_rest(false);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].1, HostStatus::Skipped);
        assert!(rest[0].2.starts_with("not started: 2 host(s) failed"));
    }

    #[test]
    fn a_failed_canary_stops_a_canary_deployment_and_cancel_names_itself() {
        let hosts = vec![host("c1", &[], &[], true), host("w1", &["c1"], &[], false)];
        let p = plan(Strategy::Canary, hosts.clone(), None);
        let mut s = Schedule::new(&p, hosts.clone());
        s.take_ready(4);
        let reason = s.finished("c1", Outcome::NotHealthy, HostStatus::RolledBack);
        assert_eq!(
            reason.as_deref(),
            Some("canary c1 failed; the deployment stopped")
        );
        assert_eq!(s.take_blocked()[0].1, "canary c1 rolled-back");

        let mut s = Schedule::new(&p, hosts);
        s.take_ready(4);
        let rest = s.take_rest(true);
        assert_eq!(rest[0].1, HostStatus::Cancelled);
    }
}
