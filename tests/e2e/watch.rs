//! The daemon's watch for real: `nix-deploy serve` watching real test hosts
//! on a one-second interval. A host switched by hand is reported (API,
//! `status`, metrics, the event stream) and put back by `redeploy`; a
//! stopped service gives one e-mail (to a real SMTP server) and one signed
//! webhook, and one more of each when it recovers, across a restart; a newer
//! commit makes hosts behind and pull mode deploys it (never an older one);
//! the example alerting rules pass `promtool` with the metrics the daemon
//! exports; a hung host, one answering garbage and a flake that stops
//! evaluating are reported as such while the rest is watched on.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use nix_deploy_testkit::HostSpec;
use serde_json::Value;
use sha2::Sha256;

use crate::daemon::{
    Daemon, READ_TOKEN, call, client, client_metrics, receiver, start_daemon_args, stop_daemon,
};
use crate::helpers::{Harness, binary, git};

/// Every host probed and checked every second.
const WATCH: &str = "\n[watch]\ninterval = \"1s\"\nhealth-interval = \"1s\"\n";

async fn fleet(d: &Daemon) -> Value {
    let (status, fleet) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/fleet", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{fleet}");
    fleet
}

fn host<'a>(fleet: &'a Value, name: &str) -> &'a Value {
    fleet["hosts"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["name"] == name))
        .unwrap_or(&Value::Null)
}

/// A host's drift kinds.
fn kinds(fleet: &Value, name: &str) -> Vec<String> {
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

fn in_sync(fleet: &Value, name: &str) -> bool {
    kinds(fleet, name) == ["in-sync"]
}

/// Poll the fleet until `condition` holds (a deadline, not a timing).
async fn until_fleet(d: &Daemon, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
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
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deployments recorded, newest first.
async fn deployments(d: &Daemon) -> Vec<Value> {
    let (_, list) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/deployments?limit=50", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    list["deployments"].as_array().cloned().unwrap_or_default()
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

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_switch_is_reported_and_redeploy_puts_it_back() {
    let mut h = Harness::start(vec![
        HostSpec::new("m1").tags(&["auto"]),
        HostSpec::new("m2"),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    let deployed = h.fleet.current_system("m1").unwrap();
    // The watch tracks a clone of the fleet's flake: what the hosts should
    // run stays put while the fleet's own flake makes the systems someone
    // switches to by hand.
    let flake_dir = h.fleet.dir().join("flake");
    git(&flake_dir, &["init", "-q", "-b", "main"]);
    git(&flake_dir, &["add", "-A"]);
    git(&flake_dir, &["commit", "-q", "-m", "v1"]);
    let tracked = tempfile::tempdir().unwrap();
    let clone = tracked.path().join("fleet");
    git(
        tracked.path(),
        &["clone", "-q", &flake_dir.display().to_string(), "fleet"],
    );
    let config = format!(
        "{WATCH}flake = \"git+file://{}\"\n[[watch.rules]]\non = \"@auto\"\non-drift = \"redeploy\"\n",
        clone.display()
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

/// A real SMTP server on loopback (Debian's `python3-aiosmtpd`), keeping
/// what it receives in a Maildir; stopped by its pid.
struct Smtp {
    child: Child,
    port: u16,
    maildir: tempfile::TempDir,
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Smtp {
    fn start() -> Smtp {
        let maildir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir.path().join("mail"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting aiosmtpd (scripts/setup.sh installs python3-aiosmtpd)");
        let smtp = Smtp {
            child,
            port,
            maildir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) {
                let mut banner = String::new();
                let _ = BufReader::new(stream).read_line(&mut banner);
                if banner.starts_with("220") {
                    return smtp;
                }
            }
            assert!(Instant::now() < deadline, "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every message received, as text.
    fn messages(&self) -> Vec<String> {
        let mut all = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(self.maildir.path().join("mail").join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                let mut text = String::new();
                if std::fs::File::open(entry.path())
                    .and_then(|mut f| f.read_to_string(&mut text))
                    .is_ok()
                {
                    all.push(text);
                }
            }
        }
        all
    }

    fn subjects(&self, containing: &str) -> Vec<String> {
        self.messages()
            .into_iter()
            .filter(|m| {
                m.lines()
                    .any(|l| l.starts_with("Subject:") && l.contains(containing))
            })
            .collect()
    }
}

fn header<'a>(head: &'a [(String, String)], name: &str) -> &'a str {
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

/// Run `cmd` to its end; it must succeed. Its stdout.
fn succeeds(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `git` with the commit's time set, so that each commit is newer than the
/// one before (Nix's `lastModified` counts seconds).
fn commit_at(dir: &Path, message: &str, unix: i64) {
    let date = format!("{unix} +0000");
    succeeds(
        Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
            .args(["commit", "-q", "-a", "-m", message])
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date)
            .current_dir(dir),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_commit_makes_hosts_behind_and_pull_mode_deploys_it_never_an_older_one() {
    let mut h = Harness::start(vec![HostSpec::new("p1")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let v1 = h.fleet.current_system("p1").unwrap();
    let dir = h.fleet.dir().join("flake");
    git(&dir, &["init", "-q", "-b", "main"]);
    git(&dir, &["add", "-A"]);
    commit_at(&dir, "v1", 1_700_000_000);
    let flake = format!("git+file://{}", dir.display());
    let tracking = format!("{WATCH}flake = \"{flake}\"\n");
    let d = start_daemon_args(&h, "", &tracking, &[]);
    until_fleet(&d, "p1 in sync", |f| in_sync(f, "p1")).await;

    // A newer commit: p1 is behind, and only reported.
    h.fleet.update("p1", |s| s.bump()).unwrap();
    commit_at(&dir, "v2", 1_700_000_100);
    let v2 = h.fleet.toplevel("p1").unwrap();
    let behind = until_fleet(&d, "p1 behind", |f| kinds(f, "p1") == ["behind"]).await;
    assert_eq!(host(&behind, "p1")["desired"], v2.as_str());
    assert_eq!(host(&behind, "p1")["running"], v1.as_str());
    assert!(deployments(&d).await.iter().all(|d| d["trigger"] == "cli"));
    // In process: what the daemon stored (it watches: it leads), and
    // (--live) a probe now.
    let (code, stored, _) = h.json(&["status"]);
    assert_eq!(code, 0);
    assert_eq!(stored["fleet"]["watching"], true);
    assert!(stored["fleet"]["watched_by"].is_string(), "{stored:#}");
    assert_eq!(kinds(&stored["fleet"], "p1"), ["behind"]);
    let (code, live, _) = h.json(&["status", "--live"]);
    assert_eq!(code, 0);
    assert_eq!(kinds(&live["fleet"], "p1"), ["behind"], "{live:#}");
    assert_eq!(host(&live["fleet"], "p1")["desired"], v2.as_str());
    assert!(
        host(&live["fleet"], "p1")["last_seen"].as_i64()
            > host(&behind, "p1")["last_seen"].as_i64()
    );
    stop_daemon(d);

    // Pull mode follows the branch: its head is deployed.
    let pulling = format!("{tracking}branch = \"main\"\npoll-interval = \"1s\"\n");
    let d = start_daemon_args(&h, "", &pulling, &[]);
    until("p1 on v2", || {
        h.fleet.current_system("p1").as_deref() == Some(v2.as_str())
    })
    .await;
    let head = git(&dir, &["rev-parse", "HEAD"]);
    let pulled = deployments(&d).await;
    assert_eq!(pulled[0]["trigger"], "pull", "{pulled:#?}");
    assert_eq!(pulled[0]["requested_by"], "watch:main");
    assert!(pulled[0]["flake"].as_str().unwrap().contains(&head));
    until_fleet(&d, "p1 in sync on v2", |f| in_sync(f, "p1")).await;

    // The branch moves again: deployed again.
    h.fleet.update("p1", |s| s.bump()).unwrap();
    commit_at(&dir, "v3", 1_700_000_200);
    let v3 = h.fleet.toplevel("p1").unwrap();
    until("p1 on v3", || {
        h.fleet.current_system("p1").as_deref() == Some(v3.as_str())
    })
    .await;

    // Moved back to an older commit: never deployed over the newer one.
    git(&dir, &["reset", "-q", "--hard", "HEAD~1"]);
    let refused = until_fleet(&d, "the older commit refused", |f| {
        f["branch"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not newer"))
    })
    .await;
    assert_eq!(refused["branch"]["branch"], "main");
    assert_eq!(h.fleet.current_system("p1"), Some(v3.clone()));
    let pulls = deployments(&d)
        .await
        .into_iter()
        .filter(|d| d["trigger"] == "pull")
        .count();
    assert_eq!(pulls, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_alert_rules_pass_promtool_with_metrics_the_daemon_exports() {
    let h = Harness::start(vec![HostSpec::new("x1").service("nginx")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let d = start_daemon_args(&h, "", WATCH, &[]);
    until_fleet(&d, "x1 checked", |f| host(f, "x1")["healthy"] == true).await;
    let metrics = client_metrics(&d).await;
    let exported: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for file in ["nix/alerts.yml", "nix/alerts.test.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut used = 0;
        for (at, _) in text.match_indices("nix_deploy_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used += 1;
            assert!(
                exported.contains(name.as_str()),
                "{file} uses {name}, which the daemon does not export:\n{metrics}"
            );
        }
        assert!(used > 5, "{file} uses nix-deploy's metrics");
    }
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts.test.yml"],
    ] {
        succeeds(
            Command::new("promtool")
                .args(&args)
                .current_dir(root.join("nix")),
        );
    }
    drop(d);

    // Every watch interval, count and timeout is bounded: exit 2, naming it.
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[watch]\ninterval = 0", "watch.interval"),
        ("[watch]\nconcurrency = 100000", "watch.concurrency"),
        ("[watch]\nbranch = \"main\"", "watch.branch"),
        (
            "[notifications]\nemail-to = [\"ops@example.org\"]",
            "[smtp]",
        ),
    ] {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, text).unwrap();
        let out = Command::new(binary())
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(key), "{text}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_host_garbage_and_a_broken_flake_are_reported_and_the_rest_is_watched_on() {
    let h = Harness::start(vec![
        HostSpec::new("r1"),
        HostSpec::new("r2"),
        HostSpec::new("r3"),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    let d = start_daemon_args(
        &h,
        "",
        WATCH,
        &["--connect-timeout", "2", "--command-timeout", "3"],
    );
    until_fleet(&d, "every host in sync", |f| {
        ["r1", "r2", "r3"].iter().all(|n| in_sync(f, n))
    })
    .await;

    // r1 hangs (every process of it stopped); r2 answers garbage.
    h.fleet.freeze_host("r1").unwrap();
    h.fleet
        .ssh("r2", "ln -sfn /tmp /run/current-system")
        .unwrap();
    let broken = until_fleet(&d, "r1 and r2 unreachable", |f| {
        kinds(f, "r1").contains(&"unreachable".to_string())
            && kinds(f, "r2").contains(&"unreachable".to_string())
    })
    .await;
    assert!(
        host(&broken, "r2")["error"]
            .as_str()
            .unwrap()
            .contains("not a store path"),
        "{broken:#}"
    );
    // r3 is watched on meanwhile.
    let seen = host(&broken, "r3")["last_seen"].as_i64().unwrap();
    until_fleet(&d, "r3 seen again", |f| {
        host(f, "r3")["last_seen"].as_i64().unwrap_or(0) > seen && in_sync(f, "r3")
    })
    .await;

    // The flake stops evaluating: nobody is in sync, and the error is said.
    let flake = h.fleet.dir().join("flake/flake.nix");
    let good = std::fs::read_to_string(&flake).unwrap();
    std::fs::write(&flake, format!("{good}\nthis is not nix")).unwrap();
    let unknown = until_fleet(&d, "desired unknown", |f| {
        kinds(f, "r3") == ["desired-unknown"]
    })
    .await;
    assert!(unknown["evaluation_error"].is_string(), "{unknown:#}");
    assert!(host(&unknown, "r3")["desired_error"].is_string());
    assert!(host(&unknown, "r3")["desired"].is_null());
    assert!(
        client_metrics(&d)
            .await
            .contains("nix_deploy_fleet_evaluates 0")
    );

    // Everything mended: back in sync.
    std::fs::write(&flake, good).unwrap();
    h.fleet.thaw_host("r1").unwrap();
    h.fleet
        .ssh(
            "r2",
            "ln -sfn \"$(readlink -f /nix/var/nix/profiles/system)\" /run/current-system",
        )
        .unwrap();
    until_fleet(&d, "every host in sync again", |f| {
        ["r1", "r2", "r3"].iter().all(|n| in_sync(f, n))
    })
    .await;
}
