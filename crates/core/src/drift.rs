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
mod tests {
    use super::*;
    use crate::goal::BootFiles;

    const A: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-a";
    const B: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-b";
    const C: &str = "/nix/store/cccccccccccccccccccccccccccccccc-nixos-system-c";
    const X: &str = "/nix/store/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-nixos-system-x";

    fn probe(running: &str) -> ProbeResult {
        ProbeResult {
            current_system: Some(running.into()),
            profile_system: Some(running.into()),
            generation: Some(3),
            ..ProbeResult::default()
        }
    }

    fn deployed(from: Option<&str>, to: &str) -> PastRun {
        PastRun {
            status: HostStatus::Deployed,
            goal: Goal::Switch,
            from: from.map(str::to_string),
            to: Some(to.into()),
            rebooted: false,
        }
    }

    /// We deployed A over the host's X, then B over A: it should run B.
    fn history() -> History {
        History::from_runs(&[deployed(Some(A), B), deployed(Some(X), A)])
    }

    fn classify_now(
        desired: Option<&str>,
        probe: Option<&ProbeResult>,
        history: &History,
        healthy: Option<bool>,
    ) -> Vec<DriftKind> {
        classify(
            &Observed {
                desired,
                probe,
                history,
                healthy,
            },
            &[],
        )
    }

    #[test]
    fn history_knows_what_we_deployed_and_what_we_left_running() {
        let h = history();
        assert_eq!(h.last.as_deref(), Some(B));
        assert!(h.known.contains(A) && h.known.contains(B) && h.known.contains(X));
        // A failed run went back to what it ran; a boot deployment leaves the
        // old system running until the reboot.
        let failed = PastRun {
            status: HostStatus::RolledBack,
            ..deployed(Some(B), C)
        };
        let h = History::from_runs(&[failed.clone(), deployed(Some(A), B)]);
        assert_eq!(h.last.as_deref(), Some(B));
        assert!(
            !h.known.contains(C),
            "a rolled-back system never ran for us"
        );
        let boot = PastRun {
            goal: Goal::Boot,
            ..deployed(Some(B), C)
        };
        assert_eq!(History::from_runs(&[boot]).last.as_deref(), Some(B));
        // An interrupted run decided nothing: the one before it counts.
        let interrupted = PastRun {
            status: HostStatus::Interrupted,
            ..deployed(Some(B), C)
        };
        let h = History::from_runs(&[interrupted, deployed(Some(A), B)]);
        assert_eq!(h.last.as_deref(), Some(B));
        assert_eq!(History::from_runs(&[]), History::default());
    }

    #[test]
    fn in_sync_when_it_runs_the_flakes_system() {
        let p = probe(B);
        assert_eq!(
            classify_now(Some(B), Some(&p), &history(), Some(true)),
            [DriftKind::InSync]
        );
        // Never deployed by us, but running what the flake says: in sync.
        assert_eq!(
            classify_now(Some(B), Some(&p), &History::default(), None),
            [DriftKind::InSync]
        );
    }

    #[test]
    fn behind_when_the_flake_moved_on() {
        let p = probe(B);
        assert_eq!(
            classify_now(Some(C), Some(&p), &history(), None),
            [DriftKind::Behind]
        );
        // A host we never deployed is behind, not "manually switched".
        assert_eq!(
            classify_now(Some(C), Some(&probe(X)), &History::default(), None),
            [DriftKind::Behind]
        );
        // A fresh host with no system yet.
        let fresh = ProbeResult::default();
        assert_eq!(
            classify_now(Some(C), Some(&fresh), &History::default(), None),
            [DriftKind::Behind]
        );
    }

    #[test]
    fn manual_switch_when_it_runs_a_system_we_never_put_there() {
        let p = probe(C);
        assert_eq!(
            classify_now(Some(B), Some(&p), &history(), None),
            [DriftKind::ManualSwitch]
        );
    }

    #[test]
    fn manual_rollback_when_it_runs_an_older_system_of_ours() {
        assert_eq!(
            classify_now(Some(B), Some(&probe(A)), &history(), None),
            [DriftKind::ManualRollback]
        );
        // The system it ran before our first deployment counts as known.
        assert_eq!(
            classify_now(Some(B), Some(&probe(X)), &history(), None),
            [DriftKind::ManualRollback]
        );
    }

    #[test]
    fn pending_reboot_when_the_running_kernel_is_not_the_booted_one() {
        let mut p = probe(B);
        let files = |k: &str| BootFiles {
            kernel: Some(format!("/nix/store/{k}-linux/bzImage")),
            initrd: Some("/nix/store/i-initrd/initrd".into()),
            kernel_modules: None,
        };
        p.booted = files("k1");
        p.running_boot = files("k2");
        assert_eq!(
            classify_now(Some(B), Some(&p), &history(), None),
            [DriftKind::PendingReboot]
        );
        // Unknown booted files prove nothing.
        p.booted = BootFiles::default();
        assert_eq!(
            classify_now(Some(B), Some(&p), &history(), None),
            [DriftKind::InSync]
        );
    }

    #[test]
    fn boot_mismatch_when_the_boot_default_is_not_what_runs() {
        // After `--goal test`: runs the new system, boots the old one.
        let mut p = probe(B);
        p.profile_system = Some(A.into());
        assert_eq!(
            classify_now(Some(B), Some(&p), &history(), None),
            [DriftKind::BootMismatch]
        );
    }

    #[test]
    fn unhealthy_and_unreachable() {
        let p = probe(B);
        assert_eq!(
            classify_now(Some(B), Some(&p), &history(), Some(false)),
            [DriftKind::Unhealthy]
        );
        assert_eq!(
            classify_now(Some(B), None, &history(), None),
            [DriftKind::Unreachable]
        );
        // Unreachable keeps the last known kinds, but never "in sync".
        let observed = Observed {
            desired: Some(B),
            probe: None,
            history: &history(),
            healthy: Some(false),
        };
        assert_eq!(
            classify(
                &observed,
                &[
                    DriftKind::ManualSwitch,
                    DriftKind::Unhealthy,
                    DriftKind::InSync
                ]
            ),
            [
                DriftKind::ManualSwitch,
                DriftKind::Unhealthy,
                DriftKind::Unreachable
            ]
        );
    }

    #[test]
    fn several_kinds_at_once() {
        let mut p = probe(C);
        p.profile_system = Some(B.into());
        assert_eq!(
            classify_now(Some(B), Some(&p), &history(), Some(false)),
            [
                DriftKind::BootMismatch,
                DriftKind::ManualSwitch,
                DriftKind::Unhealthy
            ]
        );
    }

    #[test]
    fn desired_unknown_is_never_in_sync() {
        let p = probe(B);
        assert_eq!(
            classify_now(None, Some(&p), &history(), Some(true)),
            [DriftKind::DesiredUnknown]
        );
        // What the host itself shows is still seen.
        assert_eq!(
            classify_now(None, Some(&probe(C)), &history(), None),
            [DriftKind::ManualSwitch, DriftKind::DesiredUnknown]
        );
        assert_eq!(
            classify_now(None, None, &history(), None),
            [DriftKind::Unreachable, DriftKind::DesiredUnknown]
        );
        let json = serde_json::to_value(DriftKind::DesiredUnknown).unwrap();
        assert_eq!(json, "desired-unknown");
        for kind in DriftKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }

    #[test]
    fn since_times_are_carried_and_changes_named() {
        let before = [
            Drift {
                kind: DriftKind::Unhealthy,
                since: 10,
            },
            Drift {
                kind: DriftKind::Behind,
                since: 20,
            },
        ];
        let after = carry(
            &before,
            &[DriftKind::Unhealthy, DriftKind::ManualSwitch],
            99,
        );
        assert_eq!(after[0].since, 10);
        assert_eq!(after[1].since, 99);
        let (appeared, cleared) = changes(&kinds(&before), &kinds(&after));
        assert_eq!(appeared, [DriftKind::ManualSwitch]);
        assert_eq!(cleared, [DriftKind::Behind]);
    }

    fn drift(kind: DriftKind, since: i64) -> Drift {
        Drift { kind, since }
    }

    #[test]
    fn alerts_on_changes_only() {
        let healthy = [drift(DriftKind::InSync, 0)];
        let sick = [drift(DriftKind::Unhealthy, 5)];
        let raised = alerts(&healthy, &sick, 5, 60_000, false, false);
        assert_eq!(raised.alerts, [(AlertKind::Unhealthy, vec![])]);
        // The same state again: nothing.
        assert!(
            alerts(&sick, &sick, 9, 60_000, false, false)
                .alerts
                .is_empty()
        );
        assert_eq!(
            alerts(&sick, &healthy, 10, 60_000, false, false).alerts,
            [(AlertKind::Healthy, vec![])]
        );
        // Behind is no alert; a manual switch is, and so is its end.
        let behind = [drift(DriftKind::Behind, 1)];
        assert!(
            alerts(&healthy, &behind, 1, 1, false, false)
                .alerts
                .is_empty()
        );
        let switched = [drift(DriftKind::ManualSwitch, 1)];
        assert_eq!(
            alerts(&healthy, &switched, 1, 1, false, false).alerts,
            [(AlertKind::Drifted, vec![DriftKind::ManualSwitch])]
        );
        assert_eq!(
            alerts(&switched, &healthy, 2, 1, false, false).alerts,
            [(AlertKind::DriftCleared, vec![DriftKind::ManualSwitch])]
        );
        // A flake that fails for everyone is one fleet alert, not one per host.
        let unknown = [drift(DriftKind::DesiredUnknown, 1)];
        assert!(
            alerts(&healthy, &unknown, 1, 1, false, true)
                .alerts
                .is_empty()
        );
        assert_eq!(
            alerts(&healthy, &unknown, 1, 1, false, false).alerts,
            [(AlertKind::Drifted, vec![DriftKind::DesiredUnknown])]
        );
    }

    #[test]
    fn unreachable_is_alerted_after_its_threshold_once_and_its_end_too() {
        let up = [drift(DriftKind::InSync, 0)];
        let down = [drift(DriftKind::Unreachable, 1_000)];
        // Just gone: not yet.
        let first = alerts(&up, &down, 1_000, 60_000, false, false);
        assert!(first.alerts.is_empty() && !first.unreachable_alerted);
        // Long enough: once.
        let late = alerts(&down, &down, 61_000, 60_000, false, false);
        assert_eq!(late.alerts, [(AlertKind::Unreachable, vec![])]);
        assert!(late.unreachable_alerted);
        assert!(
            alerts(&down, &down, 99_000, 60_000, true, false)
                .alerts
                .is_empty()
        );
        // Back: said, since its loss was.
        let back = alerts(&down, &up, 100_000, 60_000, true, false);
        assert_eq!(back.alerts, [(AlertKind::Reachable, vec![])]);
        assert!(!back.unreachable_alerted);
        // A blip nobody was told about ends silently.
        assert!(
            alerts(&down, &up, 2_000, 60_000, false, false)
                .alerts
                .is_empty()
        );
    }
}
