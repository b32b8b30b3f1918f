//! The dashboard's operations pages in a real browser, against a daemon
//! that watches its two test hosts every second and holds production
//! behind an approval rule: a held deployment appears on the Approvals page
//! with its gate; its requester's Approve is refused (self-approval), as
//! are forged posts without the CSRF token and a read-only session's, and
//! nothing changes; a second person's Approve lets it run to success; a
//! second deployment is Rejected and ends without touching its host; the
//! configured window is listed with its next opening. Then a host switched
//! by hand shows its `manual-switch` drift badge on the fleet page, and the
//! drift filter finds it. Screenshots go with `web.rs`'s.

use fantoccini::{Client, Locator};
use nix_deploy_testkit::HostSpec;
use serde_json::{Value, json};

use crate::helpers::Harness;
use crate::watch::{WATCH, kinds, tracked_clone};
use crate::web::{
    DEPLOY_TOKEN, Daemon, READ_TOKEN, browser, click, final_status, log_in, log_out,
    post_from_page, screenshot, start_daemon, text, type_into, until,
};

const OPS_TOKEN: &str = "web-ops-token-0123456789";

async fn api(d: &Daemon, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", d.url))
        .bearer_auth(DEPLOY_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let value: Value = response.json().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {value}");
    value
}

async fn deployment(d: &Daemon, id: i64) -> Value {
    api(
        d,
        reqwest::Method::GET,
        &format!("/api/v1/deployments/{id}"),
        None,
    )
    .await
}

/// Poll the API (a deadline, not a timing) until `condition` holds.
async fn poll(d: &Daemon, path: &str, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let value = api(d, reqwest::Method::GET, path, None).await;
        if condition(&value) {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {value:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A deployment of p1 requested by `ci`, once it waits at its gate.
async fn held_deployment(d: &Daemon) -> i64 {
    let created = api(
        d,
        reqwest::Method::POST,
        "/api/v1/deployments",
        Some(json!({ "hosts": ["p1"] })),
    )
    .await;
    let id = created["id"].as_i64().unwrap();
    poll(d, &format!("/api/v1/deployments/{id}"), "the gate", |v| {
        v["status"] == "awaiting-approval"
    })
    .await;
    id
}

async fn count(c: &Client, css: &str) -> u64 {
    c.execute(
        &format!(
            "return document.querySelectorAll({}).length",
            serde_json::to_string(css).unwrap()
        ),
        vec![],
    )
    .await
    .unwrap()
    .as_u64()
    .unwrap()
}

/// Click the gate's `button` (approve, reject); the deployment's final
/// status, on its page (where the button leads).
async fn decide(c: &Client, gate: &str, button: &str, id: i64) -> String {
    click(c, &format!("{gate} button.{button}")).await;
    until(
        c,
        10,
        "the deployment's page",
        &format!("return location.pathname === '/deployments/{id}'"),
    )
    .await;
    final_status(c).await
}

#[tokio::test(flavor = "multi_thread")]
async fn approvals_are_decided_in_the_browser_and_the_fleet_shows_drift() {
    let mut h = Harness::start(vec![
        HostSpec::new("p1").tags(&["prod"]),
        HostSpec::new("m1").service("nginx"),
    ]);
    let (code, _, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{stderr}");
    h.fleet.update("p1", |s| s.bump()).unwrap();
    // The watch follows the flake as it is now (p1's new system wanted).
    let (_tracked, flake) = tracked_clone(&h);
    let ops = h.state_dir().join("ops.token");
    std::fs::write(&ops, OPS_TOKEN).unwrap();
    let d = start_daemon(
        Some(&h),
        &format!(
            r#"{WATCH}flake = "{flake}"

[[tokens]]
name = "ops"
file = "{}"
scope = "deploy"

[[approval]]
name = "production"
hosts = ["@prod"]
approvers = ["token:ops", "token:ci"]
timeout = "10m"

[[window]]
name = "night-<b>freeze</b>"
kind = "deny"
schedule = "0 0 3 * * *"
duration = "1h"
hosts = ["@frozen"]
"#,
            ops.display()
        ),
    );
    let (driver, c) = browser().await;
    let p1_generation = h.fleet.generation("p1");

    // Held: on the page with its gate, hosts and who must approve.
    let id = held_deployment(&d).await;
    log_in(&c, &d, DEPLOY_TOKEN).await;
    c.goto(&format!("{}/approvals", d.url)).await.unwrap();
    let gate = format!("section.gate[data-id='{id}']");
    assert_eq!(text(&c, &format!("{gate} .gate-hosts")).await, "p1");
    let missing = text(&c, &format!("{gate} .missing")).await;
    assert!(missing.contains("token:ops"), "{missing}");
    assert!(
        text(&c, &format!("{gate} .gate-summary"))
            .await
            .contains("p1")
    );
    // The window, its name as text, with its next opening.
    let window = text(&c, "#windows tbody tr").await;
    assert!(window.contains("night-<b>freeze</b>"), "{window}");
    assert_ne!(text(&c, "#windows tbody tr td.next").await, "-");
    screenshot(&c, "approvals").await;

    // Its requester may not approve it: refused with the API's reason.
    click(&c, &format!("{gate} button.approve")).await;
    until(
        &c,
        10,
        "the refusal",
        "return document.body.textContent.includes('may not approve')",
    )
    .await;
    screenshot(&c, "approvals-self-refused").await;
    c.goto(&format!("{}/approvals", d.url)).await.unwrap();
    // Forged posts (no CSRF token, a wrong one) are refused too.
    for (path, body) in [
        (format!("/deployments/{id}/approve"), String::new()),
        (format!("/deployments/{id}/approve"), "csrf=0123abcd".into()),
        (format!("/deployments/{id}/reject"), "reason=forged".into()),
    ] {
        assert_eq!(post_from_page(&c, &path, &body).await, 403, "{path} {body}");
    }
    log_out(&c, &d).await;
    // A read-only session sees the gate without buttons, and its own CSRF
    // token does not make it an approver.
    log_in(&c, &d, READ_TOKEN).await;
    c.goto(&format!("{}/approvals", d.url)).await.unwrap();
    assert_eq!(count(&c, &format!("{gate} button")).await, 0);
    let csrf = c
        .execute(
            "return document.querySelector('input[name=csrf]').value",
            vec![],
        )
        .await
        .unwrap();
    let csrf = csrf.as_str().unwrap().to_string();
    for action in ["approve", "reject"] {
        let path = format!("/deployments/{id}/{action}");
        let body = format!("csrf={csrf}&reason=nope");
        assert_eq!(post_from_page(&c, &path, &body).await, 403, "{action}");
    }
    log_out(&c, &d).await;
    let still = deployment(&d, id).await;
    assert_eq!(still["status"], "awaiting-approval");
    assert_eq!(still["gates"][0]["approvals"], json!([]));
    assert_eq!(h.fleet.generation("p1"), p1_generation);

    // Another approver's yes lets it run to success.
    log_in(&c, &d, OPS_TOKEN).await;
    c.goto(&format!("{}/approvals", d.url)).await.unwrap();
    type_into(
        &c,
        &format!("{gate} input[name=comment]"),
        "looks <i>fine</i>",
    )
    .await;
    assert_eq!(decide(&c, &gate, "approve", id).await, "succeeded");
    let done = deployment(&d, id).await;
    let approval = &done["gates"][0]["approvals"][0];
    assert_eq!(approval["by"], "token:ops");
    assert_eq!(approval["via"], "web");
    assert_eq!(approval["comment"], "looks <i>fine</i>");
    assert_ne!(h.fleet.generation("p1"), p1_generation);
    let p1_system = h.fleet.current_system("p1");
    let p1_generation = h.fleet.generation("p1");

    // A second one, rejected: it ends without touching p1.
    h.fleet.update("p1", |s| s.bump()).unwrap();
    let id = held_deployment(&d).await;
    c.goto(&format!("{}/approvals", d.url)).await.unwrap();
    let gate = format!("section.gate[data-id='{id}']");
    type_into(&c, &format!("{gate} input[name=reason]"), "not today").await;
    let ended = decide(&c, &gate, "reject", id).await;
    let rejected = deployment(&d, id).await;
    assert_ne!(ended, "succeeded", "{rejected:#}");
    assert_eq!(rejected["gates"][0]["state"], "rejected");
    assert_eq!(rejected["gates"][0]["reason"], "not today");
    assert_eq!(h.fleet.generation("p1"), p1_generation);
    assert_eq!(h.fleet.current_system("p1"), p1_system);
    c.goto(&format!("{}/approvals", d.url)).await.unwrap();
    assert_eq!(count(&c, "section.gate").await, 0);

    // m1 switched by hand: the watch reports it, the fleet page shows it.
    h.fleet.update("m1", |s| s.bump()).unwrap();
    h.fleet.provision("m1").unwrap();
    poll(&d, "/api/v1/fleet", "m1's manual switch, healthy", |f| {
        kinds(f, "m1").contains(&"manual-switch".to_string())
            && crate::watch::host(f, "m1")["healthy"] == true
    })
    .await;
    c.goto(&format!("{}/", d.url)).await.unwrap();
    let drift = text(&c, "#fleet tr[data-name=m1] td.drift").await;
    assert!(drift.contains("manual-switch"), "{drift}");
    assert_eq!(
        text(&c, "#fleet tr[data-name=p1] td.drift").await,
        "in-sync"
    );
    assert_eq!(
        text(&c, "#fleet tr[data-name=m1] td.health").await,
        "healthy"
    );
    assert!(text(&c, "#fleet-watch").await.starts_with("Watched"));
    c.find(Locator::Css("#fleet-drift"))
        .await
        .unwrap()
        .select_by_value("manual-switch")
        .await
        .unwrap();
    let visible = "return [...document.querySelectorAll('#fleet tbody tr')]\
                   .filter(r => !r.hidden).map(r => r.dataset.name).join(' ')";
    assert_eq!(c.execute(visible, vec![]).await.unwrap(), "m1");
    c.find(Locator::Css("#fleet-drift"))
        .await
        .unwrap()
        .select_by_value("")
        .await
        .unwrap();
    screenshot(&c, "fleet-drift").await;
    c.close().await.unwrap();
    drop(driver);
}
