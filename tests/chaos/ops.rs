//! The operations, each a small function against the [`World`]: what it
//! did, and which systems it planned for which host (what the invariants
//! allow a host to run or boot afterwards).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::generator::{Goal, HOSTS, Interrupt, Manual, Op, ServiceFault, Strategy};
use crate::world::{CONFIRM_TIMEOUT_SECS, CliRun, World, now};

/// What an operation did.
#[derive(Default)]
pub struct Outcome {
    /// The systems it planned, by host.
    pub planned: BTreeMap<String, BTreeSet<String>>,
    /// The deployment (or rollback, exec, upload-keys run) it recorded and
    /// that ran to its end, to be checked against the hosts.
    pub finished: Option<Value>,
    /// One line for the log.
    pub note: String,
    /// The coordinator hung past its deadline.
    pub hung: bool,
}

fn names(hosts: &[usize]) -> Vec<String> {
    hosts.iter().map(|&h| HOSTS[h].to_string()).collect()
}

fn selected(hosts: &[usize]) -> Vec<String> {
    if hosts.is_empty() {
        HOSTS.iter().map(|h| h.to_string()).collect()
    } else {
        names(hosts)
    }
}

fn code(run: &CliRun) -> String {
    match (run.killed, run.hung, run.code) {
        (true, _, _) => "killed".to_string(),
        (_, true, _) => "HUNG".to_string(),
        (_, _, Some(code)) => format!("exit {code}"),
        _ => "no exit code".to_string(),
    }
}

/// A one-line summary of a run's host results.
fn results(json: &Value) -> String {
    json["hosts"]
        .as_array()
        .map(|hosts| {
            hosts
                .iter()
                .map(|h| {
                    format!(
                        "{}={}",
                        h["name"].as_str().unwrap_or("?"),
                        h["status"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

pub fn apply(world: &mut World, op: &Op) -> Outcome {
    match op {
        Op::Deploy {
            hosts,
            goal,
            strategy,
            reboot,
            max_failures,
            interrupt,
        } => deploy(
            world,
            hosts,
            *goal,
            *strategy,
            *reboot,
            *max_failures,
            interrupt.as_ref(),
        ),
        Op::Resume => resume(world),
        Op::Rollback { host, back } => rollback(world, *host, *back),
        Op::Exec { hosts } => exec(world, hosts),
        Op::UploadKeys { hosts } => upload_keys(world, hosts),
        Op::Manual { host, what } => manual(world, *host, *what),
        Op::EditFlake { hosts } => {
            for &h in selected_indices(hosts).iter() {
                world.versions[h] += 1;
            }
            respec(world, &selected_indices(hosts))
        }
        Op::Service { host, fault } => {
            world.faults[*host] = *fault;
            if *fault != ServiceFault::Healthy {
                world.versions[*host] += 1;
            }
            respec(world, &[*host])
        }
        Op::SwapSsh { a, b } => {
            let note = match world.fleet.swap_ssh_addresses(HOSTS[*a], HOSTS[*b]) {
                Ok(()) => "swapped".to_string(),
                Err(e) => format!("could not swap: {e:#}"),
            };
            world.swapped = Some((HOSTS[*a].to_string(), HOSTS[*b].to_string()));
            Outcome {
                note,
                ..Outcome::default()
            }
        }
        Op::CorrectSsh => {
            let note = match world.fleet.correct_ssh_config() {
                Ok(()) => "corrected".to_string(),
                Err(e) => format!("could not correct: {e:#}"),
            };
            world.swapped = None;
            Outcome {
                note,
                ..Outcome::default()
            }
        }
        Op::Freeze { host } => {
            let note = result(world.fleet.freeze_host(HOSTS[*host]));
            world.down.insert(HOSTS[*host].to_string());
            Outcome {
                note,
                ..Outcome::default()
            }
        }
        Op::Thaw { host } => {
            let note = result(world.fleet.thaw_host(HOSTS[*host]));
            world.down.remove(HOSTS[*host]);
            Outcome {
                note,
                ..Outcome::default()
            }
        }
        Op::StopHost { host } => {
            let note = result(world.fleet.stop_host(HOSTS[*host]));
            killed(world, HOSTS[*host]);
            world.down.insert(HOSTS[*host].to_string());
            Outcome {
                note,
                ..Outcome::default()
            }
        }
        Op::StartHost { host } => {
            let note = result(world.fleet.start_host(HOSTS[*host]));
            killed(world, HOSTS[*host]);
            world.down.remove(HOSTS[*host]);
            Outcome {
                note,
                ..Outcome::default()
            }
        }
        Op::Reboot { host } => {
            let name = HOSTS[*host];
            let boot = world.observe(name).boot;
            let note = result(world.fleet.reboot_host(name));
            killed(world, name);
            world.stale.insert(name.to_string());
            let mut planned = BTreeMap::new();
            planned.insert(name.to_string(), boot.into_iter().collect());
            Outcome {
                note,
                planned,
                ..Outcome::default()
            }
        }
    }
}

fn selected_indices(hosts: &[usize]) -> Vec<usize> {
    if hosts.is_empty() {
        (0..HOSTS.len()).collect()
    } else {
        hosts.to_vec()
    }
}

fn result(r: anyhow::Result<()>) -> String {
    match r {
        Ok(()) => "done".to_string(),
        Err(e) => format!("failed: {e:#}"),
    }
}

/// Records that every process of `host` was just killed.
fn killed(world: &mut World, host: &str) {
    world.kills.entry(host.to_string()).or_default().push(now());
}

fn respec(world: &mut World, hosts: &[usize]) -> Outcome {
    let mut errors = Vec::new();
    for &h in hosts {
        if let Err(e) = world.respec(h) {
            errors.push(format!("{}: {e:#}", HOSTS[h]));
        }
    }
    let note = if errors.is_empty() {
        hosts
            .iter()
            .map(|&h| format!("{} v{} {:?}", HOSTS[h], world.versions[h], world.faults[h]))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        format!("flake edit failed: {}", errors.join("; "))
    };
    Outcome {
        note,
        ..Outcome::default()
    }
}

/// Options every deployment of the campaign takes: short waits, so a
/// watchdog decides within seconds and a slow service is waited for.
fn deploy_options() -> Vec<String> {
    [
        "--confirm-timeout",
        &CONFIRM_TIMEOUT_SECS.to_string(),
        "--health-timeout",
        "8",
        "--canary-soak",
        "1",
        "--reboot-timeout",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn deploy(
    world: &mut World,
    hosts: &[usize],
    goal: Goal,
    strategy: Strategy,
    reboot: bool,
    max_failures: u32,
    interrupt: Option<&Interrupt>,
) -> Outcome {
    let targets = selected(hosts);
    let mut args = vec!["deploy".to_string()];
    args.extend(names(hosts));
    args.extend(deploy_options());
    args.extend(["--strategy".into(), strategy.as_str().into()]);
    if strategy != Strategy::BlueGreen {
        args.extend(["--goal".into(), goal.as_str().into()]);
    }
    match strategy {
        Strategy::Rolling => args.extend(["--batch-size".into(), "2".into()]),
        Strategy::Canary => args.extend(["--canary".into(), targets[0].clone()]),
        _ => {}
    }
    if reboot {
        args.push("--reboot".into());
    }
    args.extend(["--max-failures".into(), max_failures.to_string()]);
    // A dry activation plans nothing: the host must run and boot what it did.
    let planned: BTreeMap<String, String> = if goal == Goal::DryActivate {
        BTreeMap::new()
    } else {
        targets
            .iter()
            .filter_map(|h| Some((h.clone(), world.toplevels.get(h)?.clone())))
            .collect()
    };
    let run = world.cli("deploy", &args, interrupt);
    finish(world, run, planned, true)
}

/// What every run that deploys (deploy, resume) ends with: the deployment
/// it recorded, the watchdogs a killed coordinator left, the hosts changed.
fn finish(world: &mut World, run: CliRun, planned: BTreeMap<String, String>, new: bool) -> Outcome {
    let id = match run.json["id"].as_i64() {
        Some(id) => Some(id),
        None => world.latest_deployment(),
    };
    if new && let Some(id) = id {
        // A refused deployment (busy, bad input) records nothing new.
        if !world.deployments.contains_key(&id) && run.code != Some(2) {
            world.deployments.insert(id, planned.clone());
            world.last_deployment = Some(id);
        }
    }
    let mut note = format!("{} #{} {}", code(&run), id.unwrap_or(0), results(&run.json));
    if run.cancelled {
        note.push_str(" (cancelled)");
    }
    if run.killed || run.hung {
        // Its hosts may change by themselves now (watchdogs): wait for them.
        for host in planned.keys() {
            world.stale.insert(host.clone());
        }
        let left = world.settle_watchdogs();
        if !left.is_empty() {
            note.push_str(&format!(", undecided on {left:?}"));
        }
    }
    let finished = (!run.killed && !run.hung && run.json.is_object()).then(|| run.json.clone());
    Outcome {
        planned: planned
            .into_iter()
            .map(|(h, p)| (h, BTreeSet::from([p])))
            .collect(),
        finished,
        note,
        hung: run.hung,
    }
}

fn resume(world: &mut World) -> Outcome {
    let Some(id) = world.last_deployment else {
        return Outcome {
            note: "nothing to resume".into(),
            ..Outcome::default()
        };
    };
    // Resuming deploys what the deployment planned, nothing else.
    let planned = world.deployments.get(&id).cloned().unwrap_or_default();
    let run = world.cli("resume", &["resume".into(), id.to_string()], None);
    finish(world, run, planned, false)
}

/// The generations of a host's profile, and the one the running system is.
fn generations(world: &World, host: &str) -> (Vec<u32>, Option<u32>, Option<u32>) {
    let gens = world.fleet.generations(host);
    let running = world.fleet.current_system(host);
    let running_gen = gens
        .iter()
        .rev()
        .find(|&&g| world.fleet.generation_path(host, g) == running)
        .copied();
    (gens, running_gen, world.fleet.generation(host))
}

fn rollback(world: &mut World, host: usize, back: Option<u32>) -> Outcome {
    let name = HOSTS[host];
    let (gens, running_gen, profile_gen) = generations(world, name);
    let mut args = vec!["rollback".to_string(), name.to_string()];
    let mut planned = BTreeSet::new();
    let path = |g: u32| world.fleet.generation_path(name, g);
    match back {
        Some(n) => {
            let current = profile_gen.unwrap_or(1);
            let target = gens
                .iter()
                .rev()
                .copied()
                .filter(|&g| g < current)
                .nth(n as usize - 1)
                .or(gens.first().copied())
                .unwrap_or(1);
            args.extend(["--to-generation".into(), target.to_string()]);
            planned.extend(path(target));
        }
        None => {
            // The newest generation before the current one: "current" is
            // the running system's generation, or the profile's.
            for current in [running_gen, profile_gen].into_iter().flatten() {
                if let Some(&g) = gens.iter().rev().find(|&&g| g < current) {
                    planned.extend(path(g));
                }
            }
        }
    }
    let run = world.cli("rollback", &args, None);
    let note = format!("{} {}", code(&run), results(&run.json));
    Outcome {
        planned: BTreeMap::from([(name.to_string(), planned)]),
        finished: (!run.hung && run.json.is_object()).then(|| run.json.clone()),
        note,
        hung: run.hung,
    }
}

fn exec(world: &mut World, hosts: &[usize]) -> Outcome {
    let mut args = vec!["exec".to_string()];
    args.extend(names(hosts));
    args.extend([
        "--timeout".into(),
        "20".into(),
        "--".into(),
        "cat".into(),
        "/run/testkit-host".into(),
    ]);
    let run = world.cli("exec", &args, None);
    Outcome {
        note: format!("{} {}", code(&run), results(&run.json)),
        finished: (!run.hung && run.json.is_object()).then(|| run.json.clone()),
        hung: run.hung,
        ..Outcome::default()
    }
}

fn upload_keys(world: &mut World, hosts: &[usize]) -> Outcome {
    let mut args = vec!["upload-keys".to_string()];
    args.extend(names(hosts));
    let run = world.cli("upload-keys", &args, None);
    Outcome {
        note: format!("{} {}", code(&run), results(&run.json)),
        finished: (!run.hung && run.json.is_object()).then(|| run.json.clone()),
        hung: run.hung,
        ..Outcome::default()
    }
}

/// What an operator does by hand over ssh (never through the coordinator).
fn manual(world: &mut World, host: usize, what: Manual) -> Outcome {
    let name = HOSTS[host];
    world.stale.insert(name.to_string());
    let (gens, _, profile_gen) = generations(world, name);
    let (target, result) = match what {
        Manual::Provision => {
            let target = world.toplevels.get(name).cloned();
            (target, world.fleet.provision(name).map(|_| ()))
        }
        Manual::Rollback | Manual::Generation(_) => {
            let back = match what {
                Manual::Generation(n) => n as usize,
                _ => 1,
            };
            let current = profile_gen.unwrap_or(1);
            let Some(g) = gens
                .iter()
                .rev()
                .copied()
                .filter(|&g| g < current)
                .nth(back - 1)
                .or(gens.first().copied())
            else {
                return Outcome {
                    note: "no generation".into(),
                    ..Outcome::default()
                };
            };
            let script = if what == Manual::Rollback {
                "nix-env -p /nix/var/nix/profiles/system --rollback && \
                 /nix/var/nix/profiles/system/bin/switch-to-configuration switch"
                    .to_string()
            } else {
                format!(
                    "nix-env -p /nix/var/nix/profiles/system --switch-generation {g} && \
                     /nix/var/nix/profiles/system-{g}-link/bin/switch-to-configuration switch"
                )
            };
            (
                world.fleet.generation_path(name, g),
                world.fleet.ssh(name, &script).map(|_| ()),
            )
        }
    };
    let note = match result {
        Ok(()) => format!("switched to {}", target.as_deref().unwrap_or("?")),
        Err(e) => format!("failed: {e:#}"),
    };
    Outcome {
        planned: BTreeMap::from([(name.to_string(), target.into_iter().collect())]),
        note,
        ..Outcome::default()
    }
}
