//! Drift: how what a host runs compares with what the flake says it should
//! run and with what we deployed to it, as kinds a host can be in (several
//! at once), each with the time it began; and which changes of them are
//! worth telling people about. Pure decisions for the daemon's watch loop
//! and `status --live`.
//!
//! | kind | when |
//! |---|---|
//! | `in-sync` | it runs what the flake evaluates to, and nothing below holds |
//! | `behind` | the flake has another system than the one our last deployment left running |
//! | `pending-reboot` | the running system's kernel, initrd or modules are not the booted ones |
//! | `boot-mismatch` | the boot default (the profile) is not the running system |
//! | `manual-switch` | it runs a system no deployment of ours put there |
//! | `manual-rollback` | it runs an older system we deployed (or found it running) |
//! | `unhealthy` | its health checks fail |
//! | `unreachable` | it cannot be probed (its other kinds are the last known ones) |
//! | `desired-unknown` | the flake does not evaluate (for this host): never `in-sync` |

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::events::HostStatus;
use crate::goal::{self, Goal};
use crate::remote::ProbeResult;

/// One way a host can stand against the flake and its history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriftKind {
    InSync,
    Behind,
    PendingReboot,
    BootMismatch,
    ManualSwitch,
    ManualRollback,
    Unhealthy,
    Unreachable,
    DesiredUnknown,
}

impl DriftKind {
    pub const ALL: [DriftKind; 9] = [
        DriftKind::InSync,
        DriftKind::Behind,
        DriftKind::PendingReboot,
        DriftKind::BootMismatch,
        DriftKind::ManualSwitch,
        DriftKind::ManualRollback,
        DriftKind::Unhealthy,
        DriftKind::Unreachable,
        DriftKind::DesiredUnknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::InSync => "in-sync",
            DriftKind::Behind => "behind",
            DriftKind::PendingReboot => "pending-reboot",
            DriftKind::BootMismatch => "boot-mismatch",
            DriftKind::ManualSwitch => "manual-switch",
            DriftKind::ManualRollback => "manual-rollback",
            DriftKind::Unhealthy => "unhealthy",
            DriftKind::Unreachable => "unreachable",
            DriftKind::DesiredUnknown => "desired-unknown",
        }
    }

    /// Whether a deployment of the flake's system puts it right: what
    /// `on-drift = "redeploy"` acts on. (A reboot, a repair or a flake that
    /// evaluates again are not ours to force.)
    pub fn reconcilable(self) -> bool {
        matches!(
            self,
            DriftKind::Behind
                | DriftKind::ManualSwitch
                | DriftKind::ManualRollback
                | DriftKind::BootMismatch
        )
    }

    /// Whether its appearing and clearing is alerted as drift. `behind` is
    /// the normal state between a push and its deployment, and `unhealthy`
    /// and `unreachable` have alerts of their own.
    pub fn alerted_as_drift(self) -> bool {
        matches!(
            self,
            DriftKind::PendingReboot
                | DriftKind::BootMismatch
                | DriftKind::ManualSwitch
                | DriftKind::ManualRollback
                | DriftKind::DesiredUnknown
        )
    }
}

impl std::fmt::Display for DriftKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind a host is in, and since when (Unix milliseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    pub kind: DriftKind,
    pub since: i64,
}

/// One finished host run of ours, as far as drift needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PastRun {
    pub status: HostStatus,
    pub goal: Goal,
    /// What the host ran when the run began.
    pub from: Option<String>,
    /// What the run deployed (or, for a rollback, went back to).
    pub to: Option<String>,
    /// Whether the host was rebooted into `to`.
    pub rebooted: bool,
}

impl PastRun {
    /// What the host runs after this run, when the run decided it.
    fn left_running(&self) -> Option<&str> {
        match self.status {
            HostStatus::Deployed => match self.goal {
                Goal::Switch | Goal::Test => self.to.as_deref(),
                Goal::Boot if self.rebooted => self.to.as_deref(),
                Goal::Boot => self.from.as_deref(),
                // A closure copied, nothing activated: it runs what it ran.
                Goal::Push => self.from.as_deref(),
                Goal::DryActivate => None,
            },
            HostStatus::RolledBack | HostStatus::Failed => self.from.as_deref(),
            // Skipped or refused: it was left running what it ran.
            HostStatus::Skipped | HostStatus::Unhealthy => self.from.as_deref(),
            _ => None,
        }
    }
}

/// The systems a host ran or was given by our deployments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// Every system one of our runs put on the host, or found it running.
    pub known: BTreeSet<String>,
    /// What our newest run that decided it left the host running.
    pub last: Option<String>,
}

impl History {
    /// From a host's finished runs, newest first.
    pub fn from_runs(newest_first: &[PastRun]) -> History {
        let mut history = History::default();
        for run in newest_first {
            if history.last.is_none() {
                history.last = run.left_running().map(str::to_string);
            }
            let deployed = run.status == HostStatus::Deployed && run.goal.changes_host();
            history.known.extend(run.from.iter().cloned());
            if deployed {
                history.known.extend(run.to.iter().cloned());
            }
        }
        history
    }
}

/// What the watch knows about a host right now.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// The toplevel the flake evaluates to; `None` when it does not evaluate.
    pub desired: Option<&'a str>,
    /// What the probe found; `None` when the host could not be probed.
    pub probe: Option<&'a ProbeResult>,
    pub history: &'a History,
    /// The last health checks' verdict; `None` when not checked yet (or the
    /// host has none).
    pub healthy: Option<bool>,
}

/// The kinds a host is in, sorted. An unreachable host keeps the kinds it
/// was last known to be in (`previous`), but `in-sync`: nobody knows.
pub fn classify(observed: &Observed, previous: &[DriftKind]) -> Vec<DriftKind> {
    let mut kinds = BTreeSet::new();
    if observed.desired.is_none() {
        kinds.insert(DriftKind::DesiredUnknown);
    }
    let Some(probe) = observed.probe else {
        kinds.insert(DriftKind::Unreachable);
        kinds.extend(previous.iter().copied().filter(|k| {
            !matches!(
                k,
                DriftKind::InSync | DriftKind::Unreachable | DriftKind::DesiredUnknown
            )
        }));
        return kinds.into_iter().collect();
    };
    let running = probe.current_system.as_deref();
    if running.is_none() || running != observed.desired {
        let history = observed.history;
        match running {
            Some(r) if !history.known.is_empty() && history.last.as_deref() != Some(r) => {
                kinds.insert(if history.known.contains(r) {
                    DriftKind::ManualRollback
                } else {
                    DriftKind::ManualSwitch
                });
            }
            _ if observed.desired.is_some() => {
                kinds.insert(DriftKind::Behind);
            }
            _ => {}
        }
    }
    if goal::boot_changed(&probe.booted, &probe.running_boot) == Some(true) {
        kinds.insert(DriftKind::PendingReboot);
    }
    if goal::pending_reboot(running, probe.profile_system.as_deref()) {
        kinds.insert(DriftKind::BootMismatch);
    }
    if observed.healthy == Some(false) {
        kinds.insert(DriftKind::Unhealthy);
    }
    if kinds.is_empty() {
        kinds.insert(DriftKind::InSync);
    }
    kinds.into_iter().collect()
}

/// `kinds` with their times: a kind the host was already in keeps its
/// `since`, a new one begins `now`.
pub fn carry(previous: &[Drift], kinds: &[DriftKind], now: i64) -> Vec<Drift> {
    kinds
        .iter()
        .map(|&kind| Drift {
            kind,
            since: previous
                .iter()
                .find(|d| d.kind == kind)
                .map_or(now, |d| d.since),
        })
        .collect()
}

/// The kinds of `drift`, in order.
pub fn kinds(drift: &[Drift]) -> Vec<DriftKind> {
    drift.iter().map(|d| d.kind).collect()
}

/// What appeared and what cleared between two sets of kinds.
pub fn changes(before: &[DriftKind], after: &[DriftKind]) -> (Vec<DriftKind>, Vec<DriftKind>) {
    let appeared = after
        .iter()
        .filter(|k| !before.contains(k))
        .copied()
        .collect();
    let cleared = before
        .iter()
        .filter(|k| !after.contains(k))
        .copied()
        .collect();
    (appeared, cleared)
}

/// What an alert says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlertKind {
    Unhealthy,
    Healthy,
    Drifted,
    DriftCleared,
    /// Unreachable for longer than `unreachable-after`.
    Unreachable,
    /// Reachable again after an `unreachable` alert.
    Reachable,
    /// The flake stopped evaluating (for the whole fleet).
    EvaluationFailed,
    EvaluationRecovered,
}

impl AlertKind {
    /// The notification's event name (webhooks' `event`, e-mail subjects).
    pub fn event_name(self) -> &'static str {
        match self {
            AlertKind::Unhealthy => "host.unhealthy",
            AlertKind::Healthy => "host.healthy",
            AlertKind::Drifted => "host.drifted",
            AlertKind::DriftCleared => "host.drift_cleared",
            AlertKind::Unreachable => "host.unreachable",
            AlertKind::Reachable => "host.reachable",
            AlertKind::EvaluationFailed => "fleet.evaluation_failed",
            AlertKind::EvaluationRecovered => "fleet.evaluation_recovered",
        }
    }
}

/// The alerts one observation of a host raises (before their details).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Raised {
    pub alerts: Vec<(AlertKind, Vec<DriftKind>)>,
    /// Whether an `unreachable` alert stands for the current outage.
    pub unreachable_alerted: bool,
}

/// When the watch tells people: health lost or back, drift (of the kinds
/// [`DriftKind::alerted_as_drift`]) appearing or clearing, and a host
/// unreachable for `unreachable_after_ms` (then reachable again). With
/// `fleet_unevaluated`, `desired-unknown` is the whole fleet's (one fleet
/// alert says it, not one per host).
pub fn alerts(
    before: &[Drift],
    after: &[Drift],
    now: i64,
    unreachable_after_ms: i64,
    unreachable_alerted: bool,
    fleet_unevaluated: bool,
) -> Raised {
    let drifting = |kind: &DriftKind| {
        kind.alerted_as_drift() && !(fleet_unevaluated && *kind == DriftKind::DesiredUnknown)
    };
    let (appeared, cleared) = changes(&kinds(before), &kinds(after));
    let mut raised = Raised {
        alerts: Vec::new(),
        unreachable_alerted,
    };
    if appeared.contains(&DriftKind::Unhealthy) {
        raised.alerts.push((AlertKind::Unhealthy, Vec::new()));
    }
    if cleared.contains(&DriftKind::Unhealthy) {
        raised.alerts.push((AlertKind::Healthy, Vec::new()));
    }
    let drifted: Vec<DriftKind> = appeared.iter().copied().filter(drifting).collect();
    if !drifted.is_empty() {
        raised.alerts.push((AlertKind::Drifted, drifted));
    }
    let settled: Vec<DriftKind> = cleared.iter().copied().filter(drifting).collect();
    if !settled.is_empty() {
        raised.alerts.push((AlertKind::DriftCleared, settled));
    }
    match after.iter().find(|d| d.kind == DriftKind::Unreachable) {
        Some(d) if !unreachable_alerted && now - d.since >= unreachable_after_ms => {
            raised.alerts.push((AlertKind::Unreachable, Vec::new()));
            raised.unreachable_alerted = true;
        }
        None if unreachable_alerted => {
            raised.alerts.push((AlertKind::Reachable, Vec::new()));
            raised.unreachable_alerted = false;
        }
        _ => {}
    }
    raised
}

#[cfg(test)]
mod tests;
