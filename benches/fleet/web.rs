//! The web dashboard in headless Chromium (Debian's, through chromedriver):
//! how long the fleet page of 500 hosts takes to load and render, and
//! whether a 100-host deployment's live timeline keeps up with its events.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use nix_deploy_testkit::{Chromedriver, Fleet};
use serde_json::{Value, json};

use super::{Bench, bump_all, median, percentile, provisioned};

const TOKEN: &str = "bench-web-token-0123456789";

/// The daemon on a loopback port for `fleet` and `state`; its child and URL.
fn daemon(
    bench: &Bench,
    fleet: &Fleet,
    state: &Path,
    dir: &Path,
) -> anyhow::Result<(Child, String)> {
    std::fs::write(dir.join("token"), TOKEN)?;
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\nparallel-limit = 16\n[[tokens]]\nname = \"bench\"\nfile = \"{}\"\nscope = \"deploy\"\n",
            dir.join("token").display()
        ),
    )?;
    let mut child = Command::new(&bench.binary)
        .arg("--flake")
        .arg(fleet.flake_ref())
        .arg("--ssh-config")
        .arg(fleet.ssh_config())
        .arg("--state-dir")
        .arg(state)
        .args(["serve", "--config"])
        .arg(dir.join("config.toml"))
        .envs(fleet.env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut first = String::new();
    let stdout = child.stdout.as_mut().expect("piped");
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte)? == 1 && byte[0] != b'\n' {
        first.push(byte[0] as char);
    }
    let url = first
        .trim()
        .strip_prefix("nix-deploy: listening on ")
        .context("the daemon's address")?
        .to_string();
    Ok((child, url))
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

async fn browser(driver: &Chromedriver, url: &str) -> anyhow::Result<Client> {
    let client = ClientBuilder::rustls()?
        .capabilities(driver.capabilities())
        .connect(&driver.url())
        .await?;
    client.goto(&format!("{url}/login")).await?;
    client
        .find(Locator::Css("#token"))
        .await?
        .send_keys(TOKEN)
        .await?;
    client.find(Locator::Css("#login")).await?.click().await?;
    client.wait().for_element(Locator::Css("#fleet")).await?;
    Ok(client)
}

/// Multiply the hosts the history knows (their last state and their latest
/// evaluation) until there are `n`, as a fleet of that size would leave them.
async fn multiply_hosts(state: &Path, n: usize) -> anyhow::Result<usize> {
    let store = nix_deploy::store::Store::open(state).await?;
    let pool = store.pool();
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM hosts ORDER BY name")
        .fetch_all(pool)
        .await?;
    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info('hosts')")
        .fetch_all(pool)
        .await?;
    // Every column but the name, as the table has them (from SQLite itself).
    let others = columns
        .iter()
        .filter(|c| *c != "name")
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let copies = n.div_ceil(names.len().max(1));
    for copy in 1..copies {
        let suffix = format!("-{copy:03}");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO hosts (name, {others}) SELECT name || $1, {others} FROM hosts
             WHERE name IN (SELECT value FROM json_each($2))"
        )))
        .bind(&suffix)
        .bind(serde_json::to_string(&names)?)
        .execute(pool)
        .await?;
        sqlx::query(
            "INSERT INTO eval_cache (key, flake, host, value, created_at, used_at)
             SELECT key || $1, flake, host || $1, value, created_at, used_at FROM eval_cache
             WHERE host IN (SELECT value FROM json_each($2))",
        )
        .bind(&suffix)
        .bind(serde_json::to_string(&names)?)
        .execute(pool)
        .await?;
    }
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM hosts")
        .fetch_one(pool)
        .await?;
    store.close().await;
    Ok(total as usize)
}

/// The fleet page with 500 hosts: navigation to the load event, and the
/// whole `goto` as WebDriver sees it; then a search over every row.
pub fn fleet_page(bench: &mut Bench) -> anyhow::Result<()> {
    let (fleet, state) = provisioned(bench, 4)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let hosts = runtime.block_on(multiply_hosts(state.path(), 500))?;
    let dir = tempfile::tempdir()?;
    let (child, url) = daemon(bench, &fleet, state.path(), dir.path())?;
    let driver = Chromedriver::start()?;
    let result = runtime.block_on(async {
        let client = browser(&driver, &url).await?;
        let (mut loads, mut gotos, mut searches) = (Vec::new(), Vec::new(), Vec::new());
        let (mut responses, mut bytes) = (Vec::new(), 0.0);
        for _ in 0..bench.repeats.max(3) + 2 {
            let started = Instant::now();
            client.goto(&format!("{url}/")).await?;
            let rows = client
                .execute("return document.querySelectorAll('#fleet tbody tr').length", vec![])
                .await?;
            gotos.push(started.elapsed().as_secs_f64());
            if rows.as_u64() != Some(hosts as u64) {
                bail!("the fleet page shows {rows} rows, not {hosts}");
            }
            let timing = client
                .execute(
                    "const t = performance.getEntriesByType('navigation')[0]; \
                     return [t.responseEnd, t.domContentLoadedEventEnd, t.loadEventEnd, t.transferSize];",
                    vec![],
                )
                .await?;
            responses.push(timing[0].as_f64().unwrap_or(f64::NAN) / 1000.0);
            loads.push(timing[2].as_f64().unwrap_or(f64::NAN) / 1000.0);
            bytes = timing[3].as_f64().unwrap_or(f64::NAN);
            let search = client
                .execute(
                    "const s = document.getElementById('fleet-search'); const t0 = performance.now(); \
                     s.value = 'h001'; s.dispatchEvent(new Event('input')); \
                     const shown = [...document.querySelectorAll('#fleet tbody tr')].filter(r => !r.hidden).length; \
                     return [performance.now() - t0, shown];",
                    vec![],
                )
                .await?;
            searches.push(search[0].as_f64().unwrap_or(f64::NAN) / 1000.0);
        }
        client.close().await?;
        anyhow::Ok((loads, gotos, searches, responses, bytes))
    });
    stop(child);
    drop(driver);
    let (loads, gotos, searches, responses, bytes) = result?;
    bench.record(
        "web_fleet_page",
        json!({
            "hosts": hosts,
            "response_end_median_s": median(responses),
            "page_bytes": bytes,
            "load_event_median_s": median(loads.clone()),
            "load_event_max_s": loads.iter().copied().fold(0.0, f64::max),
            "goto_median_s": median(gotos),
            "search_median_s": median(searches),
            "samples": loads.len(),
            "target": "load < 1 s",
        }),
    );
    Ok(())
}

/// A 100-host deployment watched on its page: how late each event reaches
/// the page (event time to applied), and whether every one arrived.
pub fn live_timeline(bench: &mut Bench) -> anyhow::Result<()> {
    let n = if bench.quick { 30 } else { 100 };
    let (mut fleet, state) = provisioned(bench, n)?;
    bump_all(&mut fleet)?;
    let dir = tempfile::tempdir()?;
    let (child, url) = daemon(bench, &fleet, state.path(), dir.path())?;
    let driver = Chromedriver::start()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async {
        let client = browser(&driver, &url).await?;
        let http = reqwest::Client::new();
        let accepted: Value = http
            .post(format!("{url}/api/v1/deployments"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await?
            .json()
            .await?;
        let id = accepted["id"].as_i64().context("the deployment's id")?;
        let started = Instant::now();
        client.goto(&format!("{url}/deployments/{id}")).await?;
        let after: i64 = client
            .execute("return document.body.dataset.liveEvents || ''", vec![])
            .await?
            .as_str()
            .and_then(|s| s.rsplit_once("after=").map(|(_, a)| a.to_string()))
            .and_then(|a| a.parse().ok())
            .context("the page follows the deployment's events")?;
        loop {
            let status = client
                .find(Locator::Css("#deployment-status"))
                .await?
                .text()
                .await?;
            if status != "running" && status != "queued" {
                if status != "succeeded" {
                    bail!("the deployment ended {status}");
                }
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the deployment did not end within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let live = client
            .execute("return window.nixDeployLive", vec![])
            .await?;
        // Every event of the deployment after what the page was drawn with.
        let stream = http
            .get(format!("{url}/api/v1/deployments/{id}/events"))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .text()
            .await?;
        let expected = stream
            .lines()
            .filter_map(|l| l.strip_prefix("id:"))
            .filter_map(|id| id.trim().parse::<i64>().ok())
            .filter(|&event| event > after)
            .count();
        client.close().await?;
        anyhow::Ok((live, expected, started.elapsed().as_secs_f64()))
    });
    stop(child);
    drop(driver);
    let (live, expected, wall) = result?;
    let lags: Vec<f64> = live["lagMs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    bench.record(
        "web_live_timeline",
        json!({
            "hosts": n,
            "wall_s": wall,
            "events_expected": expected,
            "events_applied": live["applied"],
            "events_missed": expected as i64 - live["applied"].as_i64().unwrap_or(0),
            "lag_p50_ms": percentile(lags.clone(), 0.5),
            "lag_p99_ms": percentile(lags.clone(), 0.99),
            "lag_max_ms": lags.iter().copied().fold(0.0, f64::max),
            "target": "every event applied; lag p99 well under a second",
        }),
    );
    Ok(())
}
