//! The randomized fault campaign: a small fleet of real test hosts (one
//! deployed as a non-root user through sudo) driven by a seeded random
//! sequence of operations — deployments with random goals, strategies and
//! interruptions (cancel, kill -9 at a chosen step), resume, rollback,
//! exec, upload-keys, an operator's switch by hand, flake edits, service
//! faults, ssh config mistakes, frozen, stopped and rebooted hosts — with
//! the invariants checked after every operation by reading the hosts
//! themselves (see `invariants`).
//!
//! - `generator`: the operations, pure and seeded (unit-tested);
//! - `ops`: each operation, a small function against the `world`;
//! - `world`: the fleet, the state directory, the daemon, the real binary;
//! - `invariants`: I1–I5, each returning precise violations;
//! - this file: the runner and its report.
//!
//! Environment: `NIX_DEPLOY_CHAOS_SEED` (one campaign with that seed: the
//! same operations with the same parameters; wall-clock races between the
//! coordinator and the hosts may still differ), `NIX_DEPLOY_CHAOS_STEPS`
//! (operations per campaign, default 12), `NIX_DEPLOY_CHAOS_DURATION` (run
//! campaigns with new seeds until this much time is spent, e.g. `30m`;
//! default: one campaign), `NIX_DEPLOY_CHAOS_KEEP` (keep the state
//! directories). `just chaos [DURATION]` runs a long one. Needs root.

// The test fleet and the programs that drive the real binary spawn processes
// themselves; the product does it only in `nix_deploy::process`.
#![allow(clippy::disallowed_methods)]

mod generator;
mod invariants;
mod ops;
mod world;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use generator::{Generator, Op};
use invariants::{Tally, Violation};
use world::World;

/// What one campaign found.
struct Campaign {
    seed: u64,
    steps: usize,
    tally: Tally,
    /// Violations with the step they were found at.
    found: Vec<(usize, Violation)>,
    ops: Vec<Op>,
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

fn fresh_seed() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
}

/// One campaign: the fleet, `steps` operations and then the recovery of
/// every host, the invariants after each.
fn campaign(seed: u64, steps: usize) -> Campaign {
    println!("chaos: seed {seed} ({steps} steps; NIX_DEPLOY_CHAOS_SEED={seed} reproduces it)");
    let mut world = World::start().expect("starting the campaign's fleet");
    let mut generator = Generator::new(seed);
    let mut result = Campaign {
        seed,
        steps: 0,
        tally: Tally::default(),
        found: Vec::new(),
        ops: Vec::new(),
    };
    let mut planned_ops: Vec<Op> = (0..steps).map(|_| generator.next_op()).collect();
    planned_ops.extend(generator.recovery());
    for (index, op) in planned_ops.into_iter().enumerate() {
        let step = index + 1;
        let started = Instant::now();
        let before = world.observe_all();
        let outcome = ops::apply(&mut world, &op);
        for (host, systems) in &outcome.planned {
            world
                .ever_planned
                .entry(host.clone())
                .or_default()
                .extend(systems.iter().cloned());
        }
        let after = world.observe_all();
        let mut tally = Tally::default();
        let carry = world.carry.clone();
        invariants::i1(&mut tally, &before, &after, &outcome, &carry);
        invariants::i3(&mut tally, &mut world);
        invariants::i5(&mut tally, &world);
        invariants::i4(&mut tally, &world, &invariants::uploaded_keys(&outcome));
        invariants::i2(&mut tally, &mut world, &outcome);
        if outcome.hung {
            tally.violations.push(Violation {
                invariant: "hang",
                host: "*".into(),
                detail: format!("the coordinator ran longer than {:?}", world::CLI_DEADLINE),
            });
        }
        // A watchdog still undecided may switch its host back later.
        for host in world.undecided() {
            let entry = world.carry.entry(host.clone()).or_default();
            entry.extend(before[&host].running.iter().cloned());
            entry.extend(before[&host].boot.iter().cloned());
            entry.extend(outcome.planned.get(&host).cloned().unwrap_or_default());
        }
        let undecided = world.undecided();
        world.carry.retain(|h, _| undecided.contains(h));
        let verdict = if tally.violations.is_empty() {
            "ok".to_string()
        } else {
            format!("{} VIOLATION(S)", tally.violations.len())
        };
        println!(
            "chaos: seed {seed} step {step} [{:.1}s] {op}\n         → {} — {verdict}",
            started.elapsed().as_secs_f64(),
            outcome.note
        );
        for v in &tally.violations {
            println!("         ✗ {}: {}", v.invariant, v.detail);
        }
        result.ops.push(op);
        result.steps += 1;
        for (k, n) in tally.checked {
            *result.tally.checked.entry(k).or_default() += n;
        }
        for (k, n) in tally.unchecked {
            *result.tally.unchecked.entry(k).or_default() += n;
        }
        result
            .found
            .extend(tally.violations.into_iter().map(|v| (step, v)));
    }
    result
}

fn report(campaigns: &[Campaign], elapsed: Duration) -> String {
    let mut out = String::new();
    let steps: usize = campaigns.iter().map(|c| c.steps).sum();
    let mut checked: BTreeMap<&str, u64> = BTreeMap::new();
    let mut unchecked: BTreeMap<&str, u64> = BTreeMap::new();
    for c in campaigns {
        for (k, n) in &c.tally.checked {
            *checked.entry(k).or_default() += n;
        }
        for (k, n) in &c.tally.unchecked {
            *unchecked.entry(k).or_default() += n;
        }
    }
    out.push_str(&format!(
        "\nchaos: {} campaign(s), {steps} steps in {:.0}s; seeds: {}\n",
        campaigns.len(),
        elapsed.as_secs_f64(),
        campaigns
            .iter()
            .map(|c| c.seed.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for inv in ["I1", "I2", "I3", "I4", "I5"] {
        out.push_str(&format!(
            "chaos: {inv}: {} checks, {} could not be checked\n",
            checked.get(inv).unwrap_or(&0),
            unchecked.get(inv).unwrap_or(&0)
        ));
    }
    for c in campaigns {
        if c.found.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\nchaos: seed {} found {} violation(s):\n",
            c.seed,
            c.found.len()
        ));
        let mut shown_up_to = 0;
        for (step, v) in &c.found {
            if *step > shown_up_to {
                out.push_str(&format!("  after the steps leading to step {step}:\n"));
                for (i, op) in c.ops.iter().enumerate().take(*step) {
                    out.push_str(&format!("    {:>3}. {op}\n", i + 1));
                }
                shown_up_to = *step;
            }
            out.push_str(&format!(
                "  ✗ step {step} {} [{}]: {}\n",
                v.invariant, v.host, v.detail
            ));
        }
    }
    out
}

#[test]
fn the_invariants_hold_under_a_random_fault_campaign() {
    let steps = env_u64("NIX_DEPLOY_CHAOS_STEPS").unwrap_or(12) as usize;
    let budget = std::env::var("NIX_DEPLOY_CHAOS_DURATION").ok().map(|d| {
        humantime::parse_duration(d.trim())
            .unwrap_or_else(|e| panic!("NIX_DEPLOY_CHAOS_DURATION={d:?}: {e}"))
    });
    let start = Instant::now();
    let mut campaigns = Vec::new();
    match env_u64("NIX_DEPLOY_CHAOS_SEED") {
        Some(seed) => campaigns.push(campaign(seed, steps)),
        None => loop {
            campaigns.push(campaign(fresh_seed(), steps));
            if budget.is_none_or(|b| start.elapsed() >= b) {
                break;
            }
        },
    }
    let text = report(&campaigns, start.elapsed());
    println!("{text}");
    let violations: usize = campaigns.iter().map(|c| c.found.len()).sum();
    assert_eq!(violations, 0, "the campaign found violations:{text}");
}
