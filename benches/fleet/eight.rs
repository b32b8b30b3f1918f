//! (a) 8 changed hosts, (b) one host of a changed fleet and (c) a fleet
//! where nothing changed, each against a script doing colmena's steps, all
//! measured side by side in the same run on the same fleet.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::bail;
use nix_deploy_testkit::{Fleet, HostSpec};
use serde_json::{Value, json};

use super::{Bench, bump_all, median, nix_eval_fleet, ssh_once, timed};

/// (a) 8 hosts, each activation 1 s, 4 at a time: ours vs a plain script
/// doing build, copy, profile and switch (one host after another, and 4 at a
/// time) vs the activation-only bound: one `nix eval` of the fleet + one SSH
/// handshake and round trip (the probe) + 2 rounds of 1 s activations, all
/// measured in the same run without nix-deploy. (c) The median time of each
/// of our steps, and each host's pipeline time minus its 1 s switch.
pub(crate) fn eight_hosts(bench: &mut Bench) -> anyhow::Result<()> {
    let (n, limit, activation) = (8usize, 4usize, 1.0f64);
    let specs = (0..n)
        .map(|i| {
            let name = format!("e{i}");
            // A role per host, so smart adds no canary gates.
            HostSpec::new(&name)
                .role(&name)
                .activation_delay_ms((activation * 1000.0) as u64)
        })
        .collect();
    let mut fleet = Fleet::start(specs)?;
    let names = fleet.host_names();
    let state = tempfile::tempdir()?;
    bench.nix_deploy(&fleet, state.path(), &["deploy", "--parallel-limit", "8"])?;
    let limit_text = limit.to_string();
    let (mut ours, mut sequential, mut parallel) = (Vec::new(), Vec::new(), Vec::new());
    let (mut eval, mut handshake) = (Vec::new(), Vec::new());
    let (mut noop, mut reactivate) = (Vec::new(), Vec::new());
    let (mut one, mut one_script) = (Vec::new(), Vec::new());
    let mut steps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut gaps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let (mut overhead, mut between, mut startup) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..bench.repeats {
        bump_all(&mut fleet)?;
        let run = bench.nix_deploy(
            &fleet,
            state.path(),
            &["deploy", "--parallel-limit", &limit_text],
        )?;
        ours.push(run.wall);
        let report: Value = serde_json::from_str(&run.stdout).unwrap_or_default();
        // The last run's whole report, for a closer look at its timings.
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("eight_hosts_report.json"), &run.stdout)?;
        let created = report["created_at"].as_i64().unwrap_or(0);
        let mut first_start = i64::MAX;
        for h in report["hosts"].as_array().into_iter().flatten() {
            if let (Some(start), Some(end)) = (h["started_at"].as_i64(), h["finished_at"].as_i64())
            {
                overhead.push((end - start) as f64 / 1000.0 - activation);
                first_start = first_start.min(start);
                let in_steps: i64 = h["steps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|st| Some(st["finished_at"].as_i64()? - st["started_at"].as_i64()?))
                    .sum();
                between.push((end - start - in_steps) as f64 / 1000.0);
            }
            // What a host waits for before each step (the work beside a
            // step ends after it: the confirmation's handshake, the roots
            // and summary beside the copy).
            let mut previous_end = h["started_at"].as_i64();
            for step in h["steps"].as_array().into_iter().flatten() {
                if let (Some(name), Some(start), Some(before)) = (
                    step["step"].as_str(),
                    step["started_at"].as_i64(),
                    previous_end,
                ) {
                    gaps.entry(name.to_string())
                        .or_default()
                        .push((start - before) as f64 / 1000.0);
                }
                previous_end = step["finished_at"].as_i64();
            }
            for step in h["steps"].as_array().into_iter().flatten() {
                if let (Some(name), Some(start), Some(end)) = (
                    step["step"].as_str(),
                    step["started_at"].as_i64(),
                    step["finished_at"].as_i64(),
                ) {
                    steps
                        .entry(name.to_string())
                        .or_default()
                        .push((end - start) as f64 / 1000.0);
                }
            }
        }
        if first_start != i64::MAX && created > 0 {
            startup.push((first_start - created) as f64 / 1000.0);
        }
        bump_all(&mut fleet)?;
        sequential.push(timed(|| {
            for name in &names {
                plain_script(&fleet, name)?;
            }
            Ok(())
        })?);
        bump_all(&mut fleet)?;
        parallel.push(timed(|| {
            four_at_a_time(&names, limit, |name| plain_script(&fleet, name))
        })?);
        // (c) Nothing changed (the script above deployed the flake as it
        // is): ours against colmena's steps, which re-activate every host.
        noop.push(
            bench
                .nix_deploy(
                    &fleet,
                    state.path(),
                    &["deploy", "--parallel-limit", &limit_text],
                )?
                .wall,
        );
        reactivate.push(timed(|| {
            let toplevels = fleet.toplevels()?;
            four_at_a_time(&names, limit, |name| {
                reactivate_script(&fleet, name, &toplevels[name])
            })
        })?);
        // (b) One host, one new generation, in a fleet whose other hosts
        // changed too.
        bump_all(&mut fleet)?;
        one.push(
            bench
                .nix_deploy(&fleet, state.path(), &["deploy", &names[0]])?
                .wall,
        );
        bump_all(&mut fleet)?;
        one_script.push(timed(|| plain_script(&fleet, &names[0]))?);
        eval.push(timed(|| nix_eval_fleet(&fleet))?);
        handshake.push(timed(|| ssh_once(&fleet, &names[0]))?);
    }
    let (ours, sequential, parallel) = (median(ours), median(sequential), median(parallel));
    let (eval, handshake) = (median(eval), median(handshake));
    let (noop, reactivate) = (median(noop), median(reactivate));
    let (one, one_script) = (median(one), median(one_script));
    let rounds = n.div_ceil(limit) as f64;
    let bound = eval + handshake + rounds * activation;
    let step_medians: BTreeMap<String, f64> = steps
        .into_iter()
        .map(|(step, values)| (step, median(values)))
        .collect();
    let gap_medians: BTreeMap<String, f64> = gaps
        .into_iter()
        .map(|(step, values)| (step, median(values)))
        .collect();
    bench.record(
        "eight_hosts",
        json!({
            "hosts": n, "parallel_limit": limit, "activation_s": activation,
            "ours_s": ours,
            "plain_script_sequential_s": sequential,
            "plain_script_4_at_a_time_s": parallel,
            "activation_only_bound_s": bound,
            "bound_parts": { "nix_eval_s": eval, "ssh_handshake_and_round_trip_s": handshake, "activation_rounds": rounds },
            "ours_vs_bound": ours / bound,
            "sequential_script_vs_ours": sequential / ours,
            "parallel_script_vs_ours": parallel / ours,
            "per_host_overhead_median_s": median(overhead),
            "per_host_outside_steps_median_s": median(between),
            "until_first_host_starts_s": median(startup),
            "step_medians_s": step_medians,
            "wait_before_step_medians_s": gap_medians,
            "one_host_of_changed_fleet_s": one,
            "one_host_plain_script_s": one_script,
            "one_host_vs_script": one / one_script,
            "unchanged_fleet_s": noop,
            "unchanged_fleet_colmena_like_s": reactivate,
            "colmena_like_vs_unchanged": reactivate / noop,
            "load_average_after": load_average(),
            "target": "parallel_script_vs_ours >= 1.3; one_host_vs_script <= 1.0; colmena_like_vs_unchanged >= 10",
        }),
    );
    Ok(())
}

/// `nix build`, `nix copy`, `nix-env --set`, `switch-to-configuration`, `readlink`.
pub(crate) fn plain_script(fleet: &Fleet, host: &str) -> anyhow::Result<()> {
    let drv = {
        let out = fleet
            .command("nix")
            .args(["eval", "--raw"])
            .arg(format!(
                "{}#nixosConfigurations.{host}.config.system.build.toplevel.drvPath",
                fleet.flake_ref()
            ))
            .output()?;
        String::from_utf8(out.stdout)?
    };
    let script = format!(
        r#"set -e
out=$(nix build --no-link --json {drv} | sed 's/.*"out":"\([^"]*\)".*/\1/')
nix copy --to ssh://root@{host} "$out"
ssh -F {cfg} {host} nix-env -p /nix/var/nix/profiles/system --set "$out"
ssh -F {cfg} {host} "$out/bin/switch-to-configuration" switch
test "$(ssh -F {cfg} {host} readlink -f /run/current-system)" = "$out"
"#,
        cfg = fleet.ssh_config().display()
    );
    let status = fleet.command("sh").args(["-c", &script]).status()?;
    if !status.success() {
        bail!("the plain script failed");
    }
    Ok(())
}

/// colmena's steps for a host whose system is `toplevel`, built already:
/// `nix copy` (nothing to copy when nothing changed), `nix-env --set` and
/// `switch-to-configuration switch`, each over its own SSH connection.
fn reactivate_script(fleet: &Fleet, host: &str, toplevel: &str) -> anyhow::Result<()> {
    let script = format!(
        r#"set -e
nix copy --to ssh://root@{host} "$1"
ssh -F {cfg} {host} nix-env -p /nix/var/nix/profiles/system --set "$1"
ssh -F {cfg} {host} "$1/bin/switch-to-configuration" switch
"#,
        cfg = fleet.ssh_config().display()
    );
    let status = fleet
        .command("sh")
        .args(["-c", &script, "reactivate", toplevel])
        .status()?;
    if !status.success() {
        bail!("the re-activation script failed");
    }
    Ok(())
}

/// Run `work` for every name, `limit` at a time.
fn four_at_a_time(
    names: &[String],
    limit: usize,
    work: impl Fn(&str) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..limit)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(name) = names.get(i) else {
                            return Ok(());
                        };
                        work(name)?;
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("script worker")?;
        }
        Ok(())
    })
}

/// The 1-minute load average now, for the record.
pub(crate) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}
