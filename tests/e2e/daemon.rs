//! The daemon for real: `nix-deploy serve` on a loopback port, real HTTP,
//! real test hosts. Auth, deployments and their event streams, busy hosts,
//! the CLI as a client, Slack and GitHub hooks, notifications, metrics and a
//! graceful shutdown in the middle of a deployment.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use nix_deploy_testkit::HostSpec;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::helpers::{Harness, binary};

pub(crate) const DEPLOY_TOKEN: &str = "deploy-token-0123456789";
pub(crate) const READ_TOKEN: &str = "read-token-0123456789";
pub(crate) const SLACK_SECRET: &str = "slack-signing-secret";
pub(crate) const GITHUB_SECRET: &str = "github-webhook-secret";

/// A request's headers: lower-cased names, values.
pub(crate) type Head = Vec<(String, String)>;

/// A tiny HTTP receiver on loopback that records request bodies (and their
/// headers in `heads`, in the same order).
pub(crate) struct Receiver {
    pub url: String,
    pub bodies: Arc<Mutex<Vec<String>>>,
    pub heads: Arc<Mutex<Vec<Head>>>,
}

pub(crate) fn receiver() -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let seen_heads = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if let Some((name, value)) = line.split_once(':') {
                    head.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            seen_heads.lock().unwrap().push(head);
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    Receiver { url, bodies, heads }
}

pub(crate) struct Daemon {
    pub child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    pub(crate) fn token_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// SIGTERM, as systemd stops the service.
    pub(crate) fn terminate(&self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// What the daemon logged so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

pub(crate) fn start_daemon(h: &Harness, extra_config: &str) -> Daemon {
    start_daemon_with(h, "", extra_config)
}

/// A daemon with `top` keys before the config's tables and `extra_config`
/// after them (in the `[github]` table unless it opens another). Chat
/// deployments of up to 10 hosts need no confirmation (see
/// [`start_daemon_confirming`]).
pub(crate) fn start_daemon_with(h: &Harness, top: &str, extra_config: &str) -> Daemon {
    start_daemon_in(h, h.state_dir(), top, extra_config)
}

/// [`start_daemon_with`] on another state directory (another machine's).
pub(crate) fn start_daemon_in(h: &Harness, state: &Path, top: &str, extra_config: &str) -> Daemon {
    spawn_daemon(h, state, top, extra_config, &[], 10)
}

/// [`start_daemon_with`], with more arguments for `nix-deploy` (before
/// `serve`).
pub(crate) fn start_daemon_args(
    h: &Harness,
    top: &str,
    extra_config: &str,
    args: &[&str],
) -> Daemon {
    spawn_daemon(h, h.state_dir(), top, extra_config, args, 10)
}

/// [`start_daemon_in`], where a chat deployment touching more than
/// `confirm_above` hosts is confirmed first.
pub(crate) fn start_daemon_confirming(
    h: &Harness,
    state: &Path,
    top: &str,
    extra_config: &str,
    confirm_above: usize,
) -> Daemon {
    spawn_daemon(h, state, top, extra_config, &[], confirm_above)
}

/// A daemon on state directory `state`, with `args` before `serve`, where a
/// chat deployment touching more than `confirm_above` hosts is confirmed
/// first.
pub(crate) fn spawn_daemon(
    h: &Harness,
    state: &Path,
    top: &str,
    extra_config: &str,
    args: &[&str],
    confirm_above: usize,
) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let deploy = write("deploy.token", &format!("{DEPLOY_TOKEN}\n"));
    let read = write("read.token", READ_TOKEN);
    let slack = write("slack.secret", SLACK_SECRET);
    let github = write("github.secret", GITHUB_SECRET);
    let config = write(
        "config.toml",
        &format!(
            r#"
listen = "127.0.0.1:0"
confirm-timeout = 5
{top}

[[tokens]]
name = "ci"
file = "{}"
scope = "deploy"

[[tokens]]
name = "viewer"
file = "{}"
scope = "read"

[slack]
signing-secret-file = "{}"
response-url-prefixes = ["http://127.0.0.1:"]

[chat]
confirm-above = {confirm_above}

[[chat.users]]
id = "U1"
scope = "deploy"

[github]
secret-file = "{}"
branch = "main"
{extra_config}
"#,
            deploy.display(),
            read.display(),
            slack.display(),
            github.display()
        ),
    );
    let mut cmd = Command::new(binary());
    cmd.arg("--flake")
        .arg(h.fleet.flake_ref())
        .arg("--ssh-config")
        .arg(h.fleet.ssh_config())
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("daemon.log")).unwrap());
    for (k, v) in h.fleet.env() {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("nix-deploy: listening on ")
        .unwrap_or_else(|| {
            let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
            panic!("unexpected first line: {line:?}\ndaemon log:\n{log}")
        })
        .to_string();
    Daemon { child, url, dir }
}

/// Stop a daemon as systemd does (SIGTERM); it must exit cleanly.
pub(crate) fn stop_daemon(mut d: Daemon) {
    d.terminate();
    let status = d.child.wait().unwrap();
    assert!(status.success(), "the daemon exits cleanly: {status:?}");
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

pub(crate) async fn call(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = client().request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// `GET` an API path of `d` with the read token; the document (the answer
/// must be 200).
pub(crate) async fn read(d: &Daemon, path: &str) -> Value {
    let (status, document) = call(
        reqwest::Method::GET,
        &format!("{}{path}", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "GET {path}: {document}");
    document
}

/// Follow a deployment's event stream to the end; returns the event kinds.
pub(crate) async fn follow(d: &Daemon, id: i64) -> Vec<String> {
    follow_events(d, id)
        .await
        .iter()
        .map(|e| e.kind.name().to_string())
        .collect()
}

/// Follow a deployment's event stream to the end; returns the events.
pub(crate) async fn follow_events(d: &Daemon, id: i64) -> Vec<nix_deploy_core::events::Event> {
    let client =
        nix_deploy::cli::client::Client::new(&d.url, Some(&d.token_file("read.token"))).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::time::timeout(Duration::from_secs(180), client.follow(id, tx))
        .await
        .expect("the stream ends when the deployment does")
        .unwrap();
    let mut events = Vec::new();
    while let Ok(event) = rx.try_recv() {
        events.push(event);
    }
    events
}

/// Wait until deployment `id` ended for good (not only `interrupted` on
/// its way to another daemon's takeover); returns it as `d` reports it.
pub(crate) async fn wait_finished(d: &Daemon, id: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, deployment) = call(
            reqwest::Method::GET,
            &format!("{}/api/v1/deployments/{id}", d.url),
            Some(READ_TOKEN),
            None,
        )
        .await;
        if !deployment["finished_at"].is_null() {
            return deployment;
        }
        assert!(
            Instant::now() < deadline,
            "deployment #{id} did not finish: {deployment:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_errors_and_bad_input_change_nothing() {
    let h = Harness::start(vec![HostSpec::new("a1")]);
    let d = start_daemon(&h, "");
    let url = |p: &str| format!("{}{p}", d.url);
    let (status, body) = call(reqwest::Method::GET, &url("/api/v1/status"), None, None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) = call(
        reqwest::Method::GET,
        &url("/api/v1/status"),
        Some("wrong"),
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = call(
        reqwest::Method::POST,
        &url("/api/v1/deployments"),
        Some(READ_TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = call(
        reqwest::Method::POST,
        &url("/api/v1/deployments"),
        Some(DEPLOY_TOKEN),
        Some(json!({ "hosts": ["nope"] })),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown host")
    );
    let (status, _) = call(
        reqwest::Method::POST,
        &url("/api/v1/deployments"),
        Some(DEPLOY_TOKEN),
        Some(json!({ "strategy": "yolo" })),
    )
    .await;
    assert_eq!(status, 400);
    let raw = client()
        .post(url("/api/v1/deployments"))
        .bearer_auth(DEPLOY_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    let (status, _) = call(
        reqwest::Method::GET,
        &url("/api/v1/deployments/999"),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404);
    // Oversized bodies are refused before they are read.
    let huge = client()
        .post(url("/api/v1/deployments"))
        .bearer_auth(DEPLOY_TOKEN)
        .header("content-type", "application/json")
        .body(format!(
            "{{\"hosts\": [\"{}\"]}}",
            "a".repeat(2 * 1024 * 1024)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status().as_u16(), 413);
    let huge: Value = huge.json().await.expect("a JSON error, not plain text");
    assert_eq!(huge["error"]["code"], "too_large");
    // A malformed id is nobody's business without a token; with one, 400 JSON.
    let (status, _) = call(
        reqwest::Method::GET,
        &url("/api/v1/deployments/x"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = call(
        reqwest::Method::GET,
        &url("/api/v1/deployments/x"),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    // A read token cannot make the daemon evaluate, build, probe or run
    // anything on hosts.
    for (method, path) in [
        (reqwest::Method::POST, "/api/v1/plan"),
        (reqwest::Method::GET, "/api/v1/status?live=true"),
        (reqwest::Method::POST, "/api/v1/hosts/a1/health"),
    ] {
        let (status, body) = call(method, &url(path), Some(READ_TOKEN), None).await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    let (status, _) = call(reqwest::Method::GET, &url("/healthz"), None, None).await;
    assert_eq!(status, 200);
    assert_eq!(h.fleet.generation("a1"), None, "nothing was deployed");
    let (_, list) = call(
        reqwest::Method::GET,
        &url("/api/v1/deployments"),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(list["deployments"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_through_the_api_streams_its_events_and_is_reported() {
    let notify = receiver();
    let h = Harness::start(vec![HostSpec::new("w1"), HostSpec::new("w2")]);
    let d = start_daemon(
        &h,
        &format!("\n[notifications]\njson-webhooks = [\"{}\"]\n", notify.url),
    );
    let (status, created) = call(
        reqwest::Method::POST,
        &format!("{}/api/v1/deployments", d.url),
        Some(DEPLOY_TOKEN),
        Some(json!({ "strategy": "rolling" })),
    )
    .await;
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_i64().unwrap();
    let kinds = follow(&d, id).await;
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("deployment-started")
    );
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("deployment-finished")
    );
    assert!(kinds.iter().any(|k| k == "step-finished"));
    let deployment = wait_finished(&d, id).await;
    assert_eq!(deployment["status"], "succeeded", "{deployment:#}");
    assert_eq!(deployment["requested_by"], "token:ci");
    assert_eq!(deployment["trigger"], "api");
    assert_eq!(h.fleet.generation("w1"), Some(1));
    assert_eq!(h.fleet.generation("w2"), Some(1));

    // Replaying a finished deployment's stream gives the same events.
    assert_eq!(follow(&d, id).await, kinds);
    let report = client()
        .get(format!("{}/api/v1/deployments/{id}/report", d.url))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        report.contains("Deployment Summary") && report.contains("w1"),
        "{report}"
    );
    let metrics = client()
        .get(format!("{}/metrics", d.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("nix_deploy_deployments_total{status=\"succeeded\"} 1"),
        "{metrics}"
    );
    // Every sample line parses as `name{labels} value`.
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        assert!(name.starts_with("nix_deploy_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    assert!(
        metrics.contains("nix_deploy_host_runs_total{status=\"deployed\"} 2"),
        "{metrics}"
    );
    // Status reflects what the hosts really run.
    let (_, status) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/status?live=true", d.url),
        Some(DEPLOY_TOKEN),
        None,
    )
    .await;
    for host in status["hosts"].as_array().unwrap() {
        let name = host["name"].as_str().unwrap();
        assert_eq!(
            host["current_path"].as_str(),
            h.fleet.current_system(name).as_deref()
        );
        assert_eq!(
            host["generation"].as_u64(),
            h.fleet.generation(name).map(u64::from)
        );
    }
    assert_eq!(status["live"]["to_deploy"], json!([]), "{status:#}");
    // Notifications reached the receiver (without holding the deployment up).
    let deadline = Instant::now() + Duration::from_secs(10);
    while notify.bodies.lock().unwrap().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bodies = notify.bodies.lock().unwrap().join("\n");
    assert!(
        bodies.contains("deployment.started") && bodies.contains("deployment.finished"),
        "{bodies}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_host_gets_409_and_cancel_and_resume_work_through_the_api() {
    let mut h = Harness::start(vec![
        HostSpec::new("s1"),
        HostSpec::new("s2"),
        HostSpec::new("s3"),
    ]);
    let d = start_daemon(&h, "");
    let (status, created) = call(
        reqwest::Method::POST,
        &format!("{}/api/v1/deployments", d.url),
        Some(DEPLOY_TOKEN),
        Some(json!({ "parallel": true, "parallel_limit": 8 })),
    )
    .await;
    assert_eq!(status, 202);
    wait_finished(&d, created["id"].as_i64().unwrap()).await;
    for name in ["s1", "s2", "s3"] {
        h.fleet
            .update(name, |s| {
                s.bump();
                s.activation_delay_ms = 1500;
            })
            .unwrap();
    }
    let (status, created) = call(
        reqwest::Method::POST,
        &format!("{}/api/v1/deployments", d.url),
        Some(DEPLOY_TOKEN),
        Some(json!({ "parallel": true, "parallel_limit": 1 })),
    )
    .await;
    assert_eq!(status, 202);
    let id = created["id"].as_i64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.fleet.activations("s1").len() < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, busy) = call(
        reqwest::Method::POST,
        &format!("{}/api/v1/deployments", d.url),
        Some(DEPLOY_TOKEN),
        Some(json!({ "hosts": ["s2"] })),
    )
    .await;
    assert_eq!(status, 409, "{busy}");
    assert!(
        busy["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("deployment #{id}"))
    );
    let (status, _) = call(
        reqwest::Method::POST,
        &format!("{}/api/v1/deployments/{id}/cancel", d.url),
        Some(DEPLOY_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let deployment = wait_finished(&d, id).await;
    assert_eq!(deployment["status"], "cancelled", "{deployment:#}");
    for name in ["s1", "s2", "s3"] {
        assert!(h.consistent(name), "{name} is between generations");
    }
    let (status, _) = call(
        reqwest::Method::POST,
        &format!("{}/api/v1/deployments/{id}/resume", d.url),
        Some(DEPLOY_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 202);
    let deployment = wait_finished(&d, id).await;
    assert_eq!(deployment["status"], "succeeded", "{deployment:#}");
    for name in ["s1", "s2", "s3"] {
        assert_eq!(h.fleet.generation(name), Some(2));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_works_through_the_daemon() {
    let mut h = Harness::start(vec![HostSpec::new("c1"), HostSpec::new("c2")]);
    let d = start_daemon(&h, "");
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(binary());
        cmd.args(["--json", "--server", &d.url, "--token-file"])
            .arg(d.token_file("deploy.token"))
            .args(args);
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, plan, stderr) = tokio::task::block_in_place(|| cli(&["plan", "--no-build"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(plan["to_deploy"], json!(["c1", "c2"]));
    let (code, report, stderr) = tokio::task::block_in_place(|| cli(&["deploy"]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["status"], "succeeded");
    assert!(
        stderr.contains("c1: activating"),
        "progress from the stream: {stderr}"
    );
    // The same document as an in-process run.
    h.fleet.update("c2", |s| s.bump()).unwrap();
    let (_, local, _) = tokio::task::block_in_place(|| h.deploy(&["c2"]));
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&report), keys(&local));
    assert_eq!(keys(&report["hosts"][0]), keys(&local["hosts"][0]));
    assert_eq!(local["status"], "succeeded", "{local:#}");
    h.fleet.update("c1", |s| s.fail_switch = true).unwrap();
    h.fleet.update("c1", |s| s.bump()).unwrap();
    let (code, report, _) = tokio::task::block_in_place(|| cli(&["deploy"]));
    assert_eq!(code, 1);
    let c1 = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "c1")
        .unwrap();
    assert_eq!(c1["status"], "rolled-back");
    let (code, _, stderr) = tokio::task::block_in_place(|| cli(&["deploy", "ghost"]));
    assert_eq!(code, 2, "{stderr}");
    let (code, status, _) = tokio::task::block_in_place(|| cli(&["status"]));
    assert_eq!(code, 0);
    assert_eq!(status["hosts"].as_array().unwrap().len(), 2);
    let (code, history, _) = tokio::task::block_in_place(|| cli(&["history"]));
    assert_eq!(code, 0);
    assert_eq!(
        history["deployments"].as_array().unwrap().len(),
        3,
        "{history:#}"
    );
    // Without a token: refused, exit 2.
    let out = Command::new(binary())
        .args(["--server", &d.url, "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

pub(crate) fn slack_signature(timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SLACK_SECRET.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:{body}").as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

#[test]
fn sigterm_during_a_deployment_cancels_it_safely_and_records_it() {
    let mut h = Harness::start(vec![
        HostSpec::new("t1"),
        HostSpec::new("t2"),
        HostSpec::new("t3"),
    ]);
    assert_eq!(h.deploy(&["--parallel-limit", "8"]).0, 0);
    for name in ["t1", "t2", "t3"] {
        h.fleet
            .update(name, |s| {
                s.bump();
                s.activation_delay_ms = 1500;
            })
            .unwrap();
    }
    let d = start_daemon(&h, "");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (status, created) = runtime.block_on(call(
        reqwest::Method::POST,
        &format!("{}/api/v1/deployments", d.url),
        Some(DEPLOY_TOKEN),
        Some(json!({ "parallel": true, "parallel_limit": 1 })),
    ));
    assert_eq!(status, 202);
    let id = created["id"].as_i64().unwrap();
    h.until(30, "the first activation", || {
        h.fleet.activations("t1").len() >= 2
    });
    stop_daemon(d);
    let (_, shown, _) = h.json(&["show", &id.to_string()]);
    assert_eq!(shown["status"], "cancelled", "{shown:#}");
    for name in ["t1", "t2", "t3"] {
        assert!(h.consistent(name), "{name} is between generations");
    }
    assert_eq!(
        h.fleet.generation("t1"),
        Some(2),
        "the host in the middle finished"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_connections_are_dropped_and_the_daemon_keeps_answering() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start(vec![HostSpec::new("sc")]);
    let d = start_daemon_with(&h, "header-timeout = \"2s\"\nmax-connections = 200", "");
    let address = d.url.trim_start_matches("http://").to_string();
    // Sixty clients that never finish a request: half send nothing, half
    // the start of a request head (slowloris).
    let mut held = Vec::new();
    for i in 0..60 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        if i % 2 == 0 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        held.push(stream);
    }
    // Meanwhile the daemon answers others.
    let (status, _) = call(
        reqwest::Method::GET,
        &format!("{}/healthz", d.url),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    // Each held connection is closed by the daemon after the header timeout
    // (the 10 s only keeps a broken daemon from hanging the test).
    for mut stream in held {
        let mut buf = [0u8; 512];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert_eq!(closed, Ok(true), "a connection was held");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_a_busy_host_is_answered_at_once_and_runs_when_it_is_free() {
    let mut h = Harness::start(vec![HostSpec::new("q1")]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("q1", |s| {
            s.bump();
            s.activation_delay_ms = 4000;
        })
        .unwrap();
    let d = start_daemon(&h, "");
    // A CLI deployment holds the host.
    let mut first = h.spawn("first", &["deploy"]);
    h.until(30, "the first deployment to activate", || {
        h.fleet.activations("q1").len() >= 2
    });
    let (status, created) = call(
        reqwest::Method::POST,
        &format!("{}/api/v1/deployments", d.url),
        Some(DEPLOY_TOKEN),
        Some(json!({ "wait": true, "force": true })),
    )
    .await;
    // Answered while the host is still busy: the first deployment has not
    // ended.
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first deployment ended before the answer"
    );
    assert_eq!(status, 202, "{created}");
    assert_eq!(created["status"], "queued");
    let id = created["id"].as_i64().unwrap();
    let (_, shown) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/deployments/{id}", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(shown["status"], "queued", "{shown:#}");
    let (code, _, stderr) = h.wait("first", first);
    assert_eq!(code, 0, "{stderr}");
    let deployment = wait_finished(&d, id).await;
    assert_eq!(deployment["status"], "succeeded", "{deployment:#}");
    assert!(h.consistent("q1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_stored_event_is_streamed_once_in_order() {
    let names: Vec<String> = (1..=8).map(|i| format!("e{i}")).collect();
    let h = Harness::start(names.iter().map(|n| HostSpec::new(n)).collect());
    let d = start_daemon(&h, "");
    let (status, created) = call(
        reqwest::Method::POST,
        &format!("{}/api/v1/deployments", d.url),
        Some(DEPLOY_TOKEN),
        Some(json!({ "parallel": true, "parallel_limit": 8 })),
    )
    .await;
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_i64().unwrap();
    let client =
        nix_deploy::cli::client::Client::new(&d.url, Some(&d.token_file("read.token"))).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::time::timeout(Duration::from_secs(120), client.follow(id, tx))
        .await
        .unwrap()
        .unwrap();
    let mut streamed = Vec::new();
    while let Ok(event) = rx.try_recv() {
        streamed.push(event.id);
    }
    let stored: Vec<i64> = {
        let store = nix_deploy::store::Store::open(h.state_dir()).await.unwrap();
        let events = store.events(id, 0).await.unwrap();
        store.close().await;
        events.iter().map(|e| e.id).collect()
    };
    assert_eq!(streamed, stored);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_cli_coordinator_ends_its_stream_and_leaves_nothing_running() {
    let mut h = Harness::start(vec![HostSpec::new("k1")]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("k1", |s| {
            s.bump();
            s.activation_delay_ms = 30_000;
        })
        .unwrap();
    let d = start_daemon(&h, "");
    let mut cli = h.spawn("cli", &["deploy"]);
    h.until(30, "the CLI's activation", || {
        h.fleet.activations("k1").len() >= 2
    });
    let (_, status) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/status", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    let id = status["running_deployments"][0].as_i64().expect("running");
    let client =
        nix_deploy::cli::client::Client::new(&d.url, Some(&d.token_file("read.token"))).unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let follow = tokio::spawn(async move { client.follow(id, tx).await });
    cli.kill().unwrap(); // SIGKILL
    cli.wait().unwrap();
    // The stream ends, and nothing is reported running any more.
    tokio::time::timeout(Duration::from_secs(20), follow)
        .await
        .expect("the stream ended")
        .unwrap()
        .unwrap();
    let (_, status) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/status", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(status["running_deployments"], json!([]), "{status:#}");
    let metrics = client_metrics(&d).await;
    assert!(
        metrics.contains("nix_deploy_running_deployments 0"),
        "{metrics}"
    );
    let (_, shown) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/deployments/{id}", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(shown["status"], "interrupted", "{shown:#}");
}

pub(crate) async fn client_metrics(d: &Daemon) -> String {
    get_text(&format!("{}/metrics", d.url), None).await
}

/// The body of `GET url`, with `token` if given.
pub(crate) async fn get_text(url: &str, token: Option<&str>) -> String {
    let mut request = client().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().text().await.unwrap()
}

pub(crate) const ADMIN_TOKEN: &str = "admin-token-0123456789";
