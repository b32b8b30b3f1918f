//! `closure`: a realistic closure (2,000 store paths, about 200 MB; 300 paths
//! and about 30 MB quick) to 8 test hosts, three ways, each on fresh hosts
//! (so each way really transfers the closure): pushed from the coordinator
//! (`--no-substitute`), substituted by the hosts from a binary cache on
//! loopback (a `file://` cache the hosts' `substituters` name), and built on
//! target (`--build-on-target`). For each: wall time, the bytes the
//! coordinator sent over SSH, and the effective throughput (closure bytes ×
//! hosts / time) against the link's physical limit measured in the same run
//! (`/dev/zero` through `ssh HOST 'cat > /dev/null'`, the same cipher path).
//!
//! The closure: every host's toplevel depends on N payload derivations, each
//! a file of AES-CTR keystream (`openssl enc` over `/dev/zero`, keyed by a
//! per-run seed and the path's index: deterministic for the run, so a host
//! building it makes the same bytes, and incompressible), sizes spread
//! between a quarter and 1.75 times the mean. The seed changes every run,
//! so the coordinator builds it once per run and nothing is left over from
//! another run; the payload is deleted from the coordinator's store at the
//! end.
//!
//! How the bytes are counted: a sampler polls `ss -tin` every 100 ms for
//! the TCP connections to port 22 of the fleet's addresses (the client
//! side: destination port 22) and keeps, per connection, the highest
//! `bytes_acked` (what the coordinator sent and the host received) and
//! `bytes_received` (what the host sent back). Kernel counters, so the SSH
//! framing and encryption are counted, not the payload before encryption.
//! The kept SSH masters outlive the run, so the last sample after it sees
//! their totals; a connection that closes between two samples loses at most
//! its last 100 ms. As a cross-check, the whole loopback interface's
//! transmitted bytes (`/proc/net/dev`, `lo`) over the same interval are
//! recorded too: an upper bound, since they count both directions of every
//! connection on the machine (other work included).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

/// The payload: how many paths, their mean size, the run's seed.
struct Payload {
    paths: usize,
    mean_bytes: u64,
    seed: String,
}

impl Payload {
    /// The module every host imports: the payload in the system's packages.
    fn module(&self) -> String {
        let iv = "0".repeat(32);
        format!(
            r#"{{ ... }}:
let
  mean = {mean};
  payload = i:
    let
      size = mean / 4 + (i * 7919 - (i * 7919 / (mean * 3 / 2)) * (mean * 3 / 2));
      key = builtins.hashString "md5" "{seed}-${{toString i}}";
    in builtins.derivation {{
      name = "payload-${{toString i}}";
      system = {system};
      builder = "/bin/sh";
      args = [ "-c" "/usr/bin/openssl enc -aes-128-ctr -nosalt -K ${{key}} -iv {iv} -in /dev/zero 2>/dev/null | /usr/bin/head -c ${{toString size}} > $out && [ $(/usr/bin/stat -c %s $out) = ${{toString size}} ]" ];
    }};
in {{
  environment.systemPackages = builtins.genList payload {paths};
}}
"#,
            mean = self.mean_bytes,
            seed = self.seed,
            paths = self.paths,
            system = nix_deploy_testkit::nix_string(&nix_deploy_testkit::nix_system()),
        )
    }
}

/// 8 fresh hosts on the payload's NixOS-shaped flake (the cheapest shape:
/// the payload is what matters), optionally substituting from `cache`.
fn payload_fleet(payload: &Payload, cache: Option<&str>) -> anyhow::Result<Fleet> {
    let specs = (0..8)
        .map(|i| {
            let spec = HostSpec::new(&format!("c{i}"));
            match cache {
                Some(url) => spec.substituters(url),
                None => spec,
            }
        })
        .collect();
    let mut fleet = Fleet::start(specs)?;
    fleet.use_nixos(NixosShape {
        option_modules: 1,
        packages: 1,
        services_per_host: 0,
        shared_module: payload.module(),
        ..NixosShape::small()
    })?;
    Ok(fleet)
}

fn toplevel_attr(fleet: &Fleet, name: &str) -> String {
    format!(
        "{}#nixosConfigurations.{name}.config.system.build.toplevel",
        fleet.flake_ref()
    )
}

/// Builds every host's system on the coordinator (the payload once),
/// returning the toplevels.
fn build_here(fleet: &Fleet) -> anyhow::Result<Vec<String>> {
    let attrs: Vec<String> = fleet
        .host_names()
        .iter()
        .map(|n| toplevel_attr(fleet, n))
        .collect();
    let out = fleet
        .command("nix")
        .args(["build", "--no-link", "--json", "--max-jobs", "2"])
        .args(&attrs)
        .output()?;
    if !out.status.success() {
        bail!(
            "building the payload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let built: Value = serde_json::from_slice(&out.stdout).context("nix build --json")?;
    Ok(built
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some(b["outputs"]["out"].as_str()?.to_string()))
        .collect())
}

/// Builds the fleet's systems here (the payload once a run: the fleets of
/// every way evaluate to the same paths) before anything is timed, and
/// remembers their closures, to delete them at the end.
fn built(fleet: &Fleet, paths: &mut BTreeSet<String>) -> anyhow::Result<Vec<String>> {
    let toplevels = build_here(fleet)?;
    paths.extend(closure_of(fleet, &toplevels)?);
    Ok(toplevels)
}

/// One `nix-store` query over the toplevels' closures (the coordinator's store).
fn closure_of(fleet: &Fleet, toplevels: &[String]) -> anyhow::Result<Vec<String>> {
    let out = fleet
        .command("nix-store")
        .arg("-qR")
        .args(toplevels)
        .output()?;
    if !out.status.success() {
        bail!("nix-store -qR: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// The NAR size of one host's closure and its number of paths.
fn closure_size(fleet: &Fleet, toplevel: &str) -> anyhow::Result<(u64, usize)> {
    let out = fleet
        .command("nix")
        .args(["path-info", "--json", "--recursive", toplevel])
        .output()?;
    let infos: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("nix path-info: {}", String::from_utf8_lossy(&out.stderr)))?;
    let infos = infos.as_array().cloned().unwrap_or_default();
    let bytes = infos.iter().filter_map(|i| i["narSize"].as_u64()).sum();
    Ok((bytes, infos.len()))
}

/// Bytes the loopback interface transmitted so far (all connections, both
/// directions: every byte on `lo` is sent once).
fn loopback_tx_bytes() -> u64 {
    std::fs::read_to_string("/proc/net/dev")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.trim_start().starts_with("lo:"))?;
            let fields: Vec<&str> = line.split_once(':')?.1.split_whitespace().collect();
            fields.get(8)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Per connection (local, peer): the highest `bytes_acked` and
/// `bytes_received` seen.
type Counters = BTreeMap<(String, String), (u64, u64)>;

/// One `ss` sample of the client side of the connections to `addresses`' port 22.
fn sample_ss(addresses: &BTreeSet<String>, net: &str, counters: &mut Counters) {
    let Ok(out) = Command::new("ss")
        .args([
            "-tinH",
            "state",
            "connected",
            "dport",
            "=",
            ":22",
            "and",
            "dst",
            net,
        ])
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            // `STATE RECV-Q SEND-Q LOCAL PEER`
            let fields: Vec<&str> = line.split_whitespace().collect();
            current = (fields.len() >= 5)
                .then(|| (fields[3].to_string(), fields[4].to_string()))
                .filter(|(_, peer)| {
                    peer.rsplit_once(':')
                        .is_some_and(|(a, _)| addresses.contains(a))
                });
            continue;
        }
        let Some(key) = current.take() else {
            continue;
        };
        let value = |name: &str| {
            line.split_whitespace()
                .find_map(|t| t.strip_prefix(name)?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let entry = counters.entry(key).or_default();
        entry.0 = entry.0.max(value("bytes_acked:"));
        entry.1 = entry.1.max(value("bytes_received:"));
    }
}

/// Samples `ss` until stopped, then once more.
struct SshBytes {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Counters>,
}

impl SshBytes {
    fn start(fleet: &Fleet) -> SshBytes {
        let addresses: BTreeSet<String> = fleet
            .host_names()
            .iter()
            .map(|n| fleet.address(n))
            .collect();
        // Every host of a fleet is in one 127.A.B.0/24 block.
        let first = addresses.iter().next().cloned().unwrap_or_default();
        let net = format!("{}.0/24", first.rsplit_once('.').map_or("", |(n, _)| n));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut counters = Counters::new();
            while !flag.load(Ordering::SeqCst) {
                sample_ss(&addresses, &net, &mut counters);
                std::thread::sleep(Duration::from_millis(100));
            }
            sample_ss(&addresses, &net, &mut counters);
            counters
        });
        SshBytes { stop, thread }
    }

    /// Sent, received, connections.
    fn finish(self) -> (u64, u64, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let counters = self.thread.join().unwrap_or_default();
        let sent = counters.values().map(|c| c.0).sum();
        let received = counters.values().map(|c| c.1).sum();
        (sent, received, counters.len())
    }
}

/// What one way of deploying cost.
struct Way {
    wall: f64,
    sent: u64,
    received: u64,
    connections: usize,
    loopback: u64,
}

/// Deploys `fleet` (fresh hosts) with `extra` arguments, measuring the
/// coordinator's SSH bytes; every host must then run its toplevel.
fn deploy_way(bench: &Bench, fleet: &Fleet, extra: &[&str]) -> anyhow::Result<Way> {
    let state = tempfile::tempdir()?;
    let mut args = vec!["deploy", "--parallel", "--parallel-limit", "8"];
    args.extend(extra);
    let lo_before = loopback_tx_bytes();
    let counter = SshBytes::start(fleet);
    let run = bench.nix_deploy(fleet, state.path(), &args);
    let (sent, received, connections) = counter.finish();
    let loopback = loopback_tx_bytes().saturating_sub(lo_before);
    let run = run?;
    eprintln!(
        "closure {extra:?}: {:.1} s, coordinator sent {sent} B over {connections} connections",
        run.wall
    );
    for (name, toplevel) in fleet.toplevels()? {
        if fleet.current_system(&name).as_deref() != Some(toplevel.as_str()) {
            bail!("{extra:?}: {name} does not run {toplevel} after the deployment");
        }
    }
    Ok(Way {
        wall: run.wall,
        sent,
        received,
        connections,
        loopback,
    })
}

/// MB/s through SSH to each of `hosts` at once (`bytes` each, from
/// `/dev/zero` to `cat > /dev/null`), over a master connection opened first
/// for each host, as nix-deploy's copies go through its kept masters: the
/// handshakes are not timed.
fn ssh_throughput(fleet: &Fleet, hosts: &[String], bytes: u64) -> anyhow::Result<f64> {
    let sockets = tempfile::Builder::new().prefix("ndlink-").tempdir()?;
    let control = |host: &str| format!("ControlPath={}/{host}", sockets.path().display());
    let ssh = |host: &str| {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(fleet.ssh_config())
            .args(["-o", &control(host)])
            .stdin(Stdio::null());
        cmd
    };
    for host in hosts {
        let status = ssh(host)
            .args([
                "-o",
                "ControlMaster=yes",
                "-o",
                "ControlPersist=120",
                "-fN",
                host,
            ])
            .status()?;
        if !status.success() {
            bail!("{host}: opening an SSH master failed");
        }
    }
    let measured = timed(|| {
        let children = hosts
            .iter()
            .map(|host| {
                Command::new("sh")
                    .arg("-c")
                    .arg(r#"head -c "$1" /dev/zero | ssh -F "$2" -o "$3" "$4" 'cat > /dev/null'"#)
                    .arg("sh")
                    .arg(bytes.to_string())
                    .arg(fleet.ssh_config())
                    .arg(control(host))
                    .arg(host)
                    .stdin(Stdio::null())
                    .spawn()
            })
            .collect::<Result<Vec<_>, _>>()?;
        for mut child in children {
            if !child.wait()?.success() {
                bail!("piping {bytes} bytes through ssh failed");
            }
        }
        Ok(())
    });
    for host in hosts {
        let _ = ssh(host)
            .args(["-O", "exit", host])
            .stderr(Stdio::null())
            .status();
    }
    let seconds = measured?.max(1e-3);
    Ok((bytes * hosts.len() as u64) as f64 / seconds / 1e6)
}

/// `file://` cache of the toplevels' closures (uncompressed: the payload is
/// random), filled by the coordinator; returns the seconds it took.
fn fill_cache(fleet: &Fleet, cache: &str, toplevels: &[String]) -> anyhow::Result<f64> {
    timed(|| {
        let out = fleet
            .command("nix")
            .args(["copy", "--to", &format!("{cache}&compression=none")])
            .args(toplevels)
            .output()?;
        if !out.status.success() {
            bail!(
                "nix copy to the cache: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    })
}

pub(super) fn closure(bench: &mut Bench) -> anyhow::Result<()> {
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (paths, mean_bytes) = if bench.quick {
        (300, 100_000)
    } else {
        (2000, 100_000)
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let payload = Payload {
        paths,
        mean_bytes,
        seed: format!("{nanos:x}"),
    };
    let cache_dir = tempfile::Builder::new().prefix("ndclosure-").tempdir()?;
    // Hosts' nix reads it as the machine's /tmp (only /nix, /run and /root
    // are their own); unsigned, so trusted (no signatures required).
    let cache = format!("file://{}/cache?trusted=1", cache_dir.path().display());

    let mut built_paths = BTreeSet::new();
    let (mut push, mut substitute, mut on_target) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cache_fill, mut link_one, mut link_eight) = (Vec::new(), Vec::new(), Vec::new());
    let mut build_s = 0.0;
    let mut closure = (0, 0);
    let result = (|| -> anyhow::Result<()> {
        for round in 0..bench.repeats {
            // (1) Pushed from the coordinator.
            let fleet = payload_fleet(&payload, None)?;
            let started = Instant::now();
            let toplevels = built(&fleet, &mut built_paths)?;
            if round == 0 {
                build_s = started.elapsed().as_secs_f64();
                closure = closure_size(&fleet, &toplevels[0])?;
            }
            let names = fleet.host_names();
            let bytes: u64 = if bench.quick { 128 << 20 } else { 512 << 20 };
            link_one.push(ssh_throughput(&fleet, &names[..1], bytes)?);
            link_eight.push(ssh_throughput(&fleet, &names, bytes / 8)?);
            push.push(deploy_way(bench, &fleet, &["--no-substitute"])?);
            drop(fleet);

            // (2) Substituted by the hosts from the cache.
            let fleet = payload_fleet(&payload, Some(&cache))?;
            let toplevels = built(&fleet, &mut built_paths)?;
            cache_fill.push(fill_cache(&fleet, &cache, &toplevels)?);
            substitute.push(deploy_way(bench, &fleet, &[])?);
            drop(fleet);

            // (3) Built on target: once (8 hosts building 2,000
            // derivations each on these 2 cores take about 7 minutes).
            if round == 0 {
                let fleet = payload_fleet(&payload, None)?;
                built(&fleet, &mut built_paths)?;
                on_target.push(deploy_way(bench, &fleet, &["--build-on-target"])?);
            }
        }
        Ok(())
    })();
    // Leave nothing behind: the payload in the coordinator's store (the
    // fleets, their stores and the cache are gone with their directories).
    let removed = Command::new("nix-store")
        .env("NIX_CONFIG", nix_deploy_testkit::nix_config())
        .arg("--delete")
        .args(&built_paths)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    result?;

    let (closure_bytes, closure_paths) = closure;
    let hosts = 8.0;
    let link = median(link_eight.clone());
    let way = |ways: &[Way]| {
        let wall = median(ways.iter().map(|w| w.wall).collect());
        let throughput = closure_bytes as f64 * hosts / wall / 1e6;
        json!({
            "wall_s": wall,
            "coordinator_sent_bytes": median(ways.iter().map(|w| w.sent as f64).collect()),
            "coordinator_received_bytes": median(ways.iter().map(|w| w.received as f64).collect()),
            "ssh_connections": ways.iter().map(|w| w.connections).max(),
            "loopback_all_bytes": median(ways.iter().map(|w| w.loopback as f64).collect()),
            "effective_mb_s": throughput,
            "vs_link": throughput / link,
        })
    };
    let (push, substitute, on_target) = (way(&push), way(&substitute), way(&on_target));
    bench.record(
        "closure",
        json!({
            "hosts": hosts,
            "closure_paths": closure_paths,
            "closure_nar_bytes": closure_bytes,
            "coordinator_build_s": build_s,
            "link_one_stream_mb_s": median(link_one),
            "link_eight_streams_mb_s": link,
            "push_wall_s": push["wall_s"],
            "push_vs_link": push["vs_link"],
            "substitute_wall_s": substitute["wall_s"],
            "substitute_vs_link": substitute["vs_link"],
            "build_on_target_wall_s": on_target["wall_s"],
            "build_on_target_vs_link": on_target["vs_link"],
            "push_sent_mb": push["coordinator_sent_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            "substitute_sent_mb": substitute["coordinator_sent_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            "build_on_target_sent_mb": on_target["coordinator_sent_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            "closure_mb_times_hosts": closure_bytes as f64 * hosts / 1e6,
            "push": push,
            "substitute": substitute,
            "cache_fill_s": median(cache_fill),
            "build_on_target": on_target,
            "payload_removed_from_coordinator_store": removed,
            "bytes_counted_by": "ss -tin bytes_acked / bytes_received of the client side of connections to the hosts' port 22, sampled every 100 ms; loopback_all_bytes: /proc/net/dev lo tx over the deployment (every connection on the machine, both directions)",
            "load_average_before": load_before.trim(),
            "load_average_after": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        }),
    );
    Ok(())
}
