//! What may hold a host back besides its place in the plan: maintenance
//! windows, approval gates and pause steps (the core's `window` and
//! `approval` decide; this drives them with the store and the clock).
//!
//! The scheduler asks [`Gates::admit`] before it starts each host; when
//! nothing runs and the hosts left are held, [`Gates::wait`] waits for
//! what holds them — a window to open (status `waiting-for-window`), or a
//! gate to be approved (status `awaiting-approval`, the gate recorded with
//! what an approver is shown) — or says why they will not start (rejected,
//! timed out, `--no-wait`). Hosts already running always finish.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use nix_deploy_core::approval::{ApprovalRule, Gate, GateKind, GateState, Requirement, rules_for};
use nix_deploy_core::events::{DeploymentStatus, EventKind};
use nix_deploy_core::fleet::Host;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::plan::{Plan, PlannedHost};
use nix_deploy_core::render;
use nix_deploy_core::window::Verdict;

use crate::engine::host::recorder::Recorder;
use crate::engine::{EngineError, Policy};
use crate::now_ms;
use crate::store::Decision;

/// How often a waiting deployment looks for a decision.
const POLL: Duration = Duration::from_millis(300);

/// One deployment's gates.
pub(crate) struct Gates {
    policy: Arc<Policy>,
    recorder: Recorder,
    options: DeployOptions,
    tags: BTreeMap<String, Vec<String>>,
    /// Hosts of the plan with canaries (for `--pause-after-canary`).
    has_canaries: bool,
    plan_hosts: BTreeMap<String, PlannedHost>,
    approval_passed: bool,
    pauses_passed: usize,
    gates_opened: u32,
    stopped: Option<String>,
}

impl Gates {
    /// The gates of deployment `recorder`, after the ones an earlier
    /// attempt (resume) passed.
    pub async fn new(
        policy: Arc<Policy>,
        recorder: Recorder,
        options: &DeployOptions,
        hosts: &[Host],
    ) -> Result<Gates, EngineError> {
        let earlier = recorder.store().gates(recorder.deployment_id()).await?;
        let passed = |kind: GateKind| {
            earlier
                .iter()
                .filter(|g| g.kind == kind && g.state == GateState::Approved)
                .count()
        };
        Ok(Gates {
            policy,
            options: options.clone(),
            tags: hosts
                .iter()
                .map(|h| (h.name.clone(), h.tags.clone()))
                .collect(),
            has_canaries: false,
            plan_hosts: BTreeMap::new(),
            approval_passed: passed(GateKind::Approval) > 0,
            pauses_passed: passed(GateKind::Pause),
            gates_opened: earlier.len() as u32,
            stopped: None,
            recorder,
        })
    }

    /// The deployment's plan: its canaries, batches and what each host
    /// would run (shown to approvers).
    pub fn set_plan(&mut self, plan: &Plan) {
        self.has_canaries = plan.hosts.iter().any(|h| h.canary);
        self.plan_hosts = plan
            .hosts
            .iter()
            .map(|h| (h.name.clone(), h.clone()))
            .collect();
    }

    /// Why the deployment stopped waiting for good, if it did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    fn tags(&self, name: &str) -> &[String] {
        self.tags.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    fn rules(&self, name: &str) -> Vec<&ApprovalRule> {
        rules_for(&self.policy.approvals, name, self.tags(name))
    }

    fn needs_approval(&self, name: &str) -> bool {
        !self.approval_passed && !self.rules(name).is_empty()
    }

    /// The pause (1, 2, …) that must be promoted before `host` starts.
    fn pause_stage(&self, host: &PlannedHost) -> Option<usize> {
        if self.options.pause_after_canary && self.has_canaries && !host.canary {
            return Some(1);
        }
        if self.options.pause_after_batch {
            return host.batch.filter(|b| *b > 0);
        }
        None
    }

    fn pause_pending(&self, host: &PlannedHost) -> Option<usize> {
        self.pause_stage(host).filter(|s| *s > self.pauses_passed)
    }

    fn window(&self, name: &str, now: i64) -> Verdict {
        if self.options.override_window.is_some() {
            return Verdict::Open { until: None };
        }
        self.policy.windows.verdict(name, self.tags(name), now)
    }

    /// Whether `host` may start now.
    pub fn admit(&self, host: &PlannedHost) -> bool {
        !self.needs_approval(&host.name)
            && self.pause_pending(host).is_none()
            && self.window(&host.name, now_ms()).is_open()
    }

    /// Nothing runs and `held` cannot start: wait for what holds them.
    /// `Ok(None)`: look again; `Ok(Some(reason))`: they never will.
    pub async fn wait(
        &mut self,
        held: &[PlannedHost],
        cancel: &CancellationToken,
    ) -> Result<Option<String>, EngineError> {
        let stage = held.iter().filter_map(|h| self.pause_pending(h)).min();
        let result = if let Some(stage) = stage {
            let hosts = held
                .iter()
                .filter(|h| self.pause_pending(h) == Some(stage))
                .map(|h| h.name.clone())
                .collect();
            let title = if self.options.pause_after_canary && stage == 1 && self.has_canaries {
                "paused after the canaries".to_string()
            } else {
                format!("paused before batch {}", stage + 1)
            };
            let decided = self.gate(GateKind::Pause, title, hosts, cancel).await?;
            if decided.is_none() && !cancel.is_cancelled() {
                self.pauses_passed = stage;
            }
            decided
        } else if held.iter().any(|h| self.needs_approval(&h.name)) {
            let hosts: Vec<String> = held
                .iter()
                .filter(|h| self.needs_approval(&h.name))
                .map(|h| h.name.clone())
                .collect();
            let mut names: Vec<String> = hosts
                .iter()
                .flat_map(|h| self.rules(h).into_iter().map(|r| r.name.clone()))
                .collect();
            names.sort();
            names.dedup();
            let title = format!("approval rule {}", names.join(", "));
            let decided = self.gate(GateKind::Approval, title, hosts, cancel).await?;
            if decided.is_none() && !cancel.is_cancelled() {
                self.approval_passed = true;
            }
            decided
        } else {
            self.wait_for_window(held.iter().map(|h| h.name.as_str()), cancel)
                .await?
        };
        if let Some(reason) = &result {
            self.stopped = Some(reason.clone());
        }
        Ok(result)
    }

    /// Wait until one of `hosts` may start by its windows (the deployment
    /// shows `waiting-for-window`), or say why it will not.
    pub async fn wait_for_window<'a>(
        &self,
        hosts: impl Iterator<Item = &'a str>,
        cancel: &CancellationToken,
    ) -> Result<Option<String>, EngineError> {
        let now = now_ms();
        let mut closed = Vec::new();
        let mut first: Option<i64> = None;
        let mut reason = String::new();
        for name in hosts {
            match self.window(name, now) {
                Verdict::Open { .. } => return Ok(None),
                Verdict::Closed {
                    reason: why,
                    opens_at,
                } => {
                    closed.push(name.to_string());
                    if reason.is_empty() {
                        reason = why;
                    }
                    if let Some(t) = opens_at {
                        first = Some(first.map_or(t, |f| f.min(t)));
                    }
                }
            }
        }
        if closed.is_empty() {
            return Ok(None);
        }
        let id = self.recorder.deployment_id();
        self.recorder
            .emit(
                None,
                EventKind::WaitingForWindow {
                    hosts: closed.clone(),
                    reason: reason.clone(),
                    until: first,
                },
            )
            .await?;
        if self.options.no_wait {
            return Ok(Some(format!(
                "outside the maintenance window ({reason}); --no-wait"
            )));
        }
        let Some(until) = first else {
            return Ok(Some(format!(
                "outside the maintenance window ({reason}), and none opens within 400 days"
            )));
        };
        let store = self.recorder.store();
        store
            .set_deployment_status(id, DeploymentStatus::WaitingForWindow)
            .await?;
        // The clock is read again after every short sleep: a clock that
        // jumps changes when we wake, never what we wait for.
        while now_ms() < until && !cancel.is_cancelled() {
            let left = Duration::from_millis((until - now_ms()).max(0) as u64);
            tokio::select! {
                _ = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
                _ = cancel.cancelled() => {}
            }
        }
        store
            .set_deployment_status(id, DeploymentStatus::Running)
            .await?;
        Ok(None)
    }

    /// Open a gate for `hosts` and wait for its decision.
    async fn gate(
        &mut self,
        kind: GateKind,
        title: String,
        hosts: Vec<String>,
        cancel: &CancellationToken,
    ) -> Result<Option<String>, EngineError> {
        let id = self.recorder.deployment_id();
        let store = self.recorder.store().clone();
        let now = now_ms();
        let (requirements, timeout): (Vec<Requirement>, Option<Duration>) = match kind {
            GateKind::Pause => (Vec::new(), None),
            GateKind::Approval => {
                let mut rules: Vec<&ApprovalRule> =
                    hosts.iter().flat_map(|h| self.rules(h)).collect();
                rules.sort_by(|a, b| a.name.cmp(&b.name));
                rules.dedup_by(|a, b| a.name == b.name);
                (
                    rules.iter().map(|r| r.requirement()).collect(),
                    rules.iter().map(|r| r.timeout).min(),
                )
            }
        };
        self.gates_opened += 1;
        let mut gate = Gate {
            number: self.gates_opened,
            kind,
            title: title.clone(),
            host_tags: hosts
                .iter()
                .map(|h| (h.clone(), self.tags(h).to_vec()))
                .collect(),
            hosts: hosts.clone(),
            requirements,
            state: GateState::Open,
            opened_at: now,
            deadline: timeout.map(|t| now + t.as_millis() as i64),
            approvals: Vec::new(),
            decided_by: None,
            decided_at: None,
            reason: None,
            summary: self.summary(&hosts),
        };
        store.open_gate(id, &gate).await?;
        store
            .set_deployment_status(id, DeploymentStatus::AwaitingApproval)
            .await?;
        self.recorder
            .emit(
                None,
                EventKind::GateOpened {
                    gate: gate.number,
                    gate_kind: kind,
                    title,
                    hosts,
                    missing: gate.missing(),
                    deadline: gate.deadline,
                },
            )
            .await?;
        let outcome = loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = cancel.cancelled() => {}
            }
            if cancel.is_cancelled() {
                let _ = store
                    .decide_gate(
                        id,
                        GateState::Closed,
                        "nix-deploy",
                        "the deployment was cancelled",
                    )
                    .await?;
                break None;
            }
            if let Some(now_gate) = store
                .gates(id)
                .await?
                .into_iter()
                .find(|g| g.number == gate.number)
            {
                gate = now_gate;
            }
            match gate.state {
                GateState::Open if gate.expired(now_ms()) => {
                    let why = format!(
                        "approval timed out after {} (still needed: {})",
                        render::duration_ms(gate.deadline.unwrap_or(now) - gate.opened_at),
                        gate.missing()
                    );
                    if let Decision::Done(decided) = store
                        .decide_gate(id, GateState::Expired, "nix-deploy", &why)
                        .await?
                    {
                        gate = *decided;
                        break Some(why);
                    }
                }
                GateState::Open => {}
                GateState::Approved => break None,
                GateState::Rejected => {
                    break Some(format!(
                        "rejected by {}: {}",
                        gate.decided_by.as_deref().unwrap_or("?"),
                        gate.reason.as_deref().unwrap_or("")
                    ));
                }
                GateState::Expired | GateState::Closed => {
                    break Some(gate.reason.clone().unwrap_or_else(|| "gate closed".into()));
                }
            }
        };
        self.recorder
            .emit(
                None,
                EventKind::GateDecided {
                    gate: gate.number,
                    state: gate.state,
                    by: gate.decided_by.clone(),
                    reason: gate.reason.clone(),
                },
            )
            .await?;
        store
            .set_deployment_status(id, DeploymentStatus::Running)
            .await?;
        Ok(outcome)
    }

    /// What an approver is shown: each held host, what it runs and what it
    /// would run, and the change.
    fn summary(&self, hosts: &[String]) -> String {
        hosts
            .iter()
            .map(|name| match self.plan_hosts.get(name) {
                Some(h) => format!(
                    "{name}: {} → {}{}",
                    render::short_path(h.current.path.as_deref()),
                    render::short_path(Some(&h.target_path)),
                    h.summary
                        .as_ref()
                        .map(|s| format!(" ({})", s.one_line()))
                        .unwrap_or_default()
                ),
                None => name.clone(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// With `--no-wait`: the hosts outside their windows now, as a refusal
/// (before anything is recorded).
pub(crate) fn refuse_outside_windows(
    policy: &Policy,
    hosts: &[Host],
    options: &DeployOptions,
) -> Result<(), EngineError> {
    if !options.no_wait || options.override_window.is_some() || policy.windows.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let closed: Vec<String> = hosts
        .iter()
        .filter_map(|h| match policy.windows.verdict(&h.name, &h.tags, now) {
            Verdict::Open { .. } => None,
            Verdict::Closed { reason, opens_at } => Some(format!(
                "{}: {reason}, next opening {}",
                h.name,
                opens_at.map_or("none within 400 days".into(), render::timestamp)
            )),
        })
        .collect();
    if closed.is_empty() {
        return Ok(());
    }
    Err(EngineError::OutsideWindow(closed.join("; ")))
}
