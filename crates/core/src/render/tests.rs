//! Unit tests of [`super`].

use super::*;

#[test]
fn what_happened_to_the_keys_is_said_in_one_line() {
    assert_eq!(key_changes(&KeyChanges::default()), None);
    let changes = KeyChanges {
        restored: vec!["/run/keys/a".into(), "/run/keys/b".into()],
        removed: vec!["/run/keys/c".into()],
        failed: vec!["/srv/d: mv: denied".into()],
        ..KeyChanges::default()
    };
    assert_eq!(
        key_changes(&changes).unwrap(),
        "keys: restored 2 (/run/keys/a, /run/keys/b); removed 1 created by this deployment (/run/keys/c); NOT known to be as before the deployment: /srv/d: mv: denied"
    );
    let left = KeyChanges {
        left: Some("left as they are".into()),
        ..KeyChanges::default()
    };
    assert_eq!(key_changes(&left).unwrap(), "keys: left as they are");
}

#[test]
fn host_and_step_are_said_once() {
    assert_eq!(
        host_error(
            "web1",
            "probe",
            "web1: cannot connect over SSH to 10.0.0.1: refused"
        ),
        "web1: probe: cannot connect over SSH to 10.0.0.1: refused"
    );
    assert_eq!(
        host_error("web1", "probe", "web1: probe: `sh` timed out after 5s"),
        "web1: probe: `sh` timed out after 5s"
    );
    assert_eq!(
        host_error("web1", "rollback", "connection refused"),
        "web1: rollback: connection refused"
    );
    // Another host's name in the cause is kept.
    assert_eq!(
        host_error("web1", "probe", "web10: refused"),
        "web1: probe: web10: refused"
    );
    assert_eq!(
        after_prefix("web1: activate: exit 4", Some("web1"), Some("activate")),
        "exit 4"
    );
    assert_eq!(
        after_prefix("web1: exit 4", Some("web1"), Some("activate")),
        "exit 4"
    );
    assert_eq!(after_prefix("exit 4", Some("web1"), None), "exit 4");
    assert_eq!(after_prefix("web10: x", Some("web1"), None), "web10: x");
}
use crate::events::{Step, SystemRef};

#[test]
fn shortens_store_paths_and_durations() {
    assert_eq!(
        short_path(Some(
            "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system-p620"
        )),
        "q4zfsrs…-nixos-system-p620"
    );
    assert_eq!(short_path(None), "-");
    assert_eq!(duration_ms(1500), "1.5s");
    assert_eq!(duration_ms(83_000), "1m 23s");
    assert_eq!(timestamp(0), "1970-01-01 00:00:00Z");
}

#[test]
fn events_read_as_one_line() {
    let event = |kind| Event {
        id: 1,
        deployment_id: 7,
        at: 0,
        host: Some("web1".into()),
        kind,
    };
    assert_eq!(
        event_text(&event(EventKind::StepFinished {
            step: Step::Copy,
            ok: true,
            duration_ms: 1200,
            message: None
        })),
        "copy ok (1.2s)"
    );
    assert_eq!(
        event_text(&event(EventKind::HostFinished {
            status: HostStatus::Deployed,
            from: SystemRef {
                path: None,
                generation: Some(1)
            },
            to: SystemRef {
                path: None,
                generation: Some(2)
            },
            duration_ms: 1500,
            error: None,
            after: None,
        })),
        "✅ DEPLOYED (1.5s) generation 1 → 2"
    );
    assert_eq!(result_word(HostStatus::RolledBack), "⏪ rolled back");
}

#[test]
fn ages_and_drift() {
    use crate::drift::{Drift, DriftKind};
    assert_eq!(age(-5), "0s");
    assert_eq!(age(59_999), "59s");
    assert_eq!(age(3_600_000 * 5), "5h");
    assert_eq!(age(86_400_000 * 3), "3d");
    let kinds = [
        Drift {
            kind: DriftKind::ManualSwitch,
            since: 0,
        },
        Drift {
            kind: DriftKind::Unhealthy,
            since: 140_000,
        },
    ];
    assert_eq!(drift(&kinds, 180_000), "manual-switch 3m, unhealthy 40s");
    assert_eq!(drift(&[], 0), "-");
}

#[test]
fn a_failed_host_is_counted_failed_whether_or_not_it_went_back() {
    use crate::run::StepTiming;
    let run = |status, failed_step: Option<Step>| {
        let mut run = HostRun::new(1, "h");
        run.status = status;
        run.steps = [Step::Activate, Step::Validate, Step::Rollback]
            .into_iter()
            .map(|step| StepTiming {
                step,
                started_at: 0,
                finished_at: Some(1),
                ok: Some(Some(step) != failed_step),
            })
            .collect();
        run
    };
    let runs = [
        run(HostStatus::Deployed, None),
        run(HostStatus::RolledBack, Some(Step::Validate)),
        run(HostStatus::RolledBack, None),
        run(HostStatus::Failed, Some(Step::Activate)),
    ];
    assert_eq!(
        hosts_summary(&runs),
        "1 deployed, 0 skipped, 2 failed (1 of them rolled back), 1 rolled back"
    );
    let mut back = HostRun::new(1, "h");
    back.status = HostStatus::RolledBack;
    back.from.generation = Some(2);
    back.to.generation = Some(1);
    back.after = Some(crate::remote::HostSystems {
        running: None,
        boot_generation: Some(1),
        boot: None,
    });
    assert_eq!(generations(&back), "2 → 1");
}
