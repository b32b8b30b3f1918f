//! The watch loop, run by the leader only: one task that owns the
//! schedule, the tracked flake's evaluation, the leases it steers around,
//! pull mode and reconciliation, and makes every write. Probes, evaluations
//! and polls run as tasks of its own (a bounded number of probes at once);
//! their results come back here, one at a time, so a host's state has one
//! writer. Every write is refused by the store once this daemon no longer
//! leads, and the loop is stopped within a second of it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::drift::{self, AlertKind, History};
use nix_deploy_core::watch::{HostWatch, Observation, OnDrift, alert_detail, assess, unobserved};

use super::config::WatchConfig;
use super::pull::{self, Decision, Polled, Puller};
use super::reconcile::{Outcome, Reconciler};
use super::schedule::Schedule;
use crate::daemon::AppState;
use crate::engine::DesiredFleet;
use crate::now_ms;
use crate::store::{NewAlert, WatchChange, WatchRow};

/// How often the loop looks at its schedule and the leases.
const TICK: Duration = Duration::from_secs(1);
/// How often hosts' last sight is written to the store (it is not a change,
/// but followers and the next leader read it).
const FLUSH_MS: i64 = 60 * 1000;

/// What a task of the loop brings back.
enum Done {
    Observed(String, Box<Observation>),
    Evaluated {
        flake: String,
        result: Result<DesiredFleet, String>,
    },
    Polled(Polled),
}

pub(super) struct Observer {
    state: AppState,
    config: WatchConfig,
    /// The flake evaluated now (pinned to the branch's head in pull mode).
    flake: String,
    /// The last evaluation that worked: hosts, targets, health checks.
    desired: Option<DesiredFleet>,
    /// Why the last evaluation failed (every desired system is unknown).
    evaluation_error: Option<String>,
    evaluating: bool,
    next_eval: i64,
    schedule: Schedule,
    probes: Arc<Semaphore>,
    /// Probes under way, and when each started.
    in_flight: BTreeMap<String, i64>,
    /// Hosts leased by a deployment, and which.
    leased: BTreeMap<String, Option<i64>>,
    /// When each host's lease was last let go: a probe started before it
    /// saw the host before the deployment ended.
    released_at: BTreeMap<String, i64>,
    reconciler: Reconciler,
    outcomes: mpsc::UnboundedReceiver<(String, Outcome)>,
    puller: Option<Puller>,
    /// Pull mode knows the branch's head (recorded, or polled once): the
    /// first evaluation waits for it.
    branch_known: bool,
    tasks: JoinSet<Done>,
    last_flush: i64,
}

impl Observer {
    pub async fn new(state: AppState) -> Observer {
        let config = state.config.watch.clone();
        let mut flake = config.flake(&state.config.flake).to_string();
        let puller = config
            .branch
            .as_deref()
            .and_then(|branch| Puller::new(branch, &flake));
        // Pull mode: until the first poll, the branch head last recorded.
        let mut branch_known = puller.is_none();
        if let Some(puller) = &puller {
            state.fleet.branch(|b| {
                b.branch = puller.branch.clone();
                b.remote = puller.remote.clone();
            });
            if let Ok(Some(head)) = state.store().branch_head(&puller.branch).await
                && let Ok(pinned) = puller.pinned(&head.commit)
            {
                flake = pinned;
                branch_known = true;
            }
        }
        // Whether the fleet was last said not to evaluate, across restarts.
        let evaluation_error = match state.store().last_fleet_alert().await {
            Ok(Some(alert)) if alert.kind == AlertKind::EvaluationFailed => {
                Some(alert.detail.unwrap_or_default())
            }
            _ => None,
        };
        let (reconciler, outcomes) =
            Reconciler::new(config.reconcile_limit, config.reconcile_backoff);
        Observer {
            schedule: Schedule::new(config.interval, config.health_interval),
            probes: Arc::new(Semaphore::new(config.concurrency)),
            state,
            flake,
            desired: None,
            evaluation_error,
            evaluating: false,
            next_eval: 0,
            in_flight: BTreeMap::new(),
            leased: BTreeMap::new(),
            released_at: BTreeMap::new(),
            reconciler,
            outcomes,
            puller,
            branch_known,
            tasks: JoinSet::new(),
            last_flush: now_ms(),
            config,
        }
    }

    pub async fn run(mut self, stop: CancellationToken) {
        // Whoever reads the store sees who watches from now on.
        self.save_header().await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => match joined {
                    Ok(done) => self.done(done).await,
                    Err(e) => tracing::warn!(cause = %e, "a watch task failed"),
                },
                Some((host, outcome)) = self.outcomes.recv() => {
                    self.reconciler.finished(&host, &outcome, now_ms());
                }
                _ = tick.tick() => self.tick().await,
            }
        }
        // Probes in flight are dropped (their connections with them).
        self.tasks.abort_all();
        if self.state.is_leader() {
            self.flush().await;
        }
    }

    async fn tick(&mut self) {
        let now = now_ms();
        let interval = self.config.interval.as_millis() as i64;
        if let Some(puller) = &mut self.puller
            && !puller.polling
            && now >= puller.next_poll
        {
            puller.polling = true;
            puller.next_poll = now + self.config.poll_interval.as_millis() as i64;
            let poll = puller.poll(&self.state);
            self.tasks.spawn(async move { Done::Polled(poll.await) });
        }
        if !self.evaluating && now >= self.next_eval && self.branch_known {
            self.evaluating = true;
            self.next_eval = now + interval;
            let engine = self.state.engine_with_flake(&self.flake);
            let flake = self.flake.clone();
            self.tasks.spawn(async move {
                let result = engine.desired_fleet().await.map_err(|e| e.to_string());
                Done::Evaluated { flake, result }
            });
        }
        // A lease whose holder died is no deployment: that host is watched
        // (and its lease taken over by the next deployment).
        match self.state.store().live_leases().await {
            Ok(leases) => {
                let live = leases
                    .into_iter()
                    .map(|l| (l.host, l.deployment_id))
                    .collect();
                self.leases(live, now);
            }
            Err(e) => tracing::warn!(cause = %e, "reading leases"),
        }
        self.start_probes(now);
        if now - self.last_flush >= FLUSH_MS {
            self.flush().await;
        }
    }

    /// Hosts a deployment holds are reported from it; once it lets go,
    /// they are probed (and checked) at once.
    fn leases(&mut self, now_leased: BTreeMap<String, Option<i64>>, now: i64) {
        for (host, deployment) in &now_leased {
            if self.leased.get(host) != Some(deployment) {
                self.state.fleet.set_deployment(host, *deployment);
            }
        }
        for host in self.leased.keys() {
            if !now_leased.contains_key(host) {
                self.state.fleet.set_deployment(host, None);
                self.schedule.soon(host, now, true);
                self.released_at.insert(host.clone(), now);
            }
        }
        self.leased = now_leased;
    }

    fn start_probes(&mut self, now: i64) {
        let Some(desired) = &self.desired else {
            return;
        };
        for host in &desired.hosts {
            if self.in_flight.contains_key(&host.name) || self.leased.contains_key(&host.name) {
                continue;
            }
            let Some(health) = self.schedule.due(&host.name, now) else {
                continue;
            };
            self.schedule.started(&host.name, now, health);
            self.in_flight.insert(host.name.clone(), now);
            let (host, engine) = (host.clone(), self.state.engine());
            let permits = self.probes.clone();
            self.tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let observation = engine.observe_host(&host, health).await;
                Done::Observed(host.meta.name, Box::new(observation))
            });
        }
    }

    async fn done(&mut self, done: Done) {
        match done {
            Done::Observed(host, observation) => self.observed(&host, &observation).await,
            Done::Evaluated { flake, result } => self.evaluated(flake, result).await,
            Done::Polled(polled) => self.polled(polled).await,
        }
    }

    async fn observed(&mut self, name: &str, observation: &Observation) {
        let started = self.in_flight.remove(name).unwrap_or(0);
        // A deployment took the host meanwhile (it reports it now), or had
        // it when this probe began (it is probed again since).
        if self.leased.contains_key(name)
            || self.released_at.get(name).is_some_and(|at| *at > started)
        {
            return;
        }
        let Some(desired) = &self.desired else {
            return;
        };
        let Some(host) = desired.hosts.iter().find(|h| h.name == name).cloned() else {
            return;
        };
        let toplevel = match &self.evaluation_error {
            Some(e) => Err(e.clone()),
            None => desired.toplevel(name).map(str::to_string),
        };
        let history = match self.state.store().past_runs(name, 50).await {
            Ok(runs) => History::from_runs(&runs),
            Err(e) => {
                tracing::warn!(host = name, cause = %e, "reading the host's history");
                return;
            }
        };
        let previous = self.previous(name);
        let mut next = assess(
            &previous.state,
            toplevel.as_deref().map_err(String::as_str),
            observation,
            &history,
        );
        next.tags = host.tags.clone();
        next.fleet_unevaluated = self.evaluation_error.is_some();
        next.on_drift = self.config.on_drift(&host.name, &host.tags);
        next.deployment = None;
        // Back from an outage, or on another system: its health as of now,
        // not as of before.
        let now = now_ms();
        if observation.health.is_none()
            && next.reachable == Some(true)
            && (previous.state.reachable == Some(false) || previous.state.running != next.running)
        {
            self.schedule.soon(name, now, true);
        }
        let redeploy = next.on_drift == OnDrift::Redeploy
            && next.desired.is_some()
            && next.kinds().iter().any(|k| k.reconcilable());
        self.commit(previous, next, observation.at).await;
        if redeploy && !self.reconciler.knows(name) {
            match self.state.store().reconcile_failures(name).await {
                Ok((failures, last)) => self.reconciler.seed(name, failures, last),
                Err(e) => {
                    tracing::warn!(host = name, cause = %e, "reading earlier reconciles");
                    return;
                }
            }
        }
        if redeploy && self.reconciler.may_start(name, now) {
            self.reconciler.start(&self.state, name, &self.flake);
        }
    }

    fn previous(&self, name: &str) -> WatchRow {
        self.state.fleet.row(name).unwrap_or_else(|| WatchRow {
            state: HostWatch {
                name: name.to_string(),
                ..HostWatch::default()
            },
            unreachable_alerted: false,
        })
    }

    /// Make `next` the host's state: in memory when only its last sight
    /// changed; else stored first (with its event and alerts), then shown.
    /// A change that cannot be stored is not shown: the next probe finds it
    /// again.
    async fn commit(&mut self, previous: WatchRow, next: HostWatch, now: i64) {
        let raised = drift::alerts(
            &previous.state.drift,
            &next.drift,
            now,
            self.config.unreachable_after.as_millis() as i64,
            previous.unreachable_alerted,
            // Appearing while, or clearing after, the whole flake failed.
            previous.state.fleet_unevaluated || next.fleet_unevaluated,
        );
        let row = WatchRow {
            state: next,
            unreachable_alerted: raised.unreachable_alerted,
        };
        let significant = significant(&previous.state, &row.state);
        if !significant
            && raised.alerts.is_empty()
            && row.unreachable_alerted == previous.unreachable_alerted
        {
            self.state.fleet.put(row);
            return;
        }
        let alerts = raised
            .alerts
            .into_iter()
            .map(|(kind, drift)| NewAlert {
                kind,
                host: Some(row.state.name.clone()),
                drift,
                detail: alert_detail(kind, &row.state),
            })
            .collect();
        let change = WatchChange {
            row: &row,
            drift: significant.then(|| drift::changes(&previous.state.kinds(), &row.state.kinds())),
            alerts,
        };
        match self.state.store().record_watch(&change).await {
            Ok((event, alerts)) => {
                self.state.fleet.put(row);
                if event.is_some() {
                    self.state.fleet.changed();
                }
                if !alerts.is_empty() {
                    self.state.alerts_ready.notify_one();
                }
            }
            Err(e) => tracing::warn!(
                host = %row.state.name,
                cause = %e,
                "recording a host's change (it is looked at again at its next probe)"
            ),
        }
    }

    async fn evaluated(&mut self, flake: String, result: Result<DesiredFleet, String>) {
        self.evaluating = false;
        let now = now_ms();
        if flake != self.flake {
            // The branch moved meanwhile: evaluate what it points at now.
            self.next_eval = now;
            return;
        }
        match result {
            Ok(fleet) => {
                if self.evaluation_error.take().is_some() {
                    self.fleet_alert(AlertKind::EvaluationRecovered, None).await;
                }
                let names: Vec<&str> = fleet.hosts.iter().map(|h| h.name.as_str()).collect();
                self.schedule.hosts(&names, now);
                // What a host should run changed: look at it soon.
                for host in &fleet.hosts {
                    let moved = self
                        .state
                        .fleet
                        .row(&host.name)
                        .is_some_and(|r| r.state.desired.as_deref() != Some(host.toplevel()));
                    if moved {
                        self.schedule.soon(&host.name, now, false);
                    }
                }
                for row in self.state.fleet.rows() {
                    let gone = !names.contains(&row.state.name.as_str())
                        && !fleet.failed.iter().any(|f| f.host == row.state.name);
                    if gone
                        && self
                            .state
                            .store()
                            .forget_watch_host(&row.state.name)
                            .await
                            .is_ok()
                    {
                        self.state.fleet.remove(&row.state.name);
                    }
                }
                for failure in &fleet.failed {
                    let previous = self.previous(&failure.host);
                    let mut next = unobserved(&previous.state, &failure.error, now);
                    next.fleet_unevaluated = false;
                    self.commit(previous, next, now).await;
                }
                self.state.fleet.header(|h| {
                    h.flake = flake.clone();
                    h.revision = fleet.revision.clone();
                    h.evaluated_at = Some(now);
                    h.evaluation_error = None;
                });
                self.desired = Some(fleet);
                self.save_header().await;
            }
            Err(error) => {
                tracing::warn!(flake, cause = %error, "the tracked flake does not evaluate");
                if self.evaluation_error.is_none() {
                    self.fleet_alert(AlertKind::EvaluationFailed, Some(error.clone()))
                        .await;
                }
                self.evaluation_error = Some(error.clone());
                self.state.fleet.header(|h| {
                    h.evaluated_at = Some(now);
                    h.evaluation_error = Some(error.clone());
                });
                self.save_header().await;
                // Without an earlier evaluation nobody knows how to reach the
                // hosts: they are reported as last stored, desired unknown.
                if self.desired.is_none() {
                    for previous in self.state.fleet.rows() {
                        let mut next = unobserved(&previous.state, &error, now);
                        next.fleet_unevaluated = true;
                        self.commit(previous, next, now).await;
                    }
                }
            }
        }
    }

    async fn fleet_alert(&self, kind: AlertKind, detail: Option<String>) {
        let alert = NewAlert {
            kind,
            host: None,
            drift: Vec::new(),
            detail,
        };
        match self.state.store().record_alert(&alert).await {
            Ok(_) => self.state.alerts_ready.notify_one(),
            Err(e) => tracing::warn!(cause = %e, "recording the fleet's alert"),
        }
    }

    async fn polled(&mut self, polled: Polled) {
        let Some(mut puller) = self.puller.take() else {
            return;
        };
        puller.polling = false;
        self.branch_known = true;
        let now = now_ms();
        let commit = polled.commit.clone().ok();
        let decision = pull::decide(&self.state, &mut puller, polled).await;
        let error = match decision {
            Decision::Unchanged => None,
            Decision::Refused(why) => {
                tracing::warn!(branch = %puller.branch, cause = %why, "pull mode");
                Some(why)
            }
            Decision::Track {
                commit,
                flake,
                deploy,
            } => {
                self.flake = flake.clone();
                self.next_eval = now;
                if deploy {
                    match pull::deploy(&self.state, &puller.branch, &commit, &flake).await {
                        Ok(id) => {
                            tracing::info!(branch = %puller.branch, deployment = id, "the branch moved: deploying");
                            None
                        }
                        Err(e) => Some(format!("deploying {flake}: {e}")),
                    }
                } else {
                    None
                }
            }
        };
        self.state.fleet.branch(|b| {
            b.polled_at = Some(now);
            if commit.is_some() {
                b.commit = puller.seen.clone();
            }
            b.error = error;
        });
        self.puller = Some(puller);
        self.save_header().await;
    }

    /// Store the fleet-wide part of the view, for followers and the next
    /// leader.
    async fn save_header(&self) {
        if let Err(e) = self
            .state
            .store()
            .save_watch_fleet(&self.state.fleet.header_now())
            .await
        {
            tracing::warn!(cause = %e, "saving the watched fleet");
        }
    }

    /// Write every host's state as it is (its last sight included).
    async fn flush(&mut self) {
        self.last_flush = now_ms();
        if let Err(e) = self
            .state
            .store()
            .save_watch_hosts(&self.state.fleet.rows())
            .await
        {
            tracing::warn!(cause = %e, "saving the watched hosts");
        }
    }
}

/// Whether two states differ in more than when the host was last seen,
/// probed or checked, or the wording of a probe's error: only such changes
/// are stored.
fn significant(before: &HostWatch, after: &HostWatch) -> bool {
    let plain = |h: &HostWatch| HostWatch {
        last_seen: None,
        probed_at: None,
        health_checked_at: None,
        error: None,
        deployment: None,
        ..h.clone()
    };
    plain(before) != plain(after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix_deploy_core::drift::{Drift, DriftKind};

    #[test]
    fn a_new_sight_is_not_a_change_but_a_new_system_or_drift_is() {
        let host = HostWatch {
            name: "web1".into(),
            running: Some("/nix/store/a".into()),
            drift: vec![Drift {
                kind: DriftKind::InSync,
                since: 1,
            }],
            last_seen: Some(1),
            ..HostWatch::default()
        };
        let seen = HostWatch {
            last_seen: Some(2),
            probed_at: Some(2),
            ..host.clone()
        };
        assert!(!significant(&host, &seen));
        let switched = HostWatch {
            running: Some("/nix/store/b".into()),
            ..seen.clone()
        };
        assert!(significant(&host, &switched));
        let drifted = HostWatch {
            drift: vec![Drift {
                kind: DriftKind::ManualSwitch,
                since: 2,
            }],
            ..seen
        };
        assert!(significant(&host, &drifted));
    }
}
