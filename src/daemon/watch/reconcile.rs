//! `on-drift = "redeploy"`: a drifted or behind host is deployed through the
//! normal pipeline (leases, strategy, health checks, rollback), recorded
//! with trigger `reconcile`; one reconcile at a time per host, at most
//! `reconcile-limit` at once, and after a failure not again before a backoff
//! that doubles with each failure (up to an hour, or the configured backoff
//! if longer). Failures before this process (a restart, another leader) are
//! read from the history once per host, so the backoff survives them.
//!
//! [`request`] is where a reconciling deployment's request is built: checks
//! that must hold before one may start (maintenance windows, approvals) go
//! there.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::mpsc;

use nix_deploy_core::events::DeploymentStatus;
use nix_deploy_core::fleet::Selection;
use nix_deploy_core::options::DeployOptions;

use crate::daemon::{ApiError, AppState, Job};
use crate::engine::DeployRequest;

/// How a reconcile ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Succeeded,
    /// Another deployment holds the host: not a failure, tried again later.
    Busy,
    Failed(String),
}

/// The deployment that puts `host` back on the flake's system.
pub(super) fn request(host: &str, defaults: DeployOptions) -> DeployRequest {
    DeployRequest {
        selection: Selection {
            names: vec![host.to_string()],
            ..Selection::default()
        },
        // Refused when busy: the watch tries again at a later probe.
        wait: false,
        options: defaults,
        trigger: "reconcile".into(),
        requested_by: "watch".into(),
        source: None,
    }
}

/// The longest wait after failures (unless the configured backoff is longer).
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

pub(super) struct Reconciler {
    limit: usize,
    backoff: Duration,
    running: BTreeSet<String>,
    /// Failures in a row, and the earliest next attempt (Unix ms).
    failures: BTreeMap<String, (u32, i64)>,
    /// Hosts whose earlier failures were read from the history.
    seeded: BTreeSet<String>,
    outcomes: mpsc::UnboundedSender<(String, Outcome)>,
}

impl Reconciler {
    pub fn new(
        limit: usize,
        backoff: Duration,
    ) -> (Self, mpsc::UnboundedReceiver<(String, Outcome)>) {
        let (outcomes, receiver) = mpsc::unbounded_channel();
        (
            Reconciler {
                limit,
                backoff,
                running: BTreeSet::new(),
                failures: BTreeMap::new(),
                seeded: BTreeSet::new(),
                outcomes,
            },
            receiver,
        )
    }

    /// Whether what happened to `host` before this process (its failures
    /// in a row and when the last ended, from the history) is known yet.
    pub fn knows(&self, host: &str) -> bool {
        self.failures.contains_key(host) || self.seeded.contains(host)
    }

    /// Back off from `failures` earlier failures of `host`, the last ended
    /// at `last` (Unix ms): a new leader or a restart does not retry at once.
    pub fn seed(&mut self, host: &str, failures: u32, last: Option<i64>) {
        self.seeded.insert(host.to_string());
        if let (true, Some(last)) = (failures > 0, last) {
            let wait = self.wait(failures);
            self.failures
                .insert(host.to_string(), (failures, last + wait.as_millis() as i64));
        }
    }

    /// Whether `host` may be reconciled at `now`.
    pub fn may_start(&self, host: &str, now: i64) -> bool {
        !self.running.contains(host)
            && self.running.len() < self.limit
            && self.failures.get(host).is_none_or(|(_, at)| *at <= now)
    }

    /// Deploy `host` from `flake` in the background; its outcome comes back
    /// through the receiver [`Reconciler::new`] gave.
    pub fn start(&mut self, state: &AppState, host: &str, flake: &str) {
        self.running.insert(host.to_string());
        let state = state.clone();
        let engine = state.engine_with_flake(flake);
        let request = request(host, state.default_options());
        let outcomes = self.outcomes.clone();
        let name = host.to_string();
        tracing::info!(host, "reconciling a drifted host");
        state.tasks.clone().spawn(async move {
            let done = outcomes.clone();
            let done_name = name.clone();
            let launched = state
                .launch(engine, Job::Deploy(request), move |result| {
                    let outcome = match result {
                        Ok(d) if d.status == DeploymentStatus::Succeeded => Outcome::Succeeded,
                        Ok(d) => Outcome::Failed(format!("deployment #{} {}", d.id, d.status)),
                        Err(e) => Outcome::Failed(e.to_string()),
                    };
                    let _ = done.send((done_name, outcome));
                })
                .await;
            match launched {
                Ok(id) => tracing::info!(host = %name, deployment = id, "reconciling"),
                Err(ApiError::Conflict(_)) => {
                    let _ = outcomes.send((name, Outcome::Busy));
                }
                Err(e) => {
                    let _ = outcomes.send((name, Outcome::Failed(e.to_string())));
                }
            }
        });
    }

    /// A reconcile of `host` ended at `now`.
    pub fn finished(&mut self, host: &str, outcome: &Outcome, now: i64) {
        self.running.remove(host);
        match outcome {
            Outcome::Succeeded => {
                self.failures.remove(host);
            }
            Outcome::Busy => {}
            Outcome::Failed(why) => {
                let failures = self.failures.get(host).map_or(0, |(n, _)| *n) + 1;
                let wait = self.wait(failures);
                tracing::warn!(
                    host,
                    cause = %why,
                    failures,
                    retry_in_seconds = wait.as_secs(),
                    "reconciling failed"
                );
                self.failures
                    .insert(host.to_string(), (failures, now + wait.as_millis() as i64));
            }
        }
    }

    /// The wait after `failures` failures in a row.
    fn wait(&self, failures: u32) -> Duration {
        let doubled = self
            .backoff
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        doubled.min(MAX_BACKOFF.max(self.backoff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_at_a_time_per_host_with_a_doubling_backoff() {
        let (mut r, _rx) = Reconciler::new(2, Duration::from_secs(60));
        assert!(r.may_start("a", 0));
        r.running.insert("a".into());
        assert!(!r.may_start("a", 0), "one at a time per host");
        r.running.insert("b".into());
        assert!(!r.may_start("c", 0), "at most the limit at once");
        r.finished("b", &Outcome::Busy, 0);
        assert!(r.may_start("b", 0), "busy is not a failure");
        r.finished("a", &Outcome::Failed("rolled back".into()), 0);
        assert!(!r.may_start("a", 59_999));
        assert!(r.may_start("a", 60_000));
        r.running.insert("a".into());
        r.finished("a", &Outcome::Failed("rolled back".into()), 60_000);
        assert!(!r.may_start("a", 60_000 + 119_999), "doubled");
        assert!(r.may_start("a", 60_000 + 120_000));
        assert_eq!(r.wait(30), MAX_BACKOFF);
        r.finished("a", &Outcome::Succeeded, 200_000);
        assert!(r.may_start("a", 200_000));
        // Failures before this process: backed off from the last one.
        assert!(!r.knows("z"));
        r.seed("z", 2, Some(1_000));
        assert!(r.knows("z"));
        assert!(!r.may_start("z", 1_000 + 119_999));
        assert!(r.may_start("z", 1_000 + 120_000));
        r.seed("y", 0, None);
        assert!(r.knows("y") && r.may_start("y", 0));
        let request = request("web1", DeployOptions::default());
        assert_eq!(request.trigger, "reconcile");
        assert_eq!(request.selection.names, ["web1"]);
    }
}
