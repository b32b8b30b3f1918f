//! `exec` through the daemon: the admin scope, a run followed like a
//! deployment, and a running exec stopped on its hosts when the daemon
//! stops.

use std::process::Command;

use nix_deploy_testkit::HostSpec;
use serde_json::{Value, json};

use crate::daemon::*;
use crate::helpers::{Harness, binary};

#[tokio::test(flavor = "multi_thread")]
async fn exec_through_the_api_needs_admin_and_is_followed_like_a_deployment() {
    let mut h = Harness::start(vec![
        HostSpec::new("x1").tags(&["edge-eu"]),
        HostSpec::new("x2").tags(&["edge-us"]),
        HostSpec::new("x3"),
    ]);
    h.fleet.stop_host("x2").unwrap();
    let admin = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(admin.path(), ADMIN_TOKEN).unwrap();
    let d = start_daemon(
        &h,
        &format!(
            "\n[[tokens]]\nname = \"ops\"\nfile = \"{}\"\nscope = \"admin\"\n",
            admin.path().display()
        ),
    );
    let url = format!("{}/api/v1/exec", d.url);
    let body = json!({ "on": ["@edge-*"], "command": ["sh", "-c", "echo hi from $(cat /run/testkit-host)"] });
    // A deploy token may deploy, not run commands.
    let (status, answer) = call(
        reqwest::Method::POST,
        &url,
        Some(DEPLOY_TOKEN),
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    // Bad input: 400 naming it, nothing recorded.
    for (bad, needle) in [
        (
            json!({ "on": ["api-*"], "command": ["true"] }),
            "`api-*` matches no host",
        ),
        (json!({ "command": [] }), "needs a command"),
        (json!({ "command": ["true"], "cmd": 1 }), "unknown field"),
    ] {
        let (status, answer) =
            call(reqwest::Method::POST, &url, Some(ADMIN_TOKEN), Some(bad)).await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains(needle),
            "{answer}"
        );
    }
    let (status, accepted) = call(reqwest::Method::POST, &url, Some(ADMIN_TOKEN), Some(body)).await;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["id"].as_i64().unwrap();
    let kinds = follow(&d, id).await;
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("deployment-finished")
    );
    let run = wait_finished(&d, id).await;
    assert_eq!(run["kind"], "exec");
    assert_eq!(run["requested_by"], "token:ops");
    assert_eq!(run["status"], "failed");
    let hosts = run["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[0]["name"], "x1");
    assert_eq!(hosts[0]["status"], "succeeded");
    assert_eq!(hosts[1]["status"], "unreachable");
    // What a command printed is for those who may run commands: a read or
    // deploy token sees each host's result and exit code, never the output,
    // in no document and no stream.
    let get = |path: String, token: &'static str| {
        let url = format!("{}{path}", d.url);
        async move { get_text(&url, Some(token)).await }
    };
    for token in [READ_TOKEN, DEPLOY_TOKEN] {
        let shown: Value =
            serde_json::from_str(&get(format!("/api/v1/deployments/{id}"), token).await).unwrap();
        assert_eq!(shown["hosts"][0]["output"]["exit_code"], 0, "{shown:#}");
        assert_eq!(shown["hosts"][0]["output"]["withheld"], true, "{shown:#}");
        for path in [
            format!("/api/v1/deployments/{id}"),
            "/api/v1/deployments".to_string(),
            format!("/api/v1/deployments/{id}/report"),
            format!("/api/v1/deployments/{id}/events"),
        ] {
            let text = get(path.clone(), token).await;
            assert!(!text.is_empty(), "{path}");
            assert!(
                !text.contains("hi from x1"),
                "{path} shows exec output: {text}"
            );
        }
    }
    let report = get(format!("/api/v1/deployments/{id}/report"), READ_TOKEN).await;
    assert!(
        report.contains(&format!("# exec #{id}: failed")),
        "{report}"
    );
    assert!(report.contains("| x1 | succeeded | 0 |"), "{report}");
    // The admin who may run it sees it all.
    let shown: Value =
        serde_json::from_str(&get(format!("/api/v1/deployments/{id}"), ADMIN_TOKEN).await).unwrap();
    assert_eq!(
        shown["hosts"][0]["output"]["stdout"], "hi from x1",
        "{shown:#}"
    );
    assert!(shown["hosts"][0]["output"].get("withheld").is_none());
    let report = get(format!("/api/v1/deployments/{id}/report"), ADMIN_TOKEN).await;
    assert!(report.contains("hi from x1"), "{report}");

    // An oversized body is nobody's business without a token (401), and
    // with one it is refused in the API's JSON shape (413), like every
    // other endpoint's.
    let huge = format!("{{\"command\": [\"{}\"]}}", "a".repeat(2 * 1024 * 1024));
    for endpoint in ["/api/v1/exec", "/api/v1/upload-keys"] {
        for (token, status, code) in [
            (None, 401, "unauthorized"),
            (Some(ADMIN_TOKEN), 413, "too_large"),
        ] {
            let mut request = client()
                .post(format!("{}{endpoint}", d.url))
                .header("content-type", "application/json")
                .body(huge.clone());
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), status, "{endpoint}");
            let text = response.text().await.unwrap();
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{endpoint}: not a JSON error: {text}"));
            assert_eq!(body["error"]["code"], code, "{endpoint}: {body}");
        }
    }

    // The CLI's exec goes through the same endpoint.
    let out = tokio::task::block_in_place(|| {
        Command::new(binary())
            .args(["--json", "--server", &d.url, "--token-file"])
            .arg(admin.path())
            .args(["exec", "x3", "--", "echo", "$HOME"])
            .output()
            .unwrap()
    });
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["hosts"][0]["output"]["stdout"], "$HOME");
}

#[test]
fn sigterm_stops_a_running_exec_on_its_hosts_and_records_it() {
    let h = Harness::start(vec![HostSpec::new("s1")]);
    let admin = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(admin.path(), ADMIN_TOKEN).unwrap();
    let mut d = start_daemon(
        &h,
        &format!(
            "\n[[tokens]]\nname = \"ops\"\nfile = \"{}\"\nscope = \"admin\"\n",
            admin.path().display()
        ),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (status, accepted) = runtime.block_on(call(
        reqwest::Method::POST,
        &format!("{}/api/v1/exec", d.url),
        Some(ADMIN_TOKEN),
        Some(json!({ "hosts": ["s1"], "command": ["sleep", "27182"] })),
    ));
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["id"].as_i64().unwrap();
    let sleep = ["sleep", "27182"];
    h.until(30, "the command running on s1", || {
        h.running("s1", &sleep) == 1
    });
    // The daemon stops the command on its host, records it, and exits.
    d.terminate();
    h.until(60, "the daemon to exit", || {
        d.child.try_wait().unwrap().is_some()
    });
    assert!(d.child.wait().unwrap().success());
    h.until(30, "the command to be gone from s1", || {
        h.running("s1", &sleep) == 0
    });
    let (_, shown, _) = h.json(&["show", &id.to_string()]);
    assert_eq!(shown["status"], "cancelled", "{shown:#}");
    assert_eq!(shown["hosts"][0]["status"], "cancelled", "{shown:#}");
}
