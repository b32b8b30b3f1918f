//! `just bench`: nix-deploy against the physical limit and against plain
//! scripts, on real test hosts (see BENCHMARKS.md). Every figure is a median
//! over repeated runs, and every ratio is measured side by side in the same
//! run, because these machines are noisy.
//!
//! `NIX_DEPLOY_BENCH_QUICK=1` runs each scenario once with smaller fleets;
//! `--scenario NAME` runs one scenario; `NIX_DEPLOY_BENCH_BIN=PATH` measures
//! another build of nix-deploy (to compare two commits in one session). Results: stdout and
//! `target/bench/results.json`.

// The test fleet and the programs that drive the real binary spawn processes
// themselves; the product does it only in `nix_deploy::process`.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix_deploy_testkit::{Fleet, HostSpec, NixosFlake, NixosShape};
use serde_json::{Value, json};

/// A realistic closure pushed, substituted and built on target.
#[path = "fleet/closure.rs"]
mod closure;
// The dashboard in a browser (a file of its own; not a bench target).
#[path = "fleet/cluster.rs"]
mod cluster;
#[path = "fleet/eight.rs"]
mod eight;
/// The watch scenario (beside this file: a bench is one crate root).
#[path = "fleet/watch.rs"]
mod watch;
#[path = "fleet/web.rs"]
mod web;

struct Bench {
    binary: PathBuf,
    repeats: usize,
    quick: bool,
    results: BTreeMap<String, Value>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[index.min(values.len() - 1)]
}

/// What one run of the coordinator cost.
struct Run {
    wall: f64,
    peak_rss_kib: u64,
    cpu_seconds: f64,
    stdout: String,
}

fn proc_stat(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((hwm, ticks / 100.0))
}

impl Bench {
    fn nix_deploy(&self, fleet: &Fleet, state: &Path, args: &[&str]) -> anyhow::Result<Run> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--json")
            .arg("--flake")
            .arg(fleet.flake_ref())
            .arg("--ssh-config")
            .arg(fleet.ssh_config())
            .arg("--state-dir")
            .arg(state)
            .args(args)
            .envs(fleet.env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting nix-deploy")?;
        let pid = child.id();
        let mut out = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        });
        // Sample peak memory and CPU until it exits (the last sample is the total).
        let (mut peak, mut cpu) = (0, 0.0);
        let status = loop {
            if let Some((hwm, seconds)) = proc_stat(pid) {
                peak = peak.max(hwm);
                cpu = seconds;
            }
            if let Some(status) = child.try_wait()? {
                break status;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let wall = started.elapsed().as_secs_f64();
        let stdout = reader.join().unwrap_or_default();
        if !status.success() {
            bail!("nix-deploy {args:?} failed ({status}): {stdout}");
        }
        Ok(Run {
            wall,
            peak_rss_kib: peak,
            cpu_seconds: cpu,
            stdout,
        })
    }

    fn record(&mut self, scenario: &str, value: Value) {
        println!(
            "{scenario}: {}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        self.results.insert(scenario.to_string(), value);
    }
}

fn bump_all(fleet: &mut Fleet) -> anyhow::Result<()> {
    for name in fleet.host_names() {
        fleet.update(&name, |s| s.bump())?;
    }
    Ok(())
}

fn timed(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let started = Instant::now();
    f()?;
    Ok(started.elapsed().as_secs_f64())
}

/// 40 hosts: 8 roots, 16 depending on a root, 16 on a middle host; each
/// activation takes 1 s; limit 8.
fn makespan(bench: &mut Bench) -> anyhow::Result<()> {
    let (roots, middle, leaves) = if bench.quick { (4, 8, 8) } else { (8, 16, 16) };
    let activation: f64 = 1.0;
    let limit = 8usize;
    let mut specs = Vec::new();
    for i in 0..roots {
        specs.push(HostSpec::new(&format!("r{i}")));
    }
    for i in 0..middle {
        specs.push(HostSpec::new(&format!("m{i}")).depends_on(&[&format!("r{}", i % roots)]));
    }
    for i in 0..leaves {
        specs.push(HostSpec::new(&format!("l{i}")).depends_on(&[&format!("m{}", i % middle)]));
    }
    // A role per host, so smart adds no canary gates: this measures the scheduler.
    let specs: Vec<HostSpec> = specs
        .into_iter()
        .map(|s| {
            let name = s.name.clone();
            s.role(&name)
                .activation_delay_ms((activation * 1000.0) as u64)
        })
        .collect();
    let total = specs.len();
    let mut fleet = Fleet::start(specs)?;
    let state = tempfile::tempdir()?;
    bench.nix_deploy(&fleet, state.path(), &["deploy", "--parallel-limit", "64"])?;
    let phases: Vec<Vec<String>> = vec![
        (0..roots).map(|i| format!("r{i}")).collect(),
        (0..middle).map(|i| format!("m{i}")).collect(),
        (0..leaves).map(|i| format!("l{i}")).collect(),
    ];
    let bound = (3.0 * activation).max(total as f64 * activation / limit as f64);
    let limit_text = limit.to_string();
    let (mut ours, mut barrier, mut sequential) = (Vec::new(), Vec::new(), Vec::new());
    let mut measured_bounds = Vec::new();
    for _ in 0..bench.repeats {
        bump_all(&mut fleet)?;
        let run = bench.nix_deploy(
            &fleet,
            state.path(),
            &["deploy", "--parallel-limit", &limit_text],
        )?;
        ours.push(run.wall);
        measured_bounds.push(measured_bound(&run.stdout, &phases, limit));
        bump_all(&mut fleet)?;
        barrier.push(timed(|| {
            for phase in &phases {
                let mut args = vec!["deploy", "--parallel-limit", &limit_text];
                args.extend(phase.iter().map(String::as_str));
                bench.nix_deploy(&fleet, state.path(), &args)?;
            }
            Ok(())
        })?);
        if !bench.quick || sequential.is_empty() {
            bump_all(&mut fleet)?;
            sequential.push(
                bench
                    .nix_deploy(&fleet, state.path(), &["deploy", "--parallel-limit", "1"])?
                    .wall,
            );
        }
    }
    let (ours, barrier, sequential) = (median(ours), median(barrier), median(sequential));
    let measured = median(measured_bounds);
    bench.record(
        "makespan",
        json!({
            "hosts": total, "levels": 3, "activation_s": activation, "parallel_limit": limit,
            "lower_bound_s": bound,
            "ours_s": ours, "ours_vs_bound": ours / bound,
            "lower_bound_measured_s": measured,
            "ours_vs_measured_bound": ours / measured,
            "phase_barrier_s": barrier, "barrier_vs_ours": barrier / ours,
            "sequential_s": sequential, "sequential_vs_ours": sequential / ours,
            "headline": "ours_vs_bound (the activation-only bound)",
        }),
    );
    Ok(())
}

/// One `nix eval` of the fleet's toplevels, as the evaluation step does it.
fn nix_eval_fleet(fleet: &Fleet) -> anyhow::Result<()> {
    let out = fleet
        .command("nix")
        .args(nix_deploy_core::nix::eval_command(&fleet.flake_ref()).get_args())
        .output()?;
    if !out.status.success() {
        bail!("nix eval failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// One plain `ssh HOST readlink -f /run/current-system`: a handshake and a
/// round trip, what change detection costs a script per host.
fn ssh_once(fleet: &Fleet, name: &str) -> anyhow::Result<()> {
    let out = Command::new("ssh")
        .arg("-F")
        .arg(fleet.ssh_config())
        .args([name, "readlink", "-f", "/run/current-system"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("ssh {name} failed");
    }
    Ok(())
}

/// The bound with each host's real pipeline time (from the report) instead of
/// the bare activation time: time until the first host started (evaluation
/// and probing) + max(critical path, total work / limit).
fn measured_bound(report: &str, phases: &[Vec<String>], limit: usize) -> f64 {
    let report: Value = serde_json::from_str(report).unwrap_or_default();
    let mut duration = BTreeMap::new();
    let mut first_start = i64::MAX;
    for h in report["hosts"].as_array().into_iter().flatten() {
        let (Some(start), Some(end)) = (h["started_at"].as_i64(), h["finished_at"].as_i64()) else {
            continue;
        };
        first_start = first_start.min(start);
        duration.insert(
            h["name"].as_str().unwrap_or("").to_string(),
            (end - start) as f64 / 1000.0,
        );
    }
    let startup =
        (first_start - report["started_at"].as_i64().unwrap_or(first_start)) as f64 / 1000.0;
    // The chains of this fleet: l{i} → m{i % middle} → r{(i % middle) % roots}.
    let (roots, middle) = (phases[0].len(), phases[1].len());
    let d = |name: String| duration.get(&name).copied().unwrap_or(0.0);
    let critical = (0..phases[2].len())
        .map(|i| {
            let m = i % middle;
            d(format!("r{}", m % roots)) + d(format!("m{m}")) + d(format!("l{i}"))
        })
        .fold(0.0, f64::max);
    let work: f64 = duration.values().sum::<f64>() / limit as f64;
    startup + critical.max(work)
}

/// Provision `n` hosts to generation 1 (with the coordinator itself).
fn provisioned(bench: &Bench, n: usize) -> anyhow::Result<(Fleet, tempfile::TempDir)> {
    let specs = (0..n).map(|i| HostSpec::new(&format!("h{i:03}"))).collect();
    let fleet = Fleet::start(specs)?;
    let state = tempfile::tempdir()?;
    bench.nix_deploy(
        &fleet,
        state.path(),
        &["deploy", "--parallel", "--parallel-limit", "32"],
    )?;
    Ok((fleet, state))
}

fn change_detection_and_noop(bench: &mut Bench) -> anyhow::Result<()> {
    let n = if bench.quick { 30 } else { 100 };
    let (fleet, state) = provisioned(bench, n)?;
    let names = fleet.host_names();
    let (mut plan, mut looped, mut noop, mut eval) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut noop_runs = Vec::new();
    let mut plan_eval = Vec::new();
    let (mut warm, mut warm_eval) = (Vec::new(), Vec::new());
    for _ in 0..bench.repeats {
        // Cold: a state directory of its own, so no master is kept from an
        // earlier run; warm: the same command again, on the masters the
        // cold run kept.
        let probes = tempfile::tempdir()?;
        let run = bench.nix_deploy(&fleet, probes.path(), &["plan", "--no-build"])?;
        let report: Value = serde_json::from_str(&run.stdout).unwrap_or_default();
        plan_eval.push(report["evaluation"]["seconds"].as_f64().unwrap_or(0.0));
        plan.push(run.wall);
        let run = bench.nix_deploy(&fleet, probes.path(), &["plan", "--no-build"])?;
        let report: Value = serde_json::from_str(&run.stdout).unwrap_or_default();
        warm_eval.push(report["evaluation"]["seconds"].as_f64().unwrap_or(0.0));
        warm.push(run.wall);
        looped.push(timed(|| {
            for name in &names {
                ssh_once(&fleet, name)?;
            }
            Ok(())
        })?);
        eval.push(timed(|| nix_eval_fleet(&fleet))?);
        let run = bench.nix_deploy(&fleet, state.path(), &["deploy"])?;
        noop.push(run.wall);
        noop_runs.push(run);
    }
    let (plan, looped, eval_s, noop_s) = (median(plan), median(looped), median(eval), median(noop));
    let plan_eval_s = median(plan_eval);
    let (warm, warm_eval) = (median(warm), median(warm_eval));
    bench.record(
        "change_detection",
        json!({
            "hosts": n, "ours_plan_s": plan, "sequential_ssh_loop_s": looped,
            "speedup": looped / plan,
            "ours_plan_kept_connections_s": warm,
            "kept_connections_probing_s": (warm - warm_eval).max(0.0),
            "kept_connections_speedup": looped / warm,
            "target": "kept_connections_speedup >= 10",
        }),
    );
    let report: Value = serde_json::from_str(&noop_runs[0].stdout).unwrap_or_default();
    let skipped = report["hosts"]
        .as_array()
        .map(|h| h.iter().filter(|x| x["status"] == "skipped").count())
        .unwrap_or(0);
    bench.record(
        "noop_deploy",
        json!({
            "hosts": n, "skipped": skipped, "total_s": noop_s,
            "single_nix_eval_s": eval_s,
            // The deploy runs with the provisioning's kept connections and
            // evaluation cache, as the warm plan does: split it by that.
            "cold_plan_evaluation_s": plan_eval_s,
            "cold_plan_probing_s": (plan - plan_eval_s).max(0.0),
            "evaluation_in_plan_s": warm_eval,
            "probing_s": (warm - warm_eval).max(0.0),
            "bookkeeping_and_rest_s": (noop_s - warm).max(0.0),
            "coordinator_peak_rss_mib": noop_runs[0].peak_rss_kib as f64 / 1024.0,
            "coordinator_cpu_s": noop_runs[0].cpu_seconds,
        }),
    );
    Ok(())
}

/// One host, one new generation: ours vs a script doing the same steps.
fn per_host_overhead(bench: &mut Bench) -> anyhow::Result<()> {
    let mut fleet = Fleet::start(vec![HostSpec::new("solo")])?;
    let state = tempfile::tempdir()?;
    bench.nix_deploy(&fleet, state.path(), &["deploy"])?;
    let (mut ours, mut script, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
    let repeats = bench.repeats.max(3) * 2;
    for _ in 0..repeats {
        fleet.update("solo", |s| s.bump())?;
        ours.push(
            bench
                .nix_deploy(&fleet, state.path(), &["deploy", "solo"])?
                .wall,
        );
        // The same with a handshake of its own, as the script pays.
        fleet.update("solo", |s| s.bump())?;
        let cold = tempfile::tempdir()?;
        fresh.push(
            bench
                .nix_deploy(
                    &fleet,
                    cold.path(),
                    &["deploy", "solo", "--ssh-keep-alive", "0"],
                )?
                .wall,
        );
        fleet.update("solo", |s| s.bump())?;
        script.push(timed(|| eight::plain_script(&fleet, "solo"))?);
    }
    let (ours, script, fresh) = (median(ours), median(script), median(fresh));
    bench.record(
        "per_host_overhead",
        json!({
            "ours_s": ours, "plain_script_s": script,
            "ours_vs_script": ours / script,
            "ours_no_kept_connection_s": fresh,
            "ours_no_kept_connection_vs_script": fresh / script,
            "overhead": ours / script - 1.0, "target": "ours_no_kept_connection_vs_script <= 1.1",
            "note": "ours also probes, checks free space, computes the change summary, arms and confirms the watchdog over a new SSH connection, and records every step",
        }),
    );
    Ok(())
}

/// A tiny HTTP GET over loopback; returns the status code.
fn http_get(address: &str, path: &str, token: &str) -> anyhow::Result<u16> {
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// 100 hosts, smart strategy, through the daemon; status API latency while it runs.
fn hundred_hosts(bench: &mut Bench) -> anyhow::Result<()> {
    let n = if bench.quick { 30 } else { 100 };
    let (mut fleet, state) = provisioned(bench, n)?;
    bump_all(&mut fleet)?;
    // The deployment alone: no watch probing alongside.
    let mut daemon =
        cluster::Daemon::start(bench, &fleet, state.path(), "[watch]\nenabled = false")?;
    let address = daemon.address.clone();
    let token = cluster::TOKEN;
    let pid = daemon.child.id();
    // Baseline in the same run: the same request while nothing deploys.
    let mut idle = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        http_get(&address, "/api/v1/status", token)?;
        idle.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (_, cpu_before) = proc_stat(pid).unwrap_or((0, 0.0));
    let started = Instant::now();
    let id = daemon.deploy("{}")?;
    let mut latencies = Vec::new();
    let mut peak = 0;
    let mut cpu = cpu_before;
    loop {
        let t = Instant::now();
        let code = http_get(&address, "/api/v1/status", token)?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        if code != 200 {
            bail!("status API answered {code}");
        }
        if let Some((hwm, seconds)) = proc_stat(pid) {
            peak = peak.max(hwm);
            cpu = seconds;
        }
        let mut s = std::net::TcpStream::connect(&address)?;
        write!(
            s,
            "GET /api/v1/deployments/{id} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        if !text.contains("\"status\":\"running\"") {
            if !text.contains("\"status\":\"succeeded\"") {
                bail!(
                    "the 100-host deployment did not succeed: {}",
                    &text[..text.len().min(2000)]
                );
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = started.elapsed().as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = daemon.child.wait();
    let db = state.path().join(nix_deploy::store::DB_FILE);
    let size: u64 = ["", "-wal"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", db.display())).ok())
        .map(|m| m.len())
        .sum();
    // Runs in this state dir: provisioning (n) and this deployment (n).
    let host_runs = 2 * n as u64;
    bench.record(
        "hundred_hosts",
        json!({
            "hosts": n, "strategy": "smart", "parallel_limit": 16, "wall_s": wall,
            "coordinator_peak_rss_mib": peak as f64 / 1024.0, "coordinator_cpu_s": cpu - cpu_before,
            "sqlite_bytes_per_host_run": size / host_runs,
            "status_api_p50_ms": percentile(latencies.clone(), 0.5),
            "status_api_p99_ms": percentile(latencies.clone(), 0.99),
            "status_samples": latencies.len(),
            "status_api_idle_p50_ms": percentile(idle.clone(), 0.5),
            "status_api_idle_p99_ms": percentile(idle, 0.99),
            "load_average_after": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("").to_string(),
            "targets": "rss < 100 MiB, status p99 < 20 ms",
        }),
    );
    Ok(())
}

/// Hosts sharing an expensive evaluation: one evaluation for all vs one per host.
fn evaluation(bench: &mut Bench) -> anyhow::Result<()> {
    let n = if bench.quick { 8 } else { 20 };
    let dir = tempfile::tempdir()?;
    let hosts: String = (0..n)
        .map(|i| {
            format!(
                r#"    h{i} = {{ config.system.build.toplevel = mk "h{i}"; config.deployment = {{ }}; }};
"#
            )
        })
        .collect();
    std::fs::write(
        dir.path().join("flake.nix"),
        format!(
            r#"{{
  outputs = {{ self }}:
    let
      # Stands in for nixpkgs: an expensive evaluation every host shares.
      shared = builtins.foldl' (acc: x: acc + x) 0 (builtins.genList (x: x * x) 300000);
      mk = name: builtins.derivation {{
        inherit name; system = "{system}"; builder = "/bin/sh";
        args = [ "-c" "echo ${{toString shared}} > $out" ];
      }};
    in {{ nixosConfigurations = {{
{hosts}    }}; }};
}}
"#,
            system = nix_deploy_testkit::nix_system()
        ),
    )?;
    let flake = format!("path:{}", dir.path().display());
    let env = [("NIX_CONFIG", nix_deploy_testkit::nix_config())];
    let (mut once, mut each) = (Vec::new(), Vec::new());
    for _ in 0..bench.repeats {
        once.push(timed(|| {
            let cmd = nix_deploy_core::nix::eval_command(&flake);
            let out = Command::new("nix")
                .args(cmd.get_args())
                .envs(env)
                .output()?;
            if !out.status.success() {
                bail!("{}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        })?);
        each.push(timed(|| {
            for i in 0..n {
                let out = Command::new("nix")
                    .args([
                        "--extra-experimental-features",
                        "nix-command flakes",
                        "eval",
                        "--raw",
                    ])
                    .arg(format!(
                        "{flake}#nixosConfigurations.h{i}.config.system.build.toplevel.outPath"
                    ))
                    .envs(env)
                    .output()?;
                if !out.status.success() {
                    bail!("{}", String::from_utf8_lossy(&out.stderr));
                }
            }
            Ok(())
        })?);
    }
    let (once, each) = (median(once), median(each));
    bench.record(
        "evaluation",
        json!({ "hosts": n, "one_evaluation_s": once, "one_per_host_s": each, "speedup": each / once }),
    );
    Ok(())
}

/// Peak memory of a process tree: the sum of its processes' resident memory,
/// sampled every 20 ms, at its highest. The tree is the process and every
/// process whose parent chain leads to it.
fn tree_rss_kib(root: u32) -> u64 {
    let mut parents: Vec<(u32, u32, u64)> = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        };
        if let (Some(ppid), rss) = (field("PPid:"), field("VmRSS:").unwrap_or(0)) {
            parents.push((pid, ppid as u32, rss));
        }
    }
    let mut tree = std::collections::BTreeSet::from([root]);
    loop {
        let before = tree.len();
        for (pid, ppid, _) in &parents {
            if tree.contains(ppid) {
                tree.insert(*pid);
            }
        }
        if tree.len() == before {
            break;
        }
    }
    parents
        .iter()
        .filter(|(pid, _, _)| tree.contains(pid))
        .map(|(_, _, rss)| rss)
        .sum()
}

/// CPU time of a process's children that ended (cutime + cstime).
fn children_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(13)?.parse::<f64>().ok()? + fields.get(14)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Run `cmd` to the end; wall time, CPU time (with its children's), its
/// peak memory (its own high-water mark) and the peak of its whole process
/// tree.
/// Run `cmd` measuring it; an exit code other than 0 or one of `ok_codes`
/// is an error.
fn measured(mut cmd: Command, ok_codes: &[i32]) -> anyhow::Result<(Run, u64)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting")?;
    let pid = child.id();
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = out.read_to_string(&mut text);
        text
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    });
    let (mut peak, mut tree_peak, mut cpu) = (0, 0, 0.0);
    let status = loop {
        if let Some((hwm, seconds)) = proc_stat(pid) {
            peak = peak.max(hwm);
            cpu = seconds + children_cpu_seconds(pid).unwrap_or(0.0);
        }
        tree_peak = tree_peak.max(tree_rss_kib(pid));
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = started.elapsed().as_secs_f64();
    let stdout = reader.join().unwrap_or_default();
    let stderr = errors.join().unwrap_or_default();
    if !status.success() && !status.code().is_some_and(|c| ok_codes.contains(&c)) {
        bail!("{cmd:?} failed ({status}): {stderr}");
    }
    Ok((
        Run {
            wall,
            peak_rss_kib: peak,
            cpu_seconds: cpu,
            stdout,
        },
        tree_peak.max(peak),
    ))
}

/// Evaluation at fleet scale: 48 NixOS-shaped hosts (nixpkgs' module system
/// over 1,000 option modules and a package set of their own; see the
/// testkit's `nixos` module). One `nix eval` of the whole fleet (what
/// nix-deploy did before) against `nix-deploy plan` cold (nothing cached),
/// with nothing changed, and after one host's file changed; each with its
/// peak memory. The hosts refuse connections at once (nothing listens on
/// their port), so the plans measure evaluation, not SSH.
fn nixos_evaluation(bench: &mut Bench) -> anyhow::Result<()> {
    let n = if bench.quick { 16 } else { 48 };
    let specs = (0..n).map(|i| HostSpec::new(&format!("h{i:02}"))).collect();
    let mut flake = NixosFlake::create(NixosShape::default(), specs)?;
    let flake_ref = flake.flake_ref();
    let ssh_config = flake.dir().join("ssh_config");
    std::fs::write(
        &ssh_config,
        "Host *\n  HostName 127.0.0.1\n  Port 9\n  BatchMode yes\n  ConnectTimeout 2\n",
    )?;
    let env = [("NIX_CONFIG", nix_deploy_testkit::nix_config())];
    let single = || -> anyhow::Result<(Run, BTreeMap<String, String>)> {
        let mut cmd = Command::new("nix");
        cmd.args(nix_deploy_core::nix::eval_command(&flake_ref).get_args())
            .envs(env);
        let (run, _) = measured(cmd, &[])?;
        let parsed: BTreeMap<String, Value> = serde_json::from_str(&run.stdout)?;
        let toplevels = parsed
            .into_iter()
            .map(|(k, v)| (k, v["toplevel"].as_str().unwrap_or_default().to_string()))
            .collect();
        Ok((run, toplevels))
    };
    let plan = |state: &Path, extra: &[&str]| -> anyhow::Result<(Run, u64, Value)> {
        let mut cmd = Command::new(&bench.binary);
        cmd.arg("--json")
            .arg("--flake")
            .arg(&flake_ref)
            .arg("--ssh-config")
            .arg(&ssh_config)
            .arg("--state-dir")
            .arg(state)
            .args(["--connect-timeout", "2", "plan", "--no-build"])
            .args(extra)
            .envs(env);
        // Exit 1: every host is unreachable here, on purpose.
        let (run, tree) = measured(cmd, &[1])?;
        let report: Value = serde_json::from_str(&run.stdout)?;
        Ok((run, tree, report))
    };
    let toplevels = |report: &Value| -> BTreeMap<String, String> {
        report["hosts"]
            .as_array()
            .map(|hosts| {
                hosts
                    .iter()
                    .map(|h| {
                        (
                            h["name"].as_str().unwrap_or_default().to_string(),
                            h["target_path"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let cached = |report: &Value| {
        report["hosts"]
            .as_array()
            .map(|h| h.iter().filter(|x| x["eval_cached"] == true).count())
            .unwrap_or(0)
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut push = |key: &'static str, value: f64| samples.entry(key).or_default().push(value);
    let mut identical = true;
    let mut last_cold = Value::Null;
    let mut last_budgeted = Value::Null;
    for round in 0..bench.repeats {
        let (single_run, fresh) = single()?;
        push("single_s", single_run.wall);
        push("single_cpu_s", single_run.cpu_seconds);
        push("single_peak_mib", mib(single_run.peak_rss_kib));

        // Cold: a new history, nothing cached, nothing measured.
        let state = tempfile::tempdir()?;
        let (run, tree, report) = plan(state.path(), &[])?;
        identical &= toplevels(&report) == fresh && cached(&report) == 0;
        push("cold_s", run.wall);
        push("cold_cpu_s", run.cpu_seconds);
        push("cold_peak_mib", mib(tree));
        push(
            "cold_eval_s",
            report["evaluation"]["seconds"].as_f64().unwrap_or(0.0),
        );
        last_cold = report["evaluation"].clone();

        // Nothing changed.
        let (run, tree, report) = plan(state.path(), &[])?;
        identical &= toplevels(&report) == fresh && cached(&report) == n;
        push("unchanged_s", run.wall);
        push("unchanged_peak_mib", mib(tree));
        push(
            "unchanged_eval_s",
            report["evaluation"]["seconds"].as_f64().unwrap_or(0.0),
        );

        // Cold again, now with the per-host memory measured by the first run
        // (the cache bypassed): shards sized by the fleet's own figure.
        let (run, tree, report) = plan(state.path(), &["--no-eval-cache"])?;
        identical &= toplevels(&report) == fresh;
        let evaluation = &report["evaluation"];
        let budget = evaluation["workers"].as_f64().unwrap_or(0.0)
            * evaluation["hosts_per_shard"].as_f64().unwrap_or(0.0)
            * evaluation["host_budget_mib"].as_f64().unwrap_or(0.0);
        push("budgeted_s", run.wall);
        push("budgeted_cpu_s", run.cpu_seconds);
        push("budgeted_peak_mib", mib(tree));
        push("budgeted_budget_mib", budget);
        push("budgeted_peak_over_budget", mib(tree) / budget);
        last_budgeted = evaluation.clone();

        // One host's file changes: the flake's hash changes, everything is
        // evaluated again (only that host's system differs).
        let changed = format!("h{:02}", (round * 7 + 3) % n);
        flake.update(&changed, |s| s.bump())?;
        let (run, tree, report) = plan(state.path(), &[])?;
        let mut expected = fresh.clone();
        let out = Command::new("nix")
            .args(["eval", "--raw"])
            .arg(format!(
                "{flake_ref}#nixosConfigurations.{changed}.config.system.build.toplevel.outPath"
            ))
            .envs(env)
            .output()?;
        expected.insert(
            changed.clone(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        );
        identical &= out.status.success() && toplevels(&report) == expected && expected != fresh;
        push("changed_s", run.wall);
        push("changed_cpu_s", run.cpu_seconds);
        push("changed_peak_mib", mib(tree));
    }
    let m = |key: &str| median(samples.get(key).cloned().unwrap_or_default());
    let single_s = m("single_s");
    bench.record(
        "nixos_evaluation",
        json!({
            "hosts": n,
            "shape": "1000 option modules, 5000 packages, 60 services a host",
            "single_nix_eval_s": single_s,
            "single_nix_eval_peak_mib": m("single_peak_mib"),
            "single_nix_eval_cpu_s": m("single_cpu_s"),
            "cold_plan_cpu_s": m("cold_cpu_s"),
            "cold_measured_budget_cpu_s": m("budgeted_cpu_s"),
            "one_host_changed_cpu_s": m("changed_cpu_s"),
            "load_average_before": load_before,
            "load_average_after": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string(),
            "cold_plan_s": m("cold_s"),
            "cold_plan_vs_single": m("cold_s") / single_s,
            "cold_plan_evaluation_s": m("cold_eval_s"),
            "cold_plan_peak_mib": m("cold_peak_mib"),
            "cold_evaluation": last_cold,
            "unchanged_plan_s": m("unchanged_s"),
            "unchanged_plan_vs_single": m("unchanged_s") / single_s,
            "unchanged_plan_evaluation_s": m("unchanged_eval_s"),
            "unchanged_plan_peak_mib": m("unchanged_peak_mib"),
            "cold_measured_budget_plan_s": m("budgeted_s"),
            "cold_measured_budget_vs_single": m("budgeted_s") / single_s,
            "cold_measured_budget_peak_mib": m("budgeted_peak_mib"),
            "cold_measured_budget_workers_x_budget_mib": m("budgeted_budget_mib"),
            "cold_measured_budget_peak_over_budget": m("budgeted_peak_over_budget"),
            "cold_measured_budget_evaluation": last_budgeted,
            "one_host_changed_plan_s": m("changed_s"),
            "one_host_changed_vs_single": m("changed_s") / single_s,
            "one_host_changed_peak_mib": m("changed_peak_mib"),
            "results_identical_to_nix_eval": identical,
            "targets": "cold <= 0.6x single, peak <= workers x per-worker budget, unchanged <= 0.1x single, identical results",
        }),
    );
    Ok(())
}

/// How a figure is shown: `x` a ratio, `s` seconds, `pct` a signed
/// percentage, `ms`, `MiB`, `B`.
#[derive(Clone, Copy)]
enum Unit {
    Ratio(usize),
    Seconds(usize),
    Millis,
    Mib,
    Bytes,
    Plain(usize),
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::Ratio(d) => format!("{v:.d$}x"),
            Unit::Seconds(d) => format!("{v:.d$} s"),
            Unit::Millis => format!("{v:.1} ms"),
            Unit::Mib => format!("{v:.0} MiB"),
            Unit::Bytes => format!("{v:.0} B"),
            Unit::Plain(d) => format!("{v:.d$}"),
        }
    }
}

/// A target: the text shown and whether a value meets it.
type Target = Option<(&'static str, fn(f64) -> bool)>;

/// The figures of the summary: label, scenario, key, unit, target.
const FIGURES: &[(&str, &str, &str, Unit, Target)] = &[
    (
        "8 hosts x 1 s / activation-only bound",
        "eight_hosts",
        "ours_vs_bound",
        Unit::Ratio(2),
        Some(("<= 1.3x", |v| v <= 1.3)),
    ),
    (
        "8 hosts: per-host overhead (median)",
        "eight_hosts",
        "per_host_overhead_median_s",
        Unit::Seconds(2),
        Some(("<= 0.5 s", |v| v <= 0.5)),
    ),
    (
        "8 hosts: sequential script / ours",
        "eight_hosts",
        "sequential_script_vs_ours",
        Unit::Ratio(2),
        None,
    ),
    (
        "8 hosts: 4-at-a-time script / ours",
        "eight_hosts",
        "parallel_script_vs_ours",
        Unit::Ratio(2),
        None,
    ),
    (
        "(a) 8 changed hosts: script 4 at a time / ours",
        "eight_hosts",
        "parallel_script_vs_ours",
        Unit::Ratio(2),
        Some((">= 1.3x", |v| v >= 1.3)),
    ),
    (
        "(b) 1 host of a changed fleet / script",
        "eight_hosts",
        "one_host_vs_script",
        Unit::Ratio(2),
        Some(("<= 1.0x", |v| v <= 1.0)),
    ),
    (
        "(c) nothing changed: colmena-like / ours",
        "eight_hosts",
        "colmena_like_vs_unchanged",
        Unit::Ratio(1),
        Some((">= 10x", |v| v >= 10.0)),
    ),
    (
        "makespan / activation-only bound",
        "makespan",
        "ours_vs_bound",
        Unit::Ratio(2),
        None,
    ),
    (
        "makespan / bound from our own times",
        "makespan",
        "ours_vs_measured_bound",
        Unit::Ratio(2),
        None,
    ),
    (
        "phase barrier / ours",
        "makespan",
        "barrier_vs_ours",
        Unit::Ratio(2),
        None,
    ),
    (
        "sequential / ours",
        "makespan",
        "sequential_vs_ours",
        Unit::Ratio(2),
        None,
    ),
    (
        "probe, cold: ssh loop / ours",
        "change_detection",
        "speedup",
        Unit::Ratio(1),
        None,
    ),
    (
        "probe, kept connections: loop / ours",
        "change_detection",
        "kept_connections_speedup",
        Unit::Ratio(1),
        Some((">= 10x", |v| v >= 10.0)),
    ),
    (
        "no-op deploy",
        "noop_deploy",
        "total_s",
        Unit::Seconds(2),
        None,
    ),
    (
        "1 host, own handshake / script",
        "per_host_overhead",
        "ours_no_kept_connection_vs_script",
        Unit::Ratio(2),
        Some(("<= 1.1x", |v| v <= 1.1)),
    ),
    (
        "1 host, kept connection / script",
        "per_host_overhead",
        "ours_vs_script",
        Unit::Ratio(2),
        None,
    ),
    (
        "100 hosts: wall",
        "hundred_hosts",
        "wall_s",
        Unit::Seconds(1),
        None,
    ),
    (
        "100 hosts: coordinator RSS",
        "hundred_hosts",
        "coordinator_peak_rss_mib",
        Unit::Mib,
        Some(("< 100 MB", |v| v < 95.0)),
    ),
    (
        "100 hosts: SQLite per host run",
        "hundred_hosts",
        "sqlite_bytes_per_host_run",
        Unit::Bytes,
        None,
    ),
    (
        "status API p99 (busy)",
        "hundred_hosts",
        "status_api_p99_ms",
        Unit::Millis,
        Some(("< 20 ms", |v| v < 20.0)),
    ),
    (
        "status API p99 (idle)",
        "hundred_hosts",
        "status_api_idle_p99_ms",
        Unit::Millis,
        None,
    ),
    (
        "eval 48 NixOS: cold plan / nix eval",
        "nixos_evaluation",
        "cold_plan_vs_single",
        Unit::Ratio(2),
        Some(("<= 0.6x", |v| v <= 0.6)),
    ),
    (
        "eval: cold, measured budget / nix eval",
        "nixos_evaluation",
        "cold_measured_budget_vs_single",
        Unit::Ratio(2),
        Some(("<= 0.6x", |v| v <= 0.6)),
    ),
    (
        "eval: peak / (workers x budget)",
        "nixos_evaluation",
        "cold_measured_budget_peak_over_budget",
        Unit::Plain(2),
        Some(("<= 1", |v| v <= 1.0)),
    ),
    (
        "eval: unchanged plan / nix eval",
        "nixos_evaluation",
        "unchanged_plan_vs_single",
        Unit::Ratio(3),
        Some(("<= 0.1x", |v| v <= 0.1)),
    ),
    (
        "eval: one host changed / nix eval",
        "nixos_evaluation",
        "one_host_changed_vs_single",
        Unit::Ratio(2),
        None,
    ),
    (
        "evaluation: per host / once",
        "evaluation",
        "speedup",
        Unit::Ratio(1),
        None,
    ),
    (
        "watch: CPU per probe",
        "watch",
        "cpu_per_probe_ms",
        Unit::Millis,
        None,
    ),
    (
        "watch: 500 hosts at 1 min, % of a core",
        "watch",
        "extrapolated_500_hosts_1m_core_percent",
        Unit::Plain(2),
        Some(("< 5", |v| v < 5.0)),
    ),
    (
        "watch: 500 hosts at 1 min, memory",
        "watch",
        "extrapolated_500_hosts_1m_rss_mib",
        Unit::Mib,
        Some(("< 100 MB", |v| v < 95.0)),
    ),
    (
        "web: fleet page, 500 hosts, to load (median)",
        "web_fleet_page",
        "load_event_median_s",
        Unit::Seconds(2),
        Some(("< 1 s", |v| v < 1.0)),
    ),
    (
        "web: fleet page, 500 hosts, to load (max)",
        "web_fleet_page",
        "load_event_max_s",
        Unit::Seconds(2),
        Some(("< 1 s", |v| v < 1.0)),
    ),
    (
        "web: 100-host timeline, events not applied",
        "web_live_timeline",
        "events_missed",
        Unit::Plain(0),
        Some(("0", |v| v == 0.0)),
    ),
    (
        "web: 100-host timeline, event lag p99",
        "web_live_timeline",
        "lag_p99_ms",
        Unit::Millis,
        Some(("< 1000 ms", |v| v < 1000.0)),
    ),
    (
        "closure: NAR bytes x 8 hosts (MB)",
        "closure",
        "closure_mb_times_hosts",
        Unit::Plain(0),
        None,
    ),
    (
        "closure: pushed, coordinator sent (MB)",
        "closure",
        "push_sent_mb",
        Unit::Plain(1),
        None,
    ),
    (
        "closure: substituted, coordinator sent (MB)",
        "closure",
        "substitute_sent_mb",
        Unit::Plain(1),
        None,
    ),
    (
        "closure: built on target, sent (MB)",
        "closure",
        "build_on_target_sent_mb",
        Unit::Plain(1),
        None,
    ),
    (
        "closure: link, 8 SSH streams (MB/s)",
        "closure",
        "link_eight_streams_mb_s",
        Unit::Plain(0),
        None,
    ),
    (
        "closure: pushed, 8 hosts",
        "closure",
        "push_wall_s",
        Unit::Seconds(1),
        None,
    ),
    (
        "closure: pushed / link",
        "closure",
        "push_vs_link",
        Unit::Ratio(2),
        None,
    ),
    (
        "closure: substituted, 8 hosts",
        "closure",
        "substitute_wall_s",
        Unit::Seconds(1),
        None,
    ),
    (
        "closure: substituted / link",
        "closure",
        "substitute_vs_link",
        Unit::Ratio(2),
        None,
    ),
    (
        "closure: built on target, 8 hosts",
        "closure",
        "build_on_target_wall_s",
        Unit::Seconds(1),
        None,
    ),
];

/// The summary: one line per figure, with its target when it has one.
fn print_table(results: &BTreeMap<String, Value>) {
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut row = |what: String, value: String, target: &str, met: Option<bool>| {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        rows.push([what, value, target.into(), met.into()]);
    };
    for (label, scenario, key, unit, target) in FIGURES {
        let Some(v) = results.get(*scenario).and_then(|r| r[*key].as_f64()) else {
            continue;
        };
        let (text, met) = match target {
            Some((text, check)) => (*text, Some(check(v))),
            None => ("", None),
        };
        row(label.to_string(), unit.show(v), text, met);
    }
    if let Some(steps) = results
        .get("eight_hosts")
        .and_then(|r| r["step_medians_s"].as_object())
    {
        for (step, value) in steps {
            if let Some(v) = value.as_f64() {
                row(
                    format!("8 hosts: step {step} (median)"),
                    Unit::Seconds(2).show(v),
                    "",
                    None,
                );
            }
        }
    }
    let identical = results
        .get("nixos_evaluation")
        .and_then(|r| r["results_identical_to_nix_eval"].as_bool());
    if let Some(same) = identical {
        let value = if same { "same" } else { "DIFFER" };
        row(
            "eval: results = fresh nix eval".into(),
            value.into(),
            "same",
            Some(same),
        );
    }
    println!("\n{:<40} {:>10}  {:<9} met", "figure", "value", "target");
    for [what, value, target, met] in rows {
        println!("{what:<40} {value:>10}  {target:<9} {met}");
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and
    // must not start a 10-minute benchmark.
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "fleet: a benchmark program; run it with `just bench` (cargo bench --bench fleet)"
        );
        return Ok(());
    }
    let only = args
        .iter()
        .position(|a| a == "--scenario")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let quick = std::env::var("NIX_DEPLOY_BENCH_QUICK").is_ok_and(|v| v == "1");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // Another build of nix-deploy, to compare two commits in one session.
    let binary = std::env::var_os("NIX_DEPLOY_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/nix-deploy"));
    if !binary.is_file() {
        bail!(
            "{} is missing: cargo build --release --bin nix-deploy",
            binary.display()
        );
    }
    let mut bench = Bench {
        binary,
        repeats: if quick { 1 } else { 3 },
        quick,
        results: BTreeMap::new(),
    };
    type Scenario = fn(&mut Bench) -> anyhow::Result<()>;
    let scenarios: [(&str, Scenario); 13] = [
        ("nixos_evaluation", nixos_evaluation),
        ("evaluation", evaluation),
        ("eight_hosts", eight::eight_hosts),
        ("per_host_overhead", per_host_overhead),
        ("change_detection", change_detection_and_noop),
        ("makespan", makespan),
        ("hundred_hosts", hundred_hosts),
        ("web_fleet_page", web::fleet_page),
        ("web_live_timeline", web::live_timeline),
        ("failover", cluster::failover),
        ("backends", cluster::backends),
        ("watch", watch::watch),
        ("closure", closure::closure),
    ];
    for (name, run) in scenarios {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        eprintln!("== {name}");
        if let Err(e) = run(&mut bench) {
            eprintln!("{name} failed: {e:#}");
            bench.record(name, json!({ "error": format!("{e:#}") }));
        }
    }
    let machine = json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "quick": quick,
        "repeats": bench.repeats,
    });
    print_table(&bench.results);
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let document = json!({ "machine": machine, "results": bench.results });
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&document)?,
    )?;
    println!("\nwritten to {}", out_dir.join("results.json").display());
    Ok(())
}
