//! The daemon watches the fleet: every host is probed on its own jittered
//! schedule (over the kept SSH masters, a bounded number at once), its
//! health checks run on theirs, and each observation is classified against
//! what the tracked flake evaluates to and what we deployed (`core::drift`).
//! Only changes are stored (with their fleet event and alerts, in one
//! transaction), so the history grows with events, not with probes; states
//! and their times survive a restart.
//!
//! Once per fleet: of the daemons sharing a history, only the elected
//! leader watches ([`run`]). It probes, evaluates, writes (every write
//! checks its term), sends alerts, reconciles and polls the branch; when it
//! dies or loses the database, the next leader takes the watch over from
//! the stored states, their times and the alert outbox, as after a restart.
//! The others answer `GET /api/v1/fleet`, its event stream, status and
//! metrics from what the leader stored ([`AppState::fleet_view`]).
//!
//! - [`Fleet`]: the fleet as the leader last observed it, shared with the
//!   routes while this daemon leads;
//! - `observer`: the leader's loop that owns the schedule, the evaluations
//!   and every write; `schedule`: when each host is probed and checked;
//! - `alerts`: sends stored alerts (e-mail, Slack, webhooks), each claimed
//!   first and marked sent after; `reconcile`: `on-drift = "redeploy"`
//!   (where a reconciling deployment's request is built); `pull`: pull
//!   mode's branch polling;
//! - [`config`]: the `watch` table of the TOML.
//!
//! A host leased by a deployment is not probed: it is reported from that
//! deployment, and probed again once it ends. Probing never takes a lease.

mod alerts;
pub mod config;
mod observer;
mod pull;
mod reconcile;
mod schedule;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use nix_deploy_core::watch::{BranchWatch, FleetReport};

pub use config::WatchConfig;

use super::AppState;
use crate::now_ms;
use crate::store::{StoreError, WatchRow};

/// How often a daemon looks whether it (still) leads.
const LEADERSHIP_CHECK: Duration = Duration::from_secs(1);

/// The fleet as the leader's watch last observed it. Only the observer
/// writes it, and only while this daemon leads.
pub struct Fleet {
    /// A std mutex: held for copies and map updates, never across `.await`.
    view: Mutex<View>,
    /// Whether this daemon's observer keeps the view (it leads and
    /// watches): otherwise the store has the fleet.
    live: AtomicBool,
    /// Wakes event streams when a change was stored here.
    changed: broadcast::Sender<()>,
}

#[derive(Default)]
struct View {
    /// The report's fleet-wide fields (its hosts are in `rows`).
    header: FleetReport,
    rows: BTreeMap<String, WatchRow>,
}

impl Fleet {
    pub fn new(config: &WatchConfig, daemon_flake: &str) -> Fleet {
        let header = FleetReport {
            watching: config.enabled,
            interval_seconds: config.enabled.then_some(config.interval.as_secs()),
            flake: config.flake(daemon_flake).to_string(),
            ..FleetReport::default()
        };
        Fleet {
            view: Mutex::new(View {
                header,
                rows: BTreeMap::new(),
            }),
            live: AtomicBool::new(false),
            changed: broadcast::channel(16).0,
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this daemon's observer keeps the view now.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// The fleet now as this daemon's observer sees it, every host by name.
    fn snapshot(&self) -> FleetReport {
        let view = self.view();
        let mut report = view.header.clone();
        report.generated_at = now_ms();
        report.hosts = view.rows.values().map(|r| r.state.clone()).collect();
        report
    }

    /// Wake-ups: a change was stored (by this daemon).
    pub fn subscribe(&self) -> broadcast::Receiver<()> {
        self.changed.subscribe()
    }

    fn row(&self, name: &str) -> Option<WatchRow> {
        self.view().rows.get(name).cloned()
    }

    fn rows(&self) -> Vec<WatchRow> {
        self.view().rows.values().cloned().collect()
    }

    fn put(&self, row: WatchRow) {
        self.view().rows.insert(row.state.name.clone(), row);
    }

    fn remove(&self, name: &str) {
        self.view().rows.remove(name);
    }

    /// Start over from the stored states (a new term as leader).
    fn reload(&self, rows: Vec<WatchRow>) {
        let mut view = self.view();
        view.rows = rows
            .into_iter()
            .map(|row| (row.state.name.clone(), row))
            .collect();
    }

    fn header(&self, update: impl FnOnce(&mut FleetReport)) {
        update(&mut self.view().header);
    }

    fn header_now(&self) -> FleetReport {
        self.view().header.clone()
    }

    fn branch(&self, update: impl FnOnce(&mut BranchWatch)) {
        let mut view = self.view();
        update(view.header.branch.get_or_insert_with(BranchWatch::default));
    }

    /// In memory only: which deployment holds a host now.
    fn set_deployment(&self, name: &str, deployment: Option<i64>) {
        if let Some(row) = self.view().rows.get_mut(name) {
            row.state.deployment = deployment;
        }
    }

    fn changed(&self) {
        // Nobody listening is fine.
        let _ = self.changed.send(());
    }
}

impl AppState {
    /// The fleet as the watch sees it: this daemon's observer's view while
    /// it leads and watches, else what the leader stored (with the hosts
    /// live deployments hold now).
    pub(crate) async fn fleet_view(&self) -> Result<FleetReport, StoreError> {
        if self.fleet.is_live() {
            return Ok(self.fleet.snapshot());
        }
        let mut report = self.store().stored_fleet().await?;
        let leases = self.store().live_leases().await?;
        for host in &mut report.hosts {
            host.deployment = leases
                .iter()
                .find(|l| l.host == host.name)
                .and_then(|l| l.deployment_id);
        }
        Ok(report)
    }
}

/// The watch of this daemon until `stop`: while it leads, the leader's work
/// (the observer when enabled, and the alerts' sender), taken over from the
/// stored states each time it becomes leader and stopped at once when it
/// no longer is. Spawned by `daemon::run`.
pub(crate) async fn run(state: AppState, stop: CancellationToken) {
    let mut term: Option<(CancellationToken, TaskTracker)> = None;
    let mut check = tokio::time::interval(LEADERSHIP_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = check.tick() => {}
        }
        let leads = state.is_leader();
        if leads && term.is_none() {
            tracing::info!("elected leader: this daemon watches the fleet");
            term = Some(lead(&state, &stop).await);
        } else if !leads && let Some((ended, tasks)) = term.take() {
            tracing::warn!("no longer the leader: this daemon stops watching the fleet");
            end(&state, ended, tasks).await;
        }
    }
    if let Some((ended, tasks)) = term.take() {
        end(&state, ended, tasks).await;
    }
}

/// Begin a term: the stored states are where the watch starts (what the
/// last leader, or this daemon before a restart, left), then the observer
/// and the alerts' sender run until the term's token is cancelled.
async fn lead(state: &AppState, stop: &CancellationToken) -> (CancellationToken, TaskTracker) {
    let ended = stop.child_token();
    let tasks = TaskTracker::new();
    match state.store().watch_hosts().await {
        Ok(rows) => state.fleet.reload(rows),
        Err(e) => tracing::warn!(cause = %e, "reading the watched hosts' stored states"),
    }
    state
        .fleet
        .header(|h| h.watched_by = Some(state.store().holder().to_string()));
    tasks.spawn(alerts::run(state.clone(), ended.clone()));
    if state.config.watch.enabled {
        state.fleet.live.store(true, Ordering::SeqCst);
        let observer = observer::Observer::new(state.clone()).await;
        tasks.spawn(observer.run(ended.clone()));
    } else if let Err(e) = state
        .store()
        .save_watch_fleet(&state.fleet.header_now())
        .await
    {
        // Said once, so that no daemon reports a watch that stopped.
        tracing::warn!(cause = %e, "saying the fleet is not watched");
    }
    tasks.close();
    (ended, tasks)
}

/// End a term: stop the leader's work and wait for it.
async fn end(state: &AppState, ended: CancellationToken, tasks: TaskTracker) {
    ended.cancel();
    tasks.wait().await;
    state.fleet.live.store(false, Ordering::SeqCst);
}
