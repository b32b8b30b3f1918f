//! The fleet watch with two daemons on one real PostgreSQL (a throwaway
//! server from the testkit), against real test hosts: only the elected
//! leader probes and alerts while the other reports what it stored; killed,
//! its watch is taken over by the other daemon from the stored states, and
//! every alert still goes out once.

use std::path::Path;

use nix_deploy_testkit::{HostSpec, Postgres};
use serde_json::Value;

use crate::cluster::cluster;
use crate::daemon::{Daemon, receiver, start_daemon_in};
use crate::helpers::Harness;
use crate::watch::{WATCH, fleet, host, in_sync, kinds, tracked_clone, until, until_fleet};

/// Host identities a daemon learned: it connected to those hosts.
fn identities(state: &Path) -> usize {
    std::fs::read_dir(state.join("identities"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// The elected leader's coordinator id and pid, as `d` sees the cluster.
async fn leader(d: &Daemon) -> Option<(String, i64)> {
    let cluster = cluster(d).await;
    let id = cluster["leader"].as_str()?.to_string();
    let pid = cluster["coordinators"]
        .as_array()?
        .iter()
        .find(|c| c["id"] == id.as_str())?["pid"]
        .as_i64()?;
    Some((id, pid))
}

/// Wait until `d` sees a leader other than `not`.
async fn until_leader(d: &Daemon, not: Option<&str>) -> (String, i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some((id, pid)) = leader(d).await
            && Some(id.as_str()) != not
        {
            return (id, pid);
        }
        assert!(std::time::Instant::now() < deadline, "no new leader");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The events of the webhooks received so far, in order.
fn hooks(bodies: &std::sync::Mutex<Vec<String>>) -> Vec<String> {
    bodies
        .lock()
        .unwrap()
        .iter()
        .filter_map(|b| serde_json::from_str::<Value>(b).ok())
        .filter_map(|b| b["event"].as_str().map(str::to_string))
        .collect()
}

/// Wait until the history's alert outbox is empty: every alert stored so
/// far was sent and marked so.
async fn outbox_empty(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = nix_deploy::store::StoreOptions::sqlite(dir.path());
    options.database =
        nix_deploy::store::Database::Postgres(nix_deploy::store::DatabaseUrl::parse(url).unwrap());
    let store = nix_deploy::store::Store::connect(&options).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !store.unsent_alerts().await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "alerts left unsent: {:?}",
            store.unsent_alerts().await
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_watches_and_alerts_and_another_daemon_takes_the_watch_over_when_it_dies() {
    let mut h = Harness::start(vec![
        HostSpec::new("c1").service("nginx"),
        HostSpec::new("c2"),
    ]);
    let db = Postgres::database().unwrap();
    // Deployed into the shared history, so that its drift is judged by it.
    let out = h.run_with_env(&["deploy"], &[("NIX_DEPLOY_DATABASE", db.url.as_str())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_tracked, flake) = tracked_clone(&h);
    let hook = receiver();
    let top = format!("database = \"{}\"", db.url);
    let extra = format!(
        "[cluster]\nheartbeat = \"1s\"\nlease-ttl = \"3s\"\n\n[notifications]\njson-webhooks = [\"{}\"]\nretries = 1\n{WATCH}flake = \"{flake}\"\n",
        hook.url
    );
    let states = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut daemons: Vec<Option<Daemon>> = states
        .iter()
        .map(|s| Some(start_daemon_in(&h, s.path(), &top, &extra)))
        .collect();

    // Who leads: its watch is the fleet's; the other reports what it stored.
    let (leader_id, leader_pid) = until_leader(daemons[0].as_ref().unwrap(), None).await;
    let first = daemons
        .iter()
        .position(|d| d.as_ref().unwrap().child.id() as i64 == leader_pid)
        .expect("the leader is one of the two daemons");
    let second = 1 - first;
    for d in daemons.iter().flatten() {
        let both = until_fleet(d, "both hosts in sync, watched by the leader", |f| {
            in_sync(f, "c1") && in_sync(f, "c2") && f["watched_by"] == leader_id.as_str()
        })
        .await;
        assert_eq!(both["watching"], true, "{both:#}");
    }
    // Only the leader probes: the other never connected to a host.
    assert_eq!(identities(states[first].path()), 2);
    assert_eq!(identities(states[second].path()), 0);

    // A service stops: both report it, one alert goes out.
    h.fleet.set_unit_state("c1", "nginx", "failed").unwrap();
    let mut since = Value::Null;
    for d in daemons.iter().flatten() {
        let sick = until_fleet(d, "c1 unhealthy", |f| {
            kinds(f, "c1").contains(&"unhealthy".to_string())
        })
        .await;
        since = host(&sick, "c1")["drift"][0]["since"].clone();
    }
    until("the unhealthy webhook", || {
        hooks(&hook.bodies).contains(&"host.unhealthy".to_string())
    })
    .await;
    outbox_empty(&db.url).await;
    assert_eq!(identities(states[second].path()), 0);

    // The leader dies: the other daemon is elected and takes the watch over
    // from the stored states (the outage's start kept, not alerted again).
    let mut dead = daemons[first].take().unwrap();
    dead.child.kill().unwrap(); // SIGKILL
    dead.child.wait().unwrap();
    let survivor = daemons[second].as_ref().unwrap();
    let (next_id, next_pid) = until_leader(survivor, Some(&leader_id)).await;
    assert_eq!(next_pid, survivor.child.id() as i64);
    let taken = until_fleet(survivor, "the watch taken over", |f| {
        f["watched_by"] == next_id.as_str() && f["watching"] == true
    })
    .await;
    assert_eq!(kinds(&taken, "c1"), ["unhealthy"]);
    assert_eq!(host(&taken, "c1")["drift"][0]["since"], since);

    // It watches: the recovery and a switch by hand are reported (and
    // alerted) by it.
    h.fleet.set_unit_state("c1", "nginx", "active").unwrap();
    until_fleet(survivor, "c1 healthy again", |f| in_sync(f, "c1")).await;
    h.fleet.update("c2", |s| s.bump()).unwrap();
    let manual = h.fleet.provision("c2").unwrap();
    let drifted = until_fleet(survivor, "c2 switched by hand", |f| {
        kinds(f, "c2").contains(&"manual-switch".to_string())
    })
    .await;
    assert_eq!(host(&drifted, "c2")["running"], manual.as_str());
    assert!(identities(states[second].path()) > 0);
    until("the drift webhook", || {
        hooks(&hook.bodies).contains(&"host.drifted".to_string())
    })
    .await;
    outbox_empty(&db.url).await;

    // Every alert once, whoever sent it. A switch by hand sets the boot
    // default before it activates, so a probe in between may truly see, and
    // alert, a passing boot-mismatch of c2 (drifted, then cleared); the
    // rest is exact.
    let bodies = hook.bodies.lock().unwrap().clone();
    let alerts: Vec<Value> = bodies
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    let mut ids: Vec<i64> = alerts
        .iter()
        .map(|a| a["alert"]["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), alerts.len(), "an alert sent twice: {bodies:#?}");
    let events: Vec<String> = alerts
        .iter()
        .map(|a| {
            let drift: Vec<&str> = a["alert"]["drift"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            format!(
                "{} {} {}",
                a["host"].as_str().unwrap(),
                a["event"].as_str().unwrap(),
                drift.join(",")
            )
            .trim_end()
            .to_string()
        })
        .filter(|e| {
            e != "c2 host.drifted boot-mismatch" && e != "c2 host.drift_cleared boot-mismatch"
        })
        .collect();
    assert_eq!(
        events,
        [
            "c1 host.unhealthy",
            "c1 host.healthy",
            "c2 host.drifted manual-switch"
        ],
        "{bodies:#?}"
    );
    assert_eq!(kinds(&fleet(survivor).await, "c1"), ["in-sync"]);
}
