//! Several coordinators on one PostgreSQL (a throwaway server from the
//! testkit): how long after its owner's death a deployment is taken over;
//! API latency on a follower daemon while another runs a many-host
//! deployment; the same deployment on SQLite and on PostgreSQL side by side.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix_deploy_testkit::{Fleet, HostSpec, Postgres};
use serde_json::{Value, json};

use super::{Bench, bump_all, http_get, percentile, provisioned};

pub const TOKEN: &str = "bench-token-0123456789";

/// A daemon serving `fleet` from `state`, with `extra` config lines; killed
/// when dropped.
pub struct Daemon {
    pub child: Child,
    pub address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    pub fn start(
        bench: &Bench,
        fleet: &Fleet,
        state: &Path,
        extra: &str,
    ) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("token"), TOKEN)?;
        std::fs::write(
            dir.path().join("config.toml"),
            format!(
                "listen = \"127.0.0.1:0\"\nparallel-limit = 16\n{extra}\n[[tokens]]\nname = \"bench\"\nfile = \"{}\"\nscope = \"deploy\"\n",
                dir.path().join("token").display()
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
            .arg(dir.path().join("config.toml"))
            .envs(fleet.env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut first = String::new();
        {
            let stdout = child.stdout.as_mut().expect("piped");
            let mut byte = [0u8; 1];
            while stdout.read(&mut byte)? == 1 && byte[0] != b'\n' {
                first.push(byte[0] as char);
            }
        }
        let address = first
            .trim()
            .strip_prefix("nix-deploy: listening on http://")
            .context("daemon address")?
            .to_string();
        Ok(Daemon {
            child,
            address,
            _dir: dir,
        })
    }

    /// `GET path` as JSON.
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let mut s = std::net::TcpStream::connect(&self.address)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n",
            self.address
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok(serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// Start a deployment with `body`; its id.
    pub fn deploy(&self, body: &str) -> anyhow::Result<i64> {
        let mut stream = std::net::TcpStream::connect(&self.address)?;
        write!(
            stream,
            "POST /api/v1/deployments HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.address,
            body.len()
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        response
            .rsplit_once("\"id\":")
            .and_then(|(_, rest)| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|d| d.parse().ok())
            })
            .with_context(|| format!("deployment id in {response}"))
    }
}

/// A database URL on `server`, in the daemon's config (the watch off:
/// the deployments are measured alone).
fn on(server: &Postgres, ttl: &str) -> anyhow::Result<String> {
    let name = server.create_database()?;
    Ok(format!(
        "database = \"{}\"\n[cluster]\nheartbeat = \"1s\"\nlease-ttl = \"{ttl}\"\n[watch]\nenabled = false\n",
        server.url(&name)
    ))
}

/// Deploy `body` through `owner`, sampling `follower`'s status API until it
/// ends; the wall time and the latencies (ms).
fn deploy_sampling(
    owner: &Daemon,
    follower: &Daemon,
    body: &str,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let started = Instant::now();
    let id = owner.deploy(body)?;
    let mut latencies = Vec::new();
    loop {
        let t = Instant::now();
        let code = http_get(&follower.address, "/api/v1/status", TOKEN)?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        if code != 200 {
            bail!("status API answered {code}");
        }
        let deployment = follower.get(&format!("/api/v1/deployments/{id}"))?;
        if !deployment["finished_at"].is_null() {
            if deployment["status"] != "succeeded" {
                bail!("the deployment did not succeed: {deployment}");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((started.elapsed().as_secs_f64(), latencies))
}

/// The same many-host deployment on SQLite (one daemon) and on PostgreSQL
/// (an owner, and a follower whose API is sampled meanwhile).
pub fn backends(bench: &mut Bench) -> anyhow::Result<()> {
    let n = if bench.quick { 30 } else { 100 };
    let (mut fleet, state) = provisioned(bench, n)?;
    let body = "{}";
    bump_all(&mut fleet)?;
    let sqlite = Daemon::start(bench, &fleet, state.path(), "[watch]\nenabled = false")?;
    let (sqlite_wall, sqlite_latencies) = deploy_sampling(&sqlite, &sqlite, body)?;
    drop(sqlite);
    bump_all(&mut fleet)?;
    let server = Postgres::start()?;
    let config = on(&server, "15s")?;
    let (a_state, b_state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let owner = Daemon::start(bench, &fleet, a_state.path(), &config)?;
    let follower = Daemon::start(bench, &fleet, b_state.path(), &config)?;
    let (pg_wall, pg_latencies) = deploy_sampling(&owner, &follower, body)?;
    bench.record(
        "backends",
        json!({
            "hosts": n, "strategy": "smart", "parallel_limit": 16,
            "sqlite_wall_s": sqlite_wall,
            "postgresql_wall_s": pg_wall,
            "postgresql_over_sqlite": pg_wall / sqlite_wall,
            "sqlite_status_api_p50_ms": percentile(sqlite_latencies.clone(), 0.5),
            "sqlite_status_api_p99_ms": percentile(sqlite_latencies, 0.99),
            "follower_status_api_p50_ms": percentile(pg_latencies.clone(), 0.5),
            "follower_status_api_p99_ms": percentile(pg_latencies.clone(), 0.99),
            "follower_samples": pg_latencies.len(),
        }),
    );
    Ok(())
}

/// From the owner's death (SIGKILL while a host activates) to the other
/// daemon's takeover (its claim) and to the resumed deployment running
/// again, with a lease TTL of 3 s and a heartbeat of 1 s.
pub fn failover(bench: &mut Bench) -> anyhow::Result<()> {
    let names = ["f1", "f2"];
    let mut claims = Vec::new();
    let mut resumes = Vec::new();
    for _ in 0..bench.repeats {
        let mut fleet = Fleet::start(names.iter().map(|n| HostSpec::new(n)).collect())?;
        let state = tempfile::tempdir()?;
        bench.nix_deploy(&fleet, state.path(), &["deploy"])?;
        for name in names {
            fleet.update(name, |s| {
                s.bump();
                s.activation_delay_ms = 2000;
            })?;
        }
        let before: Vec<_> = names.iter().map(|n| fleet.current_system(n)).collect();
        let server = Postgres::start()?;
        let config = on(&server, "3s")?;
        let (a_state, b_state) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let mut owner = Daemon::start(bench, &fleet, a_state.path(), &config)?;
        let follower = Daemon::start(bench, &fleet, b_state.path(), &config)?;
        let id = owner.deploy("{\"parallel_limit\": 1}")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !names.iter().zip(&before).any(|(n, old)| {
            fleet
                .activations(n)
                .iter()
                .any(|a| Some(&a.path) != old.as_ref() && a.end.is_none())
        }) {
            if Instant::now() > deadline {
                bail!("no host started activating");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        owner.child.kill()?;
        let died = Instant::now();
        owner.child.wait()?;
        let (mut claimed, mut resumed) = (None, None);
        while resumed.is_none() {
            let deployment = follower.get(&format!("/api/v1/deployments/{id}"))?;
            let status = deployment["status"].as_str().unwrap_or("");
            if claimed.is_none() && status == "interrupted" {
                claimed = Some(died.elapsed().as_secs_f64());
            }
            if claimed.is_some() && status == "running" {
                resumed = Some(died.elapsed().as_secs_f64());
            }
            if !deployment["finished_at"].is_null() || Instant::now() > deadline {
                bail!("the deployment was not taken over and resumed: {deployment}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        claims.extend(claimed);
        resumes.extend(resumed);
    }
    bench.record(
        "failover",
        json!({
            "lease_ttl_s": 3, "heartbeat_s": 1,
            "death_to_takeover_s": percentile(claims.clone(), 0.5),
            "death_to_resumed_s": percentile(resumes.clone(), 0.5),
            "runs": claims.len(),
            "bound": "TTL + one heartbeat to the takeover; the resume adds an evaluation and settling the host whose activation was cut",
        }),
    );
    Ok(())
}
