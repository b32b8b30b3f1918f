//! Several daemons on one real PostgreSQL (a throwaway server from the
//! testkit), against real test hosts: a follower streams what another
//! daemon runs; the owner killed, frozen, or cut off from a restarting
//! database; an unreachable database at start.

use std::path::Path;
use std::time::Duration;

use nix_deploy_testkit::{PgDatabase, Postgres};
use serde_json::{Value, json};

use crate::daemon::{
    DEPLOY_TOKEN, Daemon, call, follow_events, read, start_daemon_in, wait_finished,
};
use crate::helpers::{Harness, binary};
use crate::recovery::slow_fleet;

/// A daemon of its own machine (its own state directory) on `url`,
/// renewing every second, its leases lasting `ttl` seconds.
pub(crate) fn daemon(h: &Harness, state: &Path, url: &str, ttl: u64) -> Daemon {
    let top = format!("database = \"{url}\"");
    let cluster = format!("[cluster]\nheartbeat = \"1s\"\nlease-ttl = \"{ttl}s\"\n");
    start_daemon_in(h, state, &top, &cluster)
}

/// Two daemons, each of its own machine (state directory), on `url`.
pub(crate) struct Pair {
    pub a: Daemon,
    pub b: Daemon,
    _states: [tempfile::TempDir; 2],
}

pub(crate) fn pair(h: &Harness, url: &str, ttl: u64) -> Pair {
    let states = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    Pair {
        a: daemon(h, states[0].path(), url, ttl),
        b: daemon(h, states[1].path(), url, ttl),
        _states: states,
    }
}

pub(crate) async fn start_deployment(d: &Daemon, body: Value) -> i64 {
    let (status, created) = call(
        reqwest::Method::POST,
        &format!("{}/api/v1/deployments", d.url),
        Some(DEPLOY_TOKEN),
        Some(body),
    )
    .await;
    assert_eq!(status, 202, "{created}");
    created["id"].as_i64().unwrap()
}

pub(crate) async fn cluster(d: &Daemon) -> Value {
    read(d, "/api/v1/cluster").await
}

/// Follow deployment `id` on `d` to its end; the events' ids and kinds.
async fn follow(d: &Daemon, id: i64) -> Vec<(i64, String)> {
    follow_events(d, id)
        .await
        .iter()
        .map(|e| (e.id, e.kind.name().to_string()))
        .collect()
}

/// Every stored event of deployment `id`, as `GET /api/v1/deployments/ID/report` would read them.
pub(crate) async fn stored_events(db: &PgDatabase, id: i64) -> Vec<nix_deploy_core::events::Event> {
    let dir = tempfile::tempdir().unwrap();
    let mut options = nix_deploy::store::StoreOptions::sqlite(dir.path());
    options.database = nix_deploy::store::Database::Postgres(
        nix_deploy::store::DatabaseUrl::parse(&db.url).unwrap(),
    );
    let store = nix_deploy::store::Store::connect(&options).await.unwrap();
    let events = store.events(id, 0).await.unwrap();
    store.close().await;
    events
}

/// Every host deployed, on generation 2, running what the report says.
pub(crate) fn report_is_what_the_hosts_run(h: &Harness, deployment: &Value, names: &[&str]) {
    assert_eq!(deployment["status"], "succeeded", "{deployment:#}");
    for name in names {
        let run = deployment["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == *name)
            .unwrap_or_else(|| panic!("no run of {name}: {deployment:#}"));
        assert_eq!(run["status"], "deployed", "{name}: {deployment:#}");
        assert_eq!(h.fleet.generation(name), Some(2), "{name}");
        assert!(h.consistent(name), "{name} is between generations");
        assert_eq!(
            h.fleet.current_system(name).as_deref(),
            run["to"]["path"].as_str(),
            "{name}: the report differs from what the host runs"
        );
    }
}

/// The first of `names` that is activating another system than `before`
/// (what each ran at generation 1), waiting for one.
pub(crate) fn until_activating<'a>(
    h: &Harness,
    names: &[&'a str],
    before: &[Option<String>],
) -> &'a str {
    let activating = || {
        names.iter().zip(before).find_map(|(name, old)| {
            h.fleet
                .activations(name)
                .iter()
                .any(|x| Some(&x.path) != old.as_ref() && x.end.is_none())
                .then_some(*name)
        })
    };
    h.until(60, "a host activating its new system", || {
        activating().is_some()
    });
    activating().unwrap()
}

/// What each host runs now.
pub(crate) fn systems(h: &Harness, names: &[&str]) -> Vec<Option<String>> {
    names.iter().map(|n| h.fleet.current_system(n)).collect()
}

/// Two daemons on a fresh PostgreSQL (leases of `ttl` seconds) and a fleet
/// `names` whose new systems take 3 s to activate, deployed one host at a
/// time by the first daemon.
pub(crate) struct Scene {
    /// First: the daemons stop before the fleet does.
    pub p: Pair,
    pub h: Harness,
    /// What each host ran before.
    pub before: Vec<Option<String>>,
    pub db: PgDatabase,
    pub id: i64,
}

pub(crate) async fn scene(names: &[&str], ttl: u64) -> Scene {
    let h = slow_fleet(names, 3000);
    let before = systems(&h, names);
    let db = Postgres::database().unwrap();
    let p = pair(&h, &db.url, ttl);
    let id = start_deployment(&p.a, json!({ "parallel_limit": 1 })).await;
    Scene {
        p,
        h,
        before,
        db,
        id,
    }
}

/// A client following a deployment's events on a daemon, from its start,
/// in the background.
pub(crate) struct Follower {
    task: tokio::task::JoinHandle<Result<(), nix_deploy::cli::client::ClientError>>,
    events: tokio::sync::mpsc::UnboundedReceiver<nix_deploy_core::events::Event>,
}

pub(crate) fn follower(d: &Daemon, id: i64) -> Follower {
    let client =
        nix_deploy::cli::client::Client::new(&d.url, Some(&d.token_file("read.token"))).unwrap();
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    Follower {
        task: tokio::spawn(async move { client.follow(id, tx).await }),
        events,
    }
}

impl Follower {
    /// Every event it received, once its stream ended with the deployment.
    pub(crate) async fn events(mut self) -> Vec<nix_deploy_core::events::Event> {
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the follower's stream ends")
            .unwrap()
            .unwrap();
        let mut streamed = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            streamed.push(event);
        }
        streamed
    }
}

/// `kill -SIGNAL` the daemon.
pub(crate) fn signal(d: &Daemon, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(d.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_streams_every_event_of_a_deployment_another_daemon_runs_in_order() {
    let names = ["f1", "f2", "f3"];
    let h = slow_fleet(&names, 500);
    let db = Postgres::database().unwrap();
    let p = pair(&h, &db.url, 15);
    let (a, b) = (&p.a, &p.b);
    let id = start_deployment(a, json!({ "parallel_limit": 1 })).await;
    let streamed = follow(b, id).await;
    let stored = stored_events(&db, id).await;
    assert_eq!(
        streamed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        stored.iter().map(|e| e.id).collect::<Vec<_>>(),
        "the follower got every stored event, once, in order"
    );
    assert_eq!(streamed.last().unwrap().1, "deployment-finished");
    let deployment = wait_finished(b, id).await;
    report_is_what_the_hosts_run(&h, &deployment, &names);
    // Both daemons see the cluster: two coordinators alive, one leader; the
    // deployment was held by A.
    let seen = cluster(b).await;
    let coordinators = seen["coordinators"].as_array().unwrap();
    assert_eq!(coordinators.len(), 2, "{seen:#}");
    assert!(
        coordinators
            .iter()
            .all(|c| c["alive"] == true && c["kind"] == "daemon")
    );
    assert_eq!(
        coordinators.iter().filter(|c| c["leader"] == true).count(),
        1
    );
    assert_eq!(seen["backend"], "postgresql");
    let metrics = reqwest::get(format!("{}/metrics", b.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("nix_deploy_cluster_coordinators_alive 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_owner_killed_while_a_host_activates_is_taken_over_and_every_host_ends_deployed() {
    let names = ["k1", "k2"];
    let Scene {
        mut p,
        h,
        before,
        db,
        id,
    } = scene(&names, 4).await;
    let first = until_activating(&h, &names, &before);
    p.a.child.kill().unwrap(); // SIGKILL
    p.a.child.wait().unwrap();
    let b = &p.b;
    let deployment = wait_finished(b, id).await;
    report_is_what_the_hosts_run(&h, &deployment, &names);
    let events = stored_events(&db, id).await;
    let taken = events.iter().any(|e| {
        matches!(&e.kind, nix_deploy_core::events::EventKind::Log { message } if message.contains("taken over"))
    });
    assert!(taken, "the takeover is in the history");
    let seen = cluster(b).await;
    let lease = seen["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["deployment_id"] == id);
    // Finished: no lease any more; the metrics count the takeover.
    assert!(lease.is_none(), "{seen:#}");
    let metrics = reqwest::get(format!("{}/metrics", b.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("nix_deploy_cluster_takeovers_total 1"),
        "{metrics}"
    );
    // The host that was activating when its owner died was settled, not
    // left between generations (checked above), whichever way it went first.
    assert!(h.consistent(first));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_owner_that_wakes_after_a_takeover_is_refused_and_touches_no_host() {
    let names = ["s1", "s2"];
    let Scene {
        p,
        h,
        before,
        db,
        id,
    } = scene(&names, 4).await;
    let (a, b) = (&p.a, &p.b);
    until_activating(&h, &names, &before);
    signal(a, "STOP");
    let deployment = wait_finished(b, id).await;
    report_is_what_the_hosts_run(&h, &deployment, &names);
    let activations: Vec<usize> = names.iter().map(|n| h.fleet.activations(n).len()).collect();
    let events_before = stored_events(&db, id).await;
    signal(a, "CONT");
    h.until(
        60,
        "the woken daemon to stop working on the deployment",
        || a.log().contains("lost the deployment"),
    );
    let after: Vec<usize> = names.iter().map(|n| h.fleet.activations(n).len()).collect();
    assert_eq!(
        after, activations,
        "no host was activated again by the woken daemon"
    );
    let events_after = stored_events(&db, id).await;
    assert_eq!(
        events_after.len(),
        events_before.len(),
        "the woken daemon's writes were refused"
    );
    let again = wait_finished(b, id).await;
    assert_eq!(again["status"], "succeeded");
    for name in names {
        assert!(h.consistent(name));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgresql_restarting_mid_deployment_loses_no_event_and_activates_no_host_twice() {
    let names = ["r1", "r2"];
    let h = slow_fleet(&names, 2000);
    let before = systems(&h, &names);
    let server = Postgres::start().unwrap();
    let name = server.create_database().unwrap();
    let url = server.url(&name);
    // Leases long enough to outlast the restart.
    let p = pair(&h, &url, 15);
    let (a, b) = (&p.a, &p.b);
    let id = start_deployment(a, json!({ "parallel_limit": 1 })).await;
    let follower = follower(b, id);
    until_activating(&h, &names, &before);
    server.restart().unwrap();
    let deployment = wait_finished(a, id).await;
    report_is_what_the_hosts_run(&h, &deployment, &names);
    for (name, old) in names.iter().zip(&before) {
        let count = h
            .fleet
            .activations(name)
            .iter()
            .filter(|x| Some(&x.path) != old.as_ref())
            .count();
        assert_eq!(count, 1, "{name} was activated {count} times");
    }
    let streamed = follower.events().await;
    let db = PgDatabase {
        url,
        name,
        server: std::sync::Arc::new(server),
    };
    let stored = stored_events(&db, id).await;
    assert_eq!(
        streamed.iter().map(|e| e.id).collect::<Vec<_>>(),
        stored.iter().map(|e| e.id).collect::<Vec<_>>(),
        "every stored event streamed once, in order, across the restart"
    );
    let mut starts: Vec<(Option<String>, String)> = stored
        .iter()
        .filter(|e| e.kind.name() == "step-started")
        .map(|e| (e.host.clone(), format!("{:?}", e.kind)))
        .collect();
    let all = starts.len();
    starts.sort();
    starts.dedup();
    assert_eq!(starts.len(), all, "no step was recorded twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_that_loses_the_database_past_its_lease_stops_acting_and_resumes_when_it_is_back()
{
    let names = ["o1", "o2"];
    let h = slow_fleet(&names, 3000);
    let before = systems(&h, &names);
    let server = Postgres::start().unwrap();
    let name = server.create_database().unwrap();
    let state = tempfile::tempdir().unwrap();
    let d = daemon(&h, state.path(), &server.url(&name), 3);
    let id = start_deployment(&d, json!({ "parallel_limit": 1 })).await;
    until_activating(&h, &names, &before);
    server.stop().unwrap();
    h.until(60, "the daemon to stop acting on its deployment", || {
        d.log().contains("lost the deployment")
    });
    server.run().unwrap();
    // Back: the lease it gave up expires, and it takes the deployment over
    // itself (a new epoch), settles the hosts and finishes.
    let deployment = wait_finished(&d, id).await;
    report_is_what_the_hosts_run(&h, &deployment, &names);
    let db = PgDatabase {
        url: server.url(&name),
        name,
        server: std::sync::Arc::new(server),
    };
    let events = stored_events(&db, id).await;
    assert!(
        events.iter().any(|e| matches!(
            &e.kind,
            nix_deploy_core::events::EventKind::Log { message } if message.contains("taken over")
        )),
        "resumed by a takeover"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cli_on_the_database_leases_hosts_like_a_daemon_and_its_deployment_is_taken_over_when_it_dies()
 {
    let names = ["c1"];
    let h = slow_fleet(&names, 3000);
    let before = systems(&h, &names);
    let db = Postgres::database().unwrap();
    let state = tempfile::tempdir().unwrap();
    let d = daemon(&h, state.path(), &db.url, 4);
    let database = ["--database", db.url.as_str()];
    let mut cli = h.spawn("cli", &[&database[..], &["deploy"]].concat());
    until_activating(&h, &names, &before);
    // The CLI holds the host: the daemon may not deploy it meanwhile.
    let (status, refused) = call(
        reqwest::Method::POST,
        &format!("{}/api/v1/deployments", d.url),
        Some(DEPLOY_TOKEN),
        Some(json!({ "hosts": ["c1"] })),
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    let seen = cluster(&d).await;
    let kinds: Vec<&str> = seen["coordinators"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"cli") && kinds.contains(&"daemon"),
        "{seen:#}"
    );
    let id = seen["deployments"][0]["deployment_id"].as_i64().unwrap();
    cli.kill().unwrap(); // SIGKILL
    cli.wait().unwrap();
    let deployment = wait_finished(&d, id).await;
    report_is_what_the_hosts_run(&h, &deployment, &names);
    // A CLI that ends as it should leaves the coordinators.
    let out = h.run(&[&database[..], &["status"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = cluster(&d).await;
    let alive_clis = seen["coordinators"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "cli" && c["alive"] == true)
        .count();
    assert_eq!(alive_clis, 0, "{seen:#}");
}

#[test]
fn an_unreachable_database_at_start_is_named_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("db-password");
    std::fs::write(&password, "hunter2-secret\n").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase = \"postgresql://deploy@localhost/fleet?host=/nonexistent/sockets\"\ndatabase-password-file = \"{}\"\n",
            password.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .arg("--state-dir")
        .arg(dir.path())
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("postgresql://deploy:***@localhost/fleet"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    // A URL that is no PostgreSQL URL is bad input (exit 2), said at once.
    let out = std::process::Command::new(binary())
        .args(["--database", "mysql://root:pw@db/x", "status"])
        .arg("--state-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("postgresql://"), "{stderr}");
}
