//! The daemon's watch for real: `nix-deploy serve` watching real test hosts
//! on a one-second interval. A host switched by hand is reported (API,
//! `status`, metrics, the event stream) and put back by `redeploy`, and a
//! redeploy outside its maintenance window waits for it; a stopped service
//! gives one e-mail (to a real SMTP server) and one signed webhook, and one
//! more of each when it recovers, across a restart. The helpers here are
//! shared by `watch_edges` (pull mode, promtool, hosts and flakes that
//! misbehave) and `watch_cluster` (the watch on the leader of two daemons).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use nix_deploy_testkit::HostSpec;
use serde_json::Value;
use sha2::Sha256;

use crate::daemon::{
    Daemon, READ_TOKEN, client, client_metrics, read, receiver, start_daemon_args, stop_daemon,
};
use crate::helpers::{Harness, git};
use crate::smtp::Smtp;

/// Every host probed and checked every second.
pub(crate) const WATCH: &str = "\n[watch]\ninterval = \"1s\"\nhealth-interval = \"1s\"\n";

pub(crate) async fn fleet(d: &Daemon) -> Value {
    read(d, "/api/v1/fleet").await
}

pub(crate) fn host<'a>(fleet: &'a Value, name: &str) -> &'a Value {
    fleet["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["name"] == name))
        .unwrap_or(&Value::Null)
}

/// A host's drift kinds.
pub(crate) fn kinds(fleet: &Value, name: &str) -> Vec<String> {
    host(fleet, name)["drift"]
        .as_array()
        .map(|drift| {
            drift
                .iter()
                .filter_map(|d| d["kind"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn in_sync(fleet: &Value, name: &str) -> bool {
    kinds(fleet, name) == ["in-sync"]
}

/// Poll the fleet until `condition` holds (a deadline, not a timing).
pub(crate) async fn until_fleet(
    d: &Daemon,
    what: &str,
    condition: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = fleet(d).await;
        if condition(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {now:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Poll until `condition` holds.
pub(crate) async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deployments recorded, newest first.
pub(crate) async fn deployments(d: &Daemon) -> Vec<Value> {
    let list = read(d, "/api/v1/deployments?limit=50").await;
    list["deployments"].as_array().cloned().unwrap_or_default()
}

/// How many of `d`'s deployments `trigger` started.
pub(crate) async fn triggered(d: &Daemon, trigger: &str) -> usize {
    deployments(d)
        .await
        .iter()
        .filter(|d| d["trigger"] == trigger)
        .count()
}

/// One event of a stream: its name, id and data.
type Received = Arc<Mutex<Vec<(String, i64, Value)>>>;

/// Follow `/api/v1/fleet/events` (from `last_id` when given) in the
/// background.
fn follow_fleet(d: &Daemon, last_id: Option<i64>) -> Received {
    let received: Received = Arc::default();
    let seen = received.clone();
    let mut request = client()
        .get(format!("{}/api/v1/fleet/events", d.url))
        .bearer_auth(READ_TOKEN)
        .timeout(Duration::from_secs(600));
    if let Some(id) = last_id {
        request = request.header("Last-Event-ID", id.to_string());
    }
    tokio::spawn(async move {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let mut events = response.bytes_stream().eventsource();
        while let Some(Ok(event)) = events.next().await {
            let data = serde_json::from_str(&event.data).unwrap_or(Value::Null);
            let id = event.id.parse().unwrap_or(-1);
            seen.lock().unwrap().push((event.event, id, data));
        }
    });
    received
}

/// A clone of the fleet's flake as it is now, for the watch to track: what
/// the hosts should run stays put while the fleet's own flake makes the
/// systems someone switches to by hand. The clone, and its `git+file` flake
/// reference.
pub(crate) fn tracked_clone(h: &Harness) -> (tempfile::TempDir, String) {
    let flake_dir = h.fleet.dir().join("flake");
    git(&flake_dir, &["init", "-q", "-b", "main"]);
    git(&flake_dir, &["add", "-A"]);
    git(&flake_dir, &["commit", "-q", "-m", "v1"]);
    let tracked = tempfile::tempdir().unwrap();
    git(
        tracked.path(),
        &["clone", "-q", &flake_dir.display().to_string(), "fleet"],
    );
    let flake = format!("git+file://{}", tracked.path().join("fleet").display());
    (tracked, flake)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_switch_is_reported_and_redeploy_puts_it_back() {
    let mut h = Harness::start(vec![
        HostSpec::new("m1").tags(&["auto"]),
        HostSpec::new("m2"),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    let deployed = h.fleet.current_system("m1").unwrap();
    let (_tracked, flake) = tracked_clone(&h);
    let config = format!(
        "{WATCH}flake = \"{flake}\"\n[[watch.rules]]\non = \"@auto\"\non-drift = \"redeploy\"\n"
    );
    let d = start_daemon_args(&h, "", &config, &[]);
    until_fleet(&d, "both hosts in sync", |f| {
        in_sync(f, "m1") && in_sync(f, "m2")
    })
    .await;
    let events = follow_fleet(&d, None);
    until("the stream's snapshot", || {
        !events.lock().unwrap().is_empty()
    })
    .await;

    // By hand, on both: a new generation and `switch-to-configuration`.
    let mut manual = Vec::new();
    for name in ["m1", "m2"] {
        h.fleet.update(name, |s| s.bump()).unwrap();
        manual.push(h.fleet.provision(name).unwrap());
    }
    assert_ne!(manual[1], deployed);

    // m2 is only reported: through the API, `status` and the metrics.
    let now = until_fleet(&d, "m2 reported manual-switch", |f| {
        kinds(f, "m2").contains(&"manual-switch".to_string())
    })
    .await;
    assert_eq!(host(&now, "m2")["running"], manual[1].as_str());
    assert_eq!(host(&now, "m2")["on_drift"], "report");
    let token = d.token_file("read.token").display().to_string();
    let through = ["--server", d.url.as_str(), "--token-file", token.as_str()];
    let (code, status, _) = h.json(&[&through[..], &["status"]].concat());
    assert_eq!(code, 0);
    assert!(
        kinds(&status["fleet"], "m2").contains(&"manual-switch".to_string()),
        "{status:#}"
    );
    assert_eq!(status["fleet"]["watching"], true);
    let table = h.run(&[&through[..], &["status"]].concat());
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("Watched by the daemon"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("m2") && l.contains("manual-switch")),
        "{table}"
    );
    let metrics = client_metrics(&d).await;
    assert!(
        metrics.contains("nix_deploy_host_drift{host=\"m2\",kind=\"manual-switch\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("nix_deploy_host_in_sync{host=\"m2\"} 0"));

    // m1 is put back by a deployment through the normal pipeline.
    until("m1 back on its deployed system", || {
        h.fleet.current_system("m1").as_deref() == Some(deployed.as_str())
    })
    .await;
    until_fleet(&d, "m1 in sync again", |f| in_sync(f, "m1")).await;
    let reconciled: Vec<Value> = deployments(&d)
        .await
        .into_iter()
        .filter(|d| d["trigger"] == "reconcile")
        .collect();
    assert_eq!(reconciled.len(), 1, "{reconciled:#?}");
    assert_eq!(reconciled[0]["status"], "succeeded");
    assert_eq!(reconciled[0]["requested_by"], "watch");
    assert_eq!(reconciled[0]["selected"], serde_json::json!(["m1"]));
    assert_eq!(h.fleet.current_system("m2"), Some(manual[1].clone()));

    // The stream said so, in order: m2 switched by hand; m1 drifted (as
    // manually switched, or mid-switch as booting another system than it
    // runs), then in sync again.
    let seen = events.lock().unwrap().clone();
    assert_eq!(seen[0].0, "snapshot");
    let changes: Vec<&(String, i64, Value)> = seen[1..].iter().collect();
    assert!(changes.iter().all(|(name, _, _)| name == "host"));
    assert!(changes.windows(2).all(|w| w[0].1 < w[1].1), "{changes:#?}");
    let appeared = |host: &str, kind: &str| {
        changes
            .iter()
            .position(|(_, _, e)| e["host"] == host && e["appeared"].to_string().contains(kind))
    };
    assert!(appeared("m2", "manual-switch").is_some(), "{changes:#?}");
    let drifted = appeared("m1", "manual-switch")
        .or(appeared("m1", "boot-mismatch"))
        .unwrap_or_else(|| panic!("m1 never drifted in {changes:#?}"));
    assert!(
        changes[drifted..]
            .iter()
            .any(|(_, _, e)| e["host"] == "m1" && e["appeared"].to_string().contains("in-sync")),
        "{changes:#?}"
    );
    // Resumed after the first change: the changes after it, no snapshot.
    let resumed = follow_fleet(&d, Some(changes[0].1));
    until("the replay", || !resumed.lock().unwrap().is_empty()).await;
    let first = resumed.lock().unwrap()[0].clone();
    assert_eq!(first.0, "host");
    assert_eq!(first.1, changes[1].1);

    // A restart keeps the states and their times.
    let since = host(&fleet(&d).await, "m2")["drift"][0]["since"].clone();
    stop_daemon(d);
    let d = start_daemon_args(&h, "", &config, &[]);
    let again = fleet(&d).await;
    assert_eq!(host(&again, "m2")["drift"][0]["since"], since);
    assert_eq!(kinds(&again, "m2"), ["manual-switch"]);
}

pub(crate) fn header<'a>(head: &'a [(String, String)], name: &str) -> &'a str {
    head.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_service_gives_one_email_and_one_signed_webhook_and_one_more_when_it_recovers() {
    let h = Harness::start(vec![HostSpec::new("a1").service("nginx")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let smtp = Smtp::start();
    let hook = receiver();
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("webhook.secret");
    std::fs::write(&secret_file, "webhook-signing-secret\n").unwrap();
    let config = format!(
        r#"
[notifications]
json-webhooks = ["{}"]
webhook-secret-file = "{}"
email-to = ["ops@example.org"]
retries = 1

[smtp]
server = "127.0.0.1"
port = {}
security = "none"
from = "nix-deploy <nix-deploy@example.org>"
{WATCH}"#,
        hook.url,
        secret_file.display(),
        smtp.port
    );
    let d = start_daemon_args(&h, "", &config, &[]);
    until_fleet(&d, "a1 healthy and in sync", |f| {
        in_sync(f, "a1") && host(f, "a1")["healthy"] == true
    })
    .await;

    // The service stops on its own.
    h.fleet.set_unit_state("a1", "nginx", "failed").unwrap();
    let sick = until_fleet(&d, "a1 unhealthy", |f| {
        kinds(f, "a1").contains(&"unhealthy".to_string())
    })
    .await;
    assert!(
        host(&sick, "a1")["failing_checks"][0]
            .as_str()
            .unwrap()
            .contains("nginx"),
        "{sick:#}"
    );
    until("the unhealthy e-mail", || {
        !smtp.subjects("a1 is unhealthy").is_empty()
    })
    .await;
    // More checks while it stays down, then a restart: no more alerts.
    let checked = |f: &Value| host(f, "a1")["health_checked_at"].as_i64().unwrap_or(0);
    let mut last = checked(&sick);
    for _ in 0..3 {
        let f = until_fleet(&d, "another health check", |f| checked(f) > last).await;
        last = checked(&f);
    }
    stop_daemon(d);
    let d = start_daemon_args(&h, "", &config, &[]);
    until_fleet(&d, "a health check after the restart", |f| {
        checked(f) > last
    })
    .await;
    assert_eq!(kinds(&fleet(&d).await, "a1"), ["unhealthy"]);

    // It comes back.
    h.fleet.set_unit_state("a1", "nginx", "active").unwrap();
    until_fleet(&d, "a1 healthy again", |f| in_sync(f, "a1")).await;
    until("the recovery e-mail", || {
        !smtp.subjects("a1 is healthy again").is_empty()
    })
    .await;
    until("both webhooks", || hook.bodies.lock().unwrap().len() >= 2).await;
    // Nothing more is on its way: the alert outbox is empty.
    stop_daemon(d);

    assert_eq!(
        smtp.subjects("a1 is unhealthy").len(),
        1,
        "{:#?}",
        smtp.messages()
    );
    let mail = &smtp.subjects("a1 is unhealthy")[0];
    assert!(
        mail.contains("ops@example.org") && mail.contains("nginx"),
        "{mail}"
    );
    assert_eq!(smtp.subjects("a1 is healthy again").len(), 1);
    let bodies = hook.bodies.lock().unwrap().clone();
    let heads = hook.heads.lock().unwrap().clone();
    let mut events = Vec::new();
    for (body, head) in bodies.iter().zip(&heads) {
        // Signed as GitHub signs its own: HMAC-SHA256 of the body.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"webhook-signing-secret").unwrap();
        mac.update(body.as_bytes());
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            header(head, "x-nix-deploy-signature-256"),
            expected,
            "{body}"
        );
        let json: Value = serde_json::from_str(body).unwrap();
        assert_eq!(header(head, "x-nix-deploy-event"), json["event"]);
        assert_eq!(header(head, "x-nix-deploy-delivery"), json["delivery"]);
        events.push(json["event"].as_str().unwrap().to_string());
    }
    assert_eq!(events, ["host.unhealthy", "host.healthy"], "{bodies:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconcile_outside_its_maintenance_window_waits_for_it() {
    let mut h = Harness::start(vec![HostSpec::new("w1")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let (_tracked, flake) = tracked_clone(&h);
    // The only window w1 may be deployed in opens in half an hour (UTC).
    let opens = nix_deploy::now_ms() / 1000 + 30 * 60;
    let config = format!(
        "{WATCH}flake = \"{flake}\"\non-drift = \"redeploy\"\n\n[[window]]\nkind = \"allow\"\nschedule = \"{} {} * * *\"\nduration = \"1m\"\n",
        opens / 60 % 60,
        opens / 3600 % 24
    );
    let d = start_daemon_args(&h, "", &config, &[]);
    until_fleet(&d, "w1 in sync", |f| in_sync(f, "w1")).await;

    h.fleet.update("w1", |s| s.bump()).unwrap();
    let manual = h.fleet.provision("w1").unwrap();
    // The reconcile is recorded, waits for the window, and holds the host,
    // which is reported from it and left as it is.
    let deadline = Instant::now() + Duration::from_secs(90);
    let waiting = loop {
        let found = deployments(&d)
            .await
            .into_iter()
            .find(|d| d["trigger"] == "reconcile");
        if let Some(found) = found.filter(|d| d["status"] == "waiting-for-window") {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no reconcile waiting for its window: {:#?}\n{}",
            deployments(&d).await,
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(waiting["selected"], serde_json::json!(["w1"]));
    let id = waiting["id"].as_i64().unwrap();
    until_fleet(&d, "w1 reported from its deployment", |f| {
        host(f, "w1")["deployment"] == id
    })
    .await;
    assert_eq!(h.fleet.current_system("w1"), Some(manual.clone()));
    // One reconcile at a time: no other was started meanwhile.
    assert_eq!(triggered(&d, "reconcile").await, 1);
    stop_daemon(d);
    assert_eq!(h.fleet.current_system("w1"), Some(manual));
}
