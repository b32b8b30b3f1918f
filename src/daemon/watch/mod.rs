//! The daemon watches the fleet: every host is probed on its own jittered
//! schedule (over the kept SSH masters, a bounded number at once), its
//! health checks run on theirs, and each observation is classified against
//! what the tracked flake evaluates to and what we deployed (`core::drift`).
//! Only changes are stored (with their fleet event and alerts, in one
//! transaction), so the history grows with events, not with probes; states
//! and their times survive a restart.
//!
//! - [`Fleet`]: the fleet as last observed, shared with the routes
//!   (`GET /api/v1/fleet`, its event stream, status, metrics);
//! - `observer`: the loop that owns the schedule, the evaluations and every
//!   write; `schedule`: when each host is probed and checked;
//! - `alerts`: sends stored alerts (e-mail, Slack, webhooks) and marks them
//!   sent; `reconcile`: `on-drift = "redeploy"` (where a reconciling
//!   deployment's request is built); `pull`: pull mode's branch polling;
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

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::watch::{BranchWatch, FleetEvent, FleetReport};

pub use config::WatchConfig;

use super::AppState;
use crate::now_ms;
use crate::store::WatchRow;

/// The fleet as the watch last observed it. Only the watch loop writes it.
pub struct Fleet {
    /// A std mutex: held for copies and map updates, never across `.await`.
    view: Mutex<View>,
    /// Changes as they are stored, for event streams.
    events: broadcast::Sender<FleetEvent>,
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
            events: broadcast::channel(1024).0,
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fleet now, every host by name.
    pub fn snapshot(&self) -> FleetReport {
        let view = self.view();
        let mut report = view.header.clone();
        report.generated_at = now_ms();
        report.hosts = view.rows.values().map(|r| r.state.clone()).collect();
        report
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<FleetEvent> {
        self.events.subscribe()
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

    fn header(&self, update: impl FnOnce(&mut FleetReport)) {
        update(&mut self.view().header);
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

    fn publish(&self, event: FleetEvent) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }
}

/// The hosts' stored states, before the daemon answers anyone: after a
/// restart the fleet is what it was, with its times.
pub(crate) async fn load(state: &AppState) {
    match state.store().watch_hosts().await {
        Ok(rows) => {
            for row in rows {
                state.fleet.put(row);
            }
        }
        Err(e) => tracing::warn!(cause = %e, "reading the watched hosts' stored states"),
    }
}

/// Run the watch until `stop`: send alerts left unsent, and (when enabled)
/// observe the fleet. Spawned by `daemon::run`, after [`load`].
pub(crate) async fn run(state: AppState, stop: CancellationToken) {
    state.tasks.spawn(alerts::run(state.clone(), stop.clone()));
    if state.config.watch.enabled {
        observer::Observer::new(state).await.run(stop).await;
    }
}
