//! `watch`: the daemon watching N test hosts (100; 30 quick) at a 10 s
//! interval, measured over a window: the coordinator's CPU (its own, the
//! `nix` processes of its evaluations, and the SSH masters that carry the
//! probes), its resident memory against the same daemon not watching, and
//! so what one probe costs; extrapolated to 500 hosts at one minute.

use std::collections::{BTreeMap, BTreeSet};

use super::cluster::Daemon;
use super::*;

/// `VmRSS` of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The live processes whose command line mentions `needle` (the SSH
/// masters kept in the state directory): how many, their CPU seconds, and
/// their proportional memory (`Pss`, so shared pages count once), KiB.
fn processes_naming(needle: &str) -> (usize, f64, u64) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (0, 0.0, 0);
    };
    let pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect();
    let cpu = pids
        .iter()
        .filter_map(|pid| proc_stat(*pid).map(|(_, cpu)| cpu))
        .sum();
    let pss = pids
        .iter()
        .filter_map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    (pids.len(), cpu, pss)
}

fn stop(mut daemon: Daemon) {
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status();
    let _ = daemon.child.wait();
}

pub(super) fn watch(bench: &mut Bench) -> anyhow::Result<()> {
    let n = if bench.quick { 30 } else { 100 };
    let window = Duration::from_secs(if bench.quick { 30 } else { 90 });
    let interval_s = 10.0;
    let (fleet, state) = provisioned(bench, n)?;
    let masters = state.path().join("ssh").display().to_string();

    // The same daemon, not watching: its memory is the baseline.
    let idle = Daemon::start(bench, &fleet, state.path(), "[watch]\nenabled = false\n")?;
    std::thread::sleep(Duration::from_secs(3));
    let idle_rss = rss_kib(idle.child.id());
    stop(idle);

    let daemon = Daemon::start(
        bench,
        &fleet,
        state.path(),
        "[watch]\ninterval = \"10s\"\nhealth-interval = \"10s\"\n",
    )?;
    let pid = daemon.child.id();
    // Warm: every host seen once (its master kept).
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let fleet_now = daemon.get("/api/v1/fleet")?;
        let seen = fleet_now["hosts"]
            .as_array()
            .map(|hosts| hosts.iter().filter(|h| h["last_seen"].is_i64()).count())
            .unwrap_or(0);
        if seen == n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {seen} of {n} hosts seen after 3 minutes");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let cpu = || {
        let (_, own) = proc_stat(pid).unwrap_or((0, 0.0));
        (own, children_cpu_seconds(pid).unwrap_or(0.0))
    };
    let (own_before, children_before) = cpu();
    let (_, ssh_before, _) = processes_naming(&masters);
    let started_ms = nix_deploy::now_ms();
    let started = Instant::now();
    let mut probes: BTreeSet<(String, i64)> = BTreeSet::new();
    let mut evaluations: BTreeSet<i64> = BTreeSet::new();
    let mut rss = Vec::new();
    let mut drift: BTreeMap<String, usize> = BTreeMap::new();
    while started.elapsed() < window {
        let fleet_now = daemon.get("/api/v1/fleet")?;
        for host in fleet_now["hosts"].as_array().into_iter().flatten() {
            if let (Some(name), Some(at)) = (host["name"].as_str(), host["probed_at"].as_i64())
                && at > started_ms
            {
                probes.insert((name.to_string(), at));
            }
        }
        if let Some(at) = fleet_now["evaluated_at"].as_i64()
            && at > started_ms
        {
            evaluations.insert(at);
        }
        rss.push(rss_kib(pid) as f64);
        std::thread::sleep(Duration::from_secs(1));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (own_after, children_after) = cpu();
    let (master_count, ssh_after, masters_pss) = processes_naming(&masters);
    let fleet_now = daemon.get("/api/v1/fleet")?;
    for host in fleet_now["hosts"].as_array().into_iter().flatten() {
        for d in host["drift"].as_array().into_iter().flatten() {
            *drift
                .entry(d["kind"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
    }
    stop(daemon);

    let own = own_after - own_before;
    let evaluating = children_after - children_before;
    let ssh = ssh_after - ssh_before;
    let probe_count = probes.len().max(1) as f64;
    let evaluation_count = evaluations.len().max(1) as f64;
    let per_probe_ms = (own + ssh) / probe_count * 1000.0;
    let per_evaluation_ms = evaluating / evaluation_count * 1000.0;
    let watched_rss = median(rss);
    let per_host_kib = (watched_rss - idle_rss as f64).max(0.0) / n as f64;
    // 500 hosts at one minute: 500 probes and one evaluation a minute.
    let core_500 = (500.0 / 60.0 * per_probe_ms + per_evaluation_ms / 60.0) / 1000.0 * 100.0;
    let rss_500 = (idle_rss as f64 + 500.0 * per_host_kib) / 1024.0;
    // The kept SSH masters are processes of their own, one per host.
    let master_kib = masters_pss as f64 / master_count.max(1) as f64;
    bench.record(
        "watch",
        json!({
            "hosts": n, "interval_s": interval_s, "window_s": elapsed,
            "probes": probes.len(), "probes_expected": (n as f64 * elapsed / interval_s).round(),
            "evaluations": evaluations.len(),
            "coordinator_cpu_s": own, "evaluation_cpu_s": evaluating, "ssh_masters_cpu_s": ssh,
            "core_percent": (own + evaluating + ssh) / elapsed * 100.0,
            "cpu_per_probe_ms": per_probe_ms,
            "cpu_per_evaluation_ms": per_evaluation_ms,
            "rss_idle_mib": idle_rss as f64 / 1024.0,
            "rss_watching_mib": watched_rss / 1024.0,
            "rss_per_host_kib": per_host_kib,
            "extrapolated_500_hosts_1m_core_percent": core_500,
            "extrapolated_500_hosts_1m_rss_mib": rss_500,
            "ssh_masters": master_count,
            "ssh_master_pss_kib": master_kib,
            "extrapolated_500_hosts_ssh_masters_mib": 500.0 * master_kib / 1024.0,
            "drift_at_end": drift,
            "targets": "500 hosts at 1 minute: < 5% of a core, < 100 MB",
        }),
    );
    Ok(())
}
