//! The web dashboard in a real browser: Debian's headless Chromium, driven
//! through chromedriver (WebDriver) by fantoccini, against `nix-deploy
//! serve` on loopback with real test hosts. One browser session walks the
//! main flow: log in, see every host, filter them, plan and deploy from the
//! Plan page, watch the timeline advance without a reload, read a failing
//! host's error (with `<script>` in it, shown as text), roll a host back,
//! read its history, be refused without the CSRF token and with a read-only
//! session, log out. Screenshots of every view go to the directory printed
//! at the start. The same daemon's `/metrics` then serves the check of the
//! Grafana dashboard's queries (`grafana.rs`); cookies and the login limit
//! are checked over plain HTTP in `web_login.rs`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use nix_deploy_testkit::{Chromedriver, HostSpec};
use serde_json::Value;

use crate::helpers::{Harness, binary};

pub(crate) const DEPLOY_TOKEN: &str = "web-deploy-token-0123456789";
pub(crate) const READ_TOKEN: &str = "web-read-token-0123456789";

/// What the failing host's health check prints: markup that would run if
/// the page put it in as HTML.
const XSS: &str = "<script>window.__xss=1</script><img src=x onerror=window.__xss=2>";

pub(crate) struct Daemon {
    child: Child,
    pub(crate) url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon on a loopback port, for the fleet `h` (or none: pages and
/// logins only), with `extra` appended to its config.
pub(crate) fn start_daemon(h: Option<&Harness>, extra: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let deploy = write("deploy.token", DEPLOY_TOKEN);
    let read = write("read.token", READ_TOKEN);
    let config = write(
        "config.toml",
        &format!(
            r#"
listen = "127.0.0.1:0"
confirm-timeout = 5
health-check-timeout = 3

[[tokens]]
name = "ci"
file = "{}"
scope = "deploy"

[[tokens]]
name = "viewer"
file = "{}"
scope = "read"
{extra}
"#,
            deploy.display(),
            read.display()
        ),
    );
    let mut cmd = Command::new(binary());
    match h {
        Some(h) => {
            cmd.arg("--flake")
                .arg(h.fleet.flake_ref())
                .arg("--ssh-config")
                .arg(h.fleet.ssh_config())
                .arg("--state-dir")
                .arg(h.state_dir());
            for (k, v) in h.fleet.env() {
                cmd.env(k, v);
            }
        }
        None => {
            cmd.arg("--state-dir").arg(dir.path().join("state"));
        }
    }
    cmd.args(["--connect-timeout", "5", "serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("daemon.log")).unwrap());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("nix-deploy: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    Daemon {
        child,
        url,
        _dir: dir,
    }
}

/// Headless Chromium through chromedriver (stopped when the first is
/// dropped).
pub(crate) async fn browser() -> (Chromedriver, Client) {
    let driver = Chromedriver::start().expect("starting chromedriver");
    let mut capabilities = driver.capabilities();
    capabilities.insert("pageLoadStrategy".into(), "normal".into());
    let c = ClientBuilder::rustls()
        .unwrap()
        .capabilities(capabilities)
        .connect(&driver.url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connecting to chromedriver: {e}\n{}",
                std::fs::read_to_string(driver.log()).unwrap_or_default()
            )
        });
    eprintln!("screenshots: {}", artifacts().display());
    (driver, c)
}

/// Where the screenshots go (printed, so a person can look).
pub(crate) fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub(crate) async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("taking a screenshot");
    std::fs::write(artifacts().join(format!("{name}.png")), png).unwrap();
}

/// Evaluate `js` (a function body returning a value) until it returns
/// something truthy; that value. Panics after `secs` with the page's text.
pub(crate) async fn until(c: &Client, secs: u64, what: &str, js: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let value = c.execute(js, vec![]).await.unwrap_or(Value::Null);
        let truthy = match &value {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return value;
        }
        if Instant::now() > deadline {
            let text = c
                .find(Locator::Css("body"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            panic!("timed out waiting for {what}; the page says:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn text(c: &Client, css: &str) -> String {
    // A live page replaces elements as events arrive: one found may be gone
    // by the time its text is read, so read a fresh one again.
    let mut attempts = 0;
    loop {
        let found = c
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        match found.text().await {
            Ok(text) => return text,
            Err(e) if is_stale(&e) && attempts < 50 => attempts += 1,
            Err(e) => panic!("reading {css}: {e}"),
        }
    }
}

/// The element was replaced while we held it.
fn is_stale(e: &fantoccini::error::CmdError) -> bool {
    matches!(e, fantoccini::error::CmdError::Standard(w)
        if w.error == fantoccini::error::ErrorStatus::StaleElementReference)
}

pub(crate) async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap();
}

pub(crate) async fn type_into(c: &Client, css: &str, text: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .send_keys(text)
        .await
        .unwrap();
}

pub(crate) async fn path(c: &Client) -> String {
    c.current_url().await.unwrap().path().to_string()
}

/// POST a form from the page (with its cookies), as a forged request
/// would; the response's status.
pub(crate) async fn post_from_page(c: &Client, path: &str, body: &str) -> u16 {
    let js = format!(
        "return fetch({}, {{method: 'POST', credentials: 'same-origin', \
         headers: {{'Content-Type': 'application/x-www-form-urlencoded'}}, body: {}}}) \
         .then(r => r.status)",
        serde_json::to_string(path).unwrap(),
        serde_json::to_string(body).unwrap()
    );
    c.execute(&js, vec![]).await.unwrap().as_u64().unwrap() as u16
}

async fn deployment_count(d: &Daemon) -> usize {
    let list: Value = reqwest::Client::new()
        .get(format!("{}/api/v1/deployments?limit=1000", d.url))
        .bearer_auth(DEPLOY_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["deployments"].as_array().unwrap().len()
}

pub(crate) async fn log_in(c: &Client, d: &Daemon, token: &str) {
    c.goto(&format!("{}/", d.url)).await.unwrap();
    assert_eq!(path(c).await, "/login");
    type_into(c, "#token", token).await;
    click(c, "#login").await;
    until(
        c,
        10,
        "the fleet after logging in",
        "return document.getElementById('fleet') !== null",
    )
    .await;
}

pub(crate) async fn log_out(c: &Client, d: &Daemon) {
    click(c, "#logout").await;
    until(
        c,
        10,
        "the login page",
        "return document.getElementById('token') !== null",
    )
    .await;
    // The session is gone: pages ask to log in again.
    c.goto(&format!("{}/deployments", d.url)).await.unwrap();
    assert_eq!(path(c).await, "/login");
}

/// The deployment page's status once it is final (refreshed by the page's
/// own script, not reloaded).
pub(crate) async fn final_status(c: &Client) -> String {
    until(
        c,
        120,
        "the deployment to finish",
        "const s = document.getElementById('deployment-status'); \
         return s && !['running', 'queued', 'awaiting-approval', 'waiting-for-window']\
         .includes(s.textContent.trim()) && s.textContent.trim()",
    )
    .await
    .as_str()
    .unwrap()
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_deploys_shows_failures_as_text_and_refuses_forged_requests() {
    let mut h = Harness::start(vec![
        HostSpec::new("web-1").tags(&["web"]),
        HostSpec::new("web-2").tags(&["web", "edge"]),
        HostSpec::new("flaky").tags(&["web"]),
    ]);
    let (code, _, stderr) = h.deploy(&["--all"]);
    assert_eq!(code, 0, "{stderr}");
    let web1_before = h.fleet.current_system("web-1").unwrap();
    let web2_generation = h.fleet.generation("web-2");
    // web-1 changes and activates slowly (the page must see it in flight);
    // flaky changes into a system whose health check fails and prints markup
    // (it passes on the old one: the host is healthy before it is touched).
    h.fleet
        .update("web-1", |s| {
            s.bump();
            s.activation_delay_ms = 4000;
        })
        .unwrap();
    let check = format!(
        "{{ command = {}; timeout = 2; period = 0.5; }}",
        nix_deploy_testkit::nix_string(&format!(
            "case \"$(readlink /run/current-system)\" in *-25.05.2) echo '{XSS}'; exit 1;; esac"
        ))
    );
    h.fleet
        .update("flaky", |s| {
            s.bump();
            s.health_checks.push(check);
        })
        .unwrap();

    let d = start_daemon(Some(&h), "");
    let (driver, c) = browser().await;

    // Logging in: a wrong token is refused on the form, the right one works.
    c.goto(&format!("{}/", d.url)).await.unwrap();
    assert_eq!(path(&c).await, "/login");
    screenshot(&c, "login").await;
    type_into(&c, "#token", "wrong").await;
    click(&c, "#login").await;
    let error = until(
        &c,
        10,
        "the login form's error",
        "const e = document.getElementById('login-error'); return e && e.textContent",
    )
    .await;
    assert!(error.as_str().unwrap().contains("not valid"), "{error}");
    type_into(&c, "#token", DEPLOY_TOKEN).await;
    click(&c, "#login").await;
    until(
        &c,
        10,
        "the fleet",
        "return document.getElementById('fleet') !== null",
    )
    .await;
    assert_eq!(text(&c, "#user").await, "ci");

    // The fleet: every host, filtered by tag and by name in the page.
    let visible = "return [...document.querySelectorAll('#fleet tbody tr')]\
                   .filter(r => !r.hidden).map(r => r.dataset.name).join(' ')";
    assert_eq!(
        c.execute(visible, vec![]).await.unwrap(),
        "flaky web-1 web-2"
    );
    screenshot(&c, "fleet").await;
    c.find(Locator::Css("#fleet-tag"))
        .await
        .unwrap()
        .select_by_value("edge")
        .await
        .unwrap();
    assert_eq!(c.execute(visible, vec![]).await.unwrap(), "web-2");
    c.find(Locator::Css("#fleet-tag"))
        .await
        .unwrap()
        .select_by_value("")
        .await
        .unwrap();
    type_into(&c, "#fleet-search", "fla").await;
    assert_eq!(c.execute(visible, vec![]).await.unwrap(), "flaky");

    // Plan first, then deploy.
    c.goto(&format!("{}/plan", d.url)).await.unwrap();
    type_into(&c, "#selector", "web-1 flaky").await;
    type_into(&c, "#max-failures", "1").await;
    click(&c, "#plan").await;
    until(
        &c,
        60,
        "the plan",
        "return document.getElementById('plan-result') !== null",
    )
    .await;
    let headline = text(&c, "#plan-headline").await;
    assert!(
        headline.starts_with("2 of 3 host(s) to deploy"),
        "{headline}"
    );
    assert_eq!(
        text(&c, "#plan-hosts tr[data-host=web-1] .badge").await,
        "DEPLOY"
    );
    screenshot(&c, "plan").await;
    let before = deployment_count(&d).await;
    click(&c, "#deploy").await;
    until(
        &c,
        60,
        "the deployment page",
        "return location.pathname.startsWith('/deployments/')",
    )
    .await;
    let deployment_url = c.current_url().await.unwrap();
    assert_eq!(deployment_count(&d).await, before + 1);

    // The timeline advances while we look, without a reload.
    c.execute("window.__sameDocument = 42", vec![])
        .await
        .unwrap();
    let chips_at_load = c
        .execute(
            "return document.querySelectorAll('#hosts .chip').length",
            vec![],
        )
        .await
        .unwrap()
        .as_u64()
        .unwrap();
    until(
        &c,
        60,
        "a step to appear live",
        &format!(
            "return window.nixDeployLive && window.nixDeployLive.applied > 0 && \
             document.querySelectorAll('#hosts .chip').length > {chips_at_load}"
        ),
    )
    .await;
    screenshot(&c, "deployment-running").await;
    let status = final_status(&c).await;
    assert_eq!(status, "failed", "flaky failed and was rolled back");
    assert_eq!(
        c.execute("return window.__sameDocument", vec![])
            .await
            .unwrap(),
        42
    );
    until(
        &c,
        20,
        "the refreshed page",
        "return document.body.dataset.refreshed === 'true'",
    )
    .await;
    assert_eq!(
        text(&c, "tr.host-row[data-host=web-1] .status").await,
        "deployed"
    );
    assert_eq!(
        text(&c, "tr.host-row[data-host=flaky] .status").await,
        "rolled-back"
    );

    // The failing host's error in full, its markup shown as text and never
    // run: live (script) and as rendered by the server.
    for pass in ["live", "reloaded"] {
        let error = text(&c, "tr.host-detail[data-host=flaky] pre.host-error").await;
        assert!(
            error.contains(XSS),
            "{pass}: the error shows the markup as text: {error}"
        );
        assert_eq!(
            c.execute(
                "return [typeof window.__xss, document.querySelectorAll('img[src=x]').length]",
                vec![]
            )
            .await
            .unwrap(),
            serde_json::json!(["undefined", 0]),
            "{pass}: no injected script ran and no element was made"
        );
        screenshot(&c, &format!("deployment-error-{pass}")).await;
        c.goto(deployment_url.as_str()).await.unwrap();
    }

    // Rollback of the host that was deployed.
    click(&c, "button.rollback[data-host=web-1]").await;
    until(
        &c,
        60,
        "the rollback's page",
        &format!(
            "return location.pathname.startsWith('/deployments/') && location.href !== {}",
            serde_json::to_string(deployment_url.as_str()).unwrap()
        ),
    )
    .await;
    if text(&c, "#deployment-status").await.trim() == "running" {
        assert_eq!(final_status(&c).await, "succeeded");
    }
    assert_eq!(text(&c, "#deployment-status").await, "succeeded");
    assert_eq!(h.fleet.current_system("web-1").unwrap(), web1_before);
    screenshot(&c, "rollback").await;

    // The host's history: the first deployment, this one and the rollback,
    // who asked and how.
    c.goto(&format!("{}/hosts/web-1", d.url)).await.unwrap();
    let history = text(&c, "#history").await;
    assert_eq!(
        c.execute(
            "return document.querySelectorAll('#history tbody tr').length",
            vec![]
        )
        .await
        .unwrap(),
        3,
        "{history}"
    );
    assert!(
        history.contains("token:ci") && history.contains("rollback"),
        "{history}"
    );
    screenshot(&c, "host-history").await;
    c.goto(&format!("{}/deployments", d.url)).await.unwrap();
    assert!(text(&c, "#deployments").await.contains("web"));
    screenshot(&c, "deployments").await;

    // Forged requests: no CSRF token, or a wrong one, are refused and change
    // nothing.
    let count = deployment_count(&d).await;
    assert_eq!(post_from_page(&c, "/deploy", "selector=web-2").await, 403);
    assert_eq!(
        post_from_page(&c, "/deploy", "csrf=0123abcd&selector=web-2").await,
        403
    );
    assert_eq!(post_from_page(&c, "/hosts/web-1/rollback", "").await, 403);
    assert_eq!(post_from_page(&c, "/plan", "selector=web-2").await, 403);
    assert_eq!(deployment_count(&d).await, count);
    log_out(&c, &d).await;

    // A read-only session sees everything and changes nothing, even with
    // its own CSRF token.
    log_in(&c, &d, READ_TOKEN).await;
    assert_eq!(text(&c, "#scope").await, "read");
    c.goto(&format!("{}/plan", d.url)).await.unwrap();
    assert_eq!(
        c.execute("return document.getElementById('plan').disabled", vec![])
            .await
            .unwrap(),
        true
    );
    let csrf = c
        .execute(
            "return document.querySelector('input[name=csrf]').value",
            vec![],
        )
        .await
        .unwrap();
    let csrf = csrf.as_str().unwrap();
    for (path, body) in [
        ("/deploy", format!("csrf={csrf}&selector=web-2")),
        ("/plan", format!("csrf={csrf}&selector=web-2")),
        ("/hosts/web-1/rollback", format!("csrf={csrf}")),
    ] {
        assert_eq!(post_from_page(&c, path, &body).await, 403, "{path}");
    }
    c.goto(deployment_url.as_str()).await.unwrap();
    assert_eq!(
        c.execute(
            "return document.querySelectorAll('button.rollback').length",
            vec![]
        )
        .await
        .unwrap(),
        0
    );
    assert_eq!(deployment_count(&d).await, count);
    assert_eq!(h.fleet.generation("web-2"), web2_generation);
    log_out(&c, &d).await;
    c.close().await.unwrap();
    drop(driver);

    // flaky is fixed and deployed: a recovery, so every metric the Grafana
    // dashboard reads (MTTR included) is exported.
    h.fleet
        .update("flaky", |s| {
            s.bump();
            s.health_checks.clear();
        })
        .unwrap();
    let (code, _, stderr) = h.deploy(&["flaky"]);
    assert_eq!(code, 0, "{stderr}");
    crate::grafana::dashboard_reads_only_exported_metrics(&d.url).await;
}
