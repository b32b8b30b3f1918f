//! Unit tests of [`super`].

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
