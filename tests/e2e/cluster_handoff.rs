//! A daemon stopped (SIGTERM, as a rolling restart stops it) while another
//! daemon on the same PostgreSQL takes deployments over hands its
//! deployments over: its host in the middle of its pipeline finishes, no
//! host starts, and the other daemon takes the deployment over at once and
//! finishes it. Alone, it cancels them safely, as on SQLite.

use std::time::{Duration, Instant};

use serde_json::json;

use nix_deploy_core::events::{Event, EventKind, Step};
use nix_deploy_testkit::Postgres;

use crate::cluster::{
    Scene, cluster, daemon, follower, report_is_what_the_hosts_run, scene, signal,
    start_deployment, stored_events, systems, until_activating,
};
use crate::daemon::{Daemon, wait_finished};
use crate::helpers::Harness;
use crate::recovery::slow_fleet;

/// Whether one of `events` is a log line containing `text`.
fn logged(events: &[Event], text: &str) -> bool {
    events
        .iter()
        .any(|e| matches!(&e.kind, EventKind::Log { message } if message.contains(text)))
}

/// Wait for `d` to exit by itself; whether it exited cleanly.
async fn exits(d: &mut Daemon) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            return status.success();
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many times each of `names` activated another system than `before`.
fn new_activations(h: &Harness, names: &[&str], before: &[Option<String>]) -> Vec<usize> {
    names
        .iter()
        .zip(before)
        .map(|(name, old)| {
            h.fleet
                .activation_history(name)
                .iter()
                .filter(|x| x.by != "boot" && Some(&x.activation.path) != old.as_ref())
                .count()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_the_deployment_over_to_the_other_daemon_which_finishes_it() {
    let names = ["v1", "v2", "v3"];
    // Leases far longer than the test waits: the deployment goes on because
    // it was handed over, not because its lease expired.
    let Scene {
        mut p,
        h,
        before,
        db,
        id,
    } = scene(&names, 300).await;
    let follower = follower(&p.b, id);
    let busy = until_activating(&h, &names, &before);
    signal(&p.a, "TERM");
    assert!(exits(&mut p.a).await, "the stopped daemon exits cleanly");
    // The host in the middle of its pipeline finished it before its daemon
    // let the deployment go.
    assert_eq!(h.fleet.generation(busy), Some(2), "{busy} finished");
    let deployment = wait_finished(&p.b, id).await;
    report_is_what_the_hosts_run(&h, &deployment, &names);
    // Every host activated once: nothing was cancelled, rolled back or done
    // twice.
    assert_eq!(new_activations(&h, &names, &before), [1, 1, 1]);
    // The other daemon's event stream shows the handoff and the takeover,
    // every stored event once, in order.
    let streamed = follower.events().await;
    assert!(
        logged(&streamed, "handed over: coordinator"),
        "{streamed:#?}"
    );
    assert!(
        logged(
            &streamed,
            "the previous holder handed it over as it stopped"
        ),
        "{streamed:#?}"
    );
    let stored = stored_events(&db, id).await;
    assert_eq!(
        streamed.iter().map(|e| e.id).collect::<Vec<_>>(),
        stored.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    // No host started after the stop but the one in the middle: the others
    // were activated by the daemon that took the deployment over.
    let position = |found: &dyn Fn(&Event) -> bool| stored.iter().position(found).unwrap();
    let handed = position(
        &|e| matches!(&e.kind, EventKind::Log { message } if message.starts_with("handed over")),
    );
    let activated = |name: &'static str| {
        move |e: &Event| {
            e.host.as_deref() == Some(name)
                && matches!(
                    e.kind,
                    EventKind::StepStarted {
                        step: Step::Activate
                    }
                )
        }
    };
    for name in names {
        let at = position(&activated(name));
        if name == busy {
            assert!(at < handed, "{name} was activated before the handoff");
        } else if at < handed {
            // Deployed before the stop.
            assert!(
                stored[at..handed]
                    .iter()
                    .any(|e| e.host.as_deref() == Some(name)
                        && matches!(e.kind, EventKind::HostFinished { .. })),
                "{name} was started and not finished before the handoff"
            );
        }
    }
    // The stopped daemon left the cluster; the other counts the handoff.
    let seen = cluster(&p.b).await;
    let coordinators = seen["coordinators"].as_array().unwrap();
    assert_eq!(coordinators.len(), 1, "{seen:#}");
    assert_eq!(coordinators[0]["stopping"], false, "{seen:#}");
    let metrics = reqwest::get(format!("{}/metrics", p.b.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "nix_deploy_cluster_handoffs_received_total 1",
        "nix_deploy_cluster_takeovers_total 1",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_without_another_daemon_that_takes_over_cancels_the_deployment_safely() {
    let names = ["u1", "u2"];
    let h = slow_fleet(&names, 3000);
    let before = systems(&h, &names);
    let db = Postgres::database().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut d = daemon(&h, state.path(), &db.url, 300);
    let id = start_deployment(&d, json!({ "parallel_limit": 1 })).await;
    let busy = until_activating(&h, &names, &before);
    signal(&d, "TERM");
    assert!(exits(&mut d).await, "the daemon exits cleanly");
    let events = stored_events(&db, id).await;
    assert!(
        !logged(&events, "handed over"),
        "nobody to hand it over to: {events:#?}"
    );
    let finished = events
        .iter()
        .rev()
        .find_map(|e| match &e.kind {
            EventKind::DeploymentFinished { status } => Some(*status),
            _ => None,
        })
        .expect("the deployment ended");
    assert_eq!(
        finished,
        nix_deploy_core::events::DeploymentStatus::Cancelled
    );
    assert_eq!(
        h.fleet.generation(busy),
        Some(2),
        "the host in the middle finished"
    );
    for name in names {
        assert!(h.consistent(name), "{name} is between generations");
    }
}
