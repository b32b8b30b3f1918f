//! Operating the fleet with other people, for real: maintenance windows
//! shaped around the test's own clock, approval gates through the API and
//! chat (self-approval refused, a timeout cancels), a paused canary
//! promoted, tokens limited to hosts, a bare chat command, and the audit
//! trail's verification after a row was edited.

use std::time::{Duration, Instant};

use nix_deploy_testkit::HostSpec;
use serde_json::{Value, json};

use crate::daemon::{
    ADMIN_TOKEN, DEPLOY_TOKEN, READ_TOKEN, call, client, slack_signature, start_daemon_with,
    wait_finished,
};
use crate::helpers::{Harness, status};

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A cron pattern (with seconds) that fires once, at `at` (Unix seconds, UTC).
fn cron_at(at: u64) -> String {
    let (s, m, h) = (at % 60, (at / 60) % 60, (at / 3600) % 24);
    format!("{s} {m} {h} * * *")
}

/// The latest deployment, or null while there is none.
fn latest(h: &Harness) -> Value {
    let out = h.run(&["--json", "show"]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn write_config(h: &Harness, name: &str, text: &str) -> String {
    let path = h.state_dir().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn a_deny_window_holds_a_deployment_until_it_opens_and_an_override_is_recorded() {
    let h = Harness::start(vec![HostSpec::new("w1"), HostSpec::new("w2")]);
    // A deny window that opened a second ago and closes 6 s from now.
    let opened = now_secs() - 1;
    let config = write_config(
        &h,
        "held.toml",
        &format!(
            "[[window]]\nname = \"freeze\"\nkind = \"deny\"\nschedule = \"{}\"\nduration = \"7s\"\nhosts = [\"w1\"]\n",
            cron_at(opened)
        ),
    );
    let env = [("NIX_DEPLOY_CONFIG", config.as_str())];
    // --no-wait: refused at once, nothing recorded or touched.
    let out = h.run_with_env(&["deploy", "w1", "--no-wait"], &env);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("freeze"));
    assert_eq!(h.fleet.generation("w1"), None);
    let (_, history, _) = h.json(&["history"]);
    assert_eq!(history["deployments"], json!([]));

    // Without it: recorded, waiting for the window, then deployed.
    let mut cmd_env: Vec<(String, String)> = h.fleet.env();
    cmd_env.push(("NIX_DEPLOY_CONFIG".into(), config.clone()));
    let child = {
        let mut cmd = std::process::Command::new(crate::helpers::binary());
        cmd.args(["--json", "--flake", &h.fleet.flake_ref(), "--ssh-config"])
            .arg(h.fleet.ssh_config())
            .arg("--state-dir")
            .arg(h.state_dir())
            .args(["deploy", "w1"])
            .envs(cmd_env)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(h.state_dir().join("held.out")).unwrap())
            .stderr(std::fs::File::create(h.state_dir().join("held.err")).unwrap());
        cmd.spawn().unwrap()
    };
    h.until(60, "the deployment to wait for its window", || {
        latest(&h)["status"] == "waiting-for-window"
    });
    assert_eq!(
        h.fleet.generation("w1"),
        None,
        "nothing deployed in the window"
    );
    let (code, report, stderr) = h.wait("held", child);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status(&report, "w1"), "deployed");
    let activated = h.fleet.activations("w1")[0].start;
    assert!(
        activated >= (opened + 7) as f64,
        "activated at {activated}, before the window closed at {}",
        opened + 7
    );
    let (_, shown, _) = h.json(&["show"]);
    let kinds: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"waiting-for-window"), "{kinds:?}");

    // A window that never closes, overridden with a reason: deployed at
    // once, and recorded.
    let always = write_config(
        &h,
        "always.toml",
        "[[window]]\nkind = \"deny\"\nschedule = \"* * * * *\"\nduration = \"2m\"\n",
    );
    let env = [("NIX_DEPLOY_CONFIG", always.as_str())];
    let out = h.run_with_env(&["--json", "deploy", "w2", "--override-window"], &env);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--override-window needs --reason"
    );
    let out = h.run_with_env(
        &[
            "--json",
            "deploy",
            "w2",
            "--override-window",
            "--reason",
            "hotfix INC-42",
        ],
        &env,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(h.fleet.generation("w2"), Some(1));
    let out = h.run(&["--json", "audit"]);
    let audit = String::from_utf8_lossy(&out.stdout);
    assert!(
        audit.contains("deploy-override-window") && audit.contains("hotfix INC-42"),
        "{audit}"
    );
    // A bad window in the file: exit 2 naming the key and the value.
    let bad = write_config(
        &h,
        "bad.toml",
        "[[window]]\nkind = \"deny\"\nschedule = \"* * * * *\"\nduration = \"2m\"\ntimezone = \"Mars/Base\"\n",
    );
    let out = h.run_with_env(&["deploy", "w2"], &[("NIX_DEPLOY_CONFIG", bad.as_str())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("window[0].timezone = `Mars/Base`"));
}

#[test]
fn a_paused_canary_continues_when_promoted() {
    let h = Harness::start(vec![HostSpec::new("c1"), HostSpec::new("c2")]);
    let child = h.spawn(
        "paused",
        &[
            "deploy",
            "--strategy",
            "canary",
            "--canary",
            "c1",
            "--canary-soak",
            "1s",
            "--pause-after-canary",
        ],
    );
    let mut id = 0;
    h.until(60, "the pause after the canary", || {
        let shown = latest(&h);
        id = shown["id"].as_i64().unwrap_or(0);
        shown["status"] == "awaiting-approval"
    });
    assert_eq!(h.fleet.generation("c1"), Some(1), "the canary went first");
    assert_eq!(h.fleet.generation("c2"), None, "the rest waits");
    let (code, gate, stderr) =
        h.json(&["approve", &id.to_string(), "--comment", "canary looks fine"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(gate["state"], "approved");
    let (code, report, stderr) = h.wait("paused", child);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status(&report, "c2"), "deployed");
    assert_eq!(report["gates"][0]["kind"], "pause");
    assert_eq!(
        report["gates"][0]["approvals"][0]["comment"],
        "canary looks fine"
    );
    // Nothing waits any more: approving again is refused, nothing changes.
    let out = h.run(&["approve", &id.to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not awaiting approval"));
}

const STAGING_TOKEN: &str = "staging-token-0123456789";

async fn post(d: &crate::daemon::Daemon, path: &str, token: &str, body: Value) -> (u16, Value) {
    call(
        reqwest::Method::POST,
        &format!("{}{path}", d.url),
        Some(token),
        Some(body),
    )
    .await
}

async fn until_status(d: &crate::daemon::Daemon, id: i64, wanted: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, shown) = call(
            reqwest::Method::GET,
            &format!("{}/api/v1/deployments/{id}", d.url),
            Some(READ_TOKEN),
            None,
        )
        .await;
        if shown["status"] == wanted {
            return shown;
        }
        assert!(
            Instant::now() < deadline,
            "#{id} never became {wanted}: {shown:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn approvals_tokens_limited_to_hosts_chat_and_the_audit_trail() {
    let h = Harness::start(vec![
        HostSpec::new("s1").tags(&["staging"]),
        HostSpec::new("p1").tags(&["prod"]),
        HostSpec::new("p2").tags(&["slow"]),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin.token");
    std::fs::write(&admin, ADMIN_TOKEN).unwrap();
    let staging = dir.path().join("staging.token");
    std::fs::write(&staging, STAGING_TOKEN).unwrap();
    let d = start_daemon_with(
        &h,
        "",
        &format!(
            r#"
[[tokens]]
name = "ops"
file = "{}"
scope = "admin"

[[tokens]]
name = "staging"
file = "{}"
scope = "deploy"
hosts = ["@staging"]

[[approval]]
name = "production"
hosts = ["@prod"]
approvers = ["token:ops", "token:ci", "slack:U1"]
timeout = "10m"

[[approval]]
name = "slow"
hosts = ["@slow"]
approvers = ["token:ops"]
timeout = "2s"
"#,
            admin.display(),
            staging.display()
        ),
    );
    // A staging-only token: 403 on a production host, nothing recorded.
    let (code, body) = post(
        &d,
        "/api/v1/deployments",
        STAGING_TOKEN,
        json!({ "hosts": ["p1"] }),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("p1"),
        "{body}"
    );
    let (code, body) = post(&d, "/api/v1/deployments", STAGING_TOKEN, json!({})).await;
    assert_eq!(code, 403, "everything includes production: {body}");
    assert_eq!(h.fleet.generation("p1"), None);
    // Overriding windows needs admin.
    let (code, _) = post(
        &d,
        "/api/v1/deployments",
        DEPLOY_TOKEN,
        json!({ "hosts": ["s1"], "override_window": "because" }),
    )
    .await;
    assert_eq!(code, 403);

    // The deploy token (token:ci) deploys staging and production: staging
    // goes, production waits for approval.
    let (code, created) = post(
        &d,
        "/api/v1/deployments",
        DEPLOY_TOKEN,
        json!({ "hosts": ["s1", "p1"] }),
    )
    .await;
    assert_eq!(code, 202, "{created}");
    let id = created["id"].as_i64().unwrap();
    let waiting = until_status(&d, id, "awaiting-approval").await;
    assert_eq!(h.fleet.generation("s1"), Some(1));
    assert_eq!(h.fleet.generation("p1"), None);
    assert_eq!(waiting["gates"][0]["hosts"], json!(["p1"]));
    assert_eq!(waiting["gates"][0]["state"], "open");
    let approve = format!("/api/v1/deployments/{id}/approve");
    // Self-approval refused; a read token may not; the staging token does
    // not reach p1. Nothing changes.
    let (code, body) = post(&d, &approve, DEPLOY_TOKEN, json!({})).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("may not approve")
    );
    let (code, _) = post(&d, &approve, READ_TOKEN, json!({})).await;
    assert_eq!(code, 403);
    let (code, _) = post(&d, &approve, STAGING_TOKEN, json!({})).await;
    assert_eq!(code, 403);
    assert_eq!(
        until_status(&d, id, "awaiting-approval").await["gates"][0]["approvals"],
        json!([])
    );
    // A signed Slack command from an approver (slack:U1, in the allowlist).
    let now = now_secs() as i64;
    let slash = |text: &str, user: &str| {
        format!(
            "command=%2Fnix-deploy&text={}&user_id={user}&user_name=someone&channel_id=C1",
            form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>()
        )
    };
    let send = |body: String| {
        let url = format!("{}/hooks/slack", d.url);
        async move {
            client()
                .post(url)
                .header("x-slack-request-timestamp", now.to_string())
                .header("x-slack-signature", slack_signature(now, &body))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    // A bare command is help, and deploys nothing; an unlisted user may do nothing.
    let help = send(slash("", "U1")).await;
    assert!(help["text"].as_str().unwrap().contains("approve"), "{help}");
    let refused = send(slash(&format!("approve {id}"), "U9")).await;
    assert!(
        refused["text"].as_str().unwrap().contains("may not use"),
        "{refused}"
    );
    let approved = send(slash(&format!("approve {id} --comment lgtm"), "U1")).await;
    assert!(
        approved["text"].as_str().unwrap().contains("approved"),
        "{approved}"
    );
    let done = wait_finished(&d, id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(h.fleet.generation("p1"), Some(1));
    let approval = &done["gates"][0]["approvals"][0];
    assert_eq!(approval["by"], "slack:U1");
    assert!(
        approval["seen"].as_str().unwrap().contains("p1"),
        "what they saw: {approval}"
    );
    // Approving it again, or once it ended: 409, nothing changes.
    let (code, body) = post(&d, &approve, ADMIN_TOKEN, json!({})).await;
    assert_eq!(code, 409, "{body}");
    let (_, list) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/deployments", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        list["deployments"].as_array().unwrap().len(),
        1,
        "the bare command deployed nothing"
    );

    // No approval within the timeout: cancelled, saying why.
    let (code, created) = post(
        &d,
        "/api/v1/deployments",
        DEPLOY_TOKEN,
        json!({ "hosts": ["p2"] }),
    )
    .await;
    assert_eq!(code, 202, "{created}");
    let timed_out = wait_finished(&d, created["id"].as_i64().unwrap()).await;
    assert_eq!(timed_out["status"], "cancelled", "{timed_out:#}");
    assert!(
        timed_out["error"].as_str().unwrap().contains("timed out"),
        "{timed_out:#}"
    );
    assert_eq!(timed_out["gates"][0]["state"], "expired");
    assert_eq!(h.fleet.generation("p2"), None);

    // The windows document for the dashboard.
    let (code, windows) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/windows", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(windows["windows"], json!([]));

    // The audit trail: everything above, intact; then a row is edited.
    let audit = |args: &[&str]| {
        let out = h.run(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, trail) =
        tokio::task::block_in_place(|| audit(&["--json", "audit", "--since", "1h"]));
    assert_eq!(code, Some(0));
    for needle in [
        "\"approve\"",
        "approve-refused",
        "auth-failed",
        "\"deploy\"",
        "deploy-refused",
        "slack:U1",
    ] {
        assert!(trail.contains(needle), "{needle} missing from {trail}");
    }
    let (code, verified) = tokio::task::block_in_place(|| audit(&["audit", "--verify"]));
    assert_eq!(code, Some(0), "{verified}");
    {
        let store = nix_deploy::store::Store::open(h.state_dir()).await.unwrap();
        sqlx::query("UPDATE audit_log SET actor = 'token:mallory' WHERE id = 3")
            .execute(store.pool())
            .await
            .unwrap();
        store.close().await;
    }
    let (code, verified) = tokio::task::block_in_place(|| audit(&["audit", "--verify"]));
    assert_eq!(code, Some(1), "{verified}");
    assert!(verified.contains("entry 3"), "{verified}");
}
