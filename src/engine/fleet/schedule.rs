//! When each host of a plan may start, decided without IO: a host starts
//! once every host it `waits_for` ended healthy, at most `parallel_limit` at
//! once; a host whose prerequisite did not end healthy is skipped with the
//! reason; the deployment stops starting hosts when the plan's failure
//! policy says so. [`super::execution`] drives it with real hosts.

use std::collections::{BTreeMap, BTreeSet};

use nix_deploy_core::events::HostStatus;
use nix_deploy_core::options::Strategy;
use nix_deploy_core::plan::{Plan, PlannedHost};

use crate::engine::host::pipeline::Outcome;

/// The scheduler's decisions, without IO.
pub(crate) struct Schedule {
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

#[cfg(test)]
mod tests {
    use super::*;
    use nix_deploy_core::events::{HostState, SystemRef};
    use nix_deploy_core::plan::{Action, Risk};

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
