//! The invariants, each a function that reads the hosts themselves (their
//! `/run/current-system`, their profile's boot default, their activation
//! history on disk, their key files) and returns precise violations. What
//! cannot be checked in some state (a host that cannot be reached) is
//! counted as unchecked, never as passed.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use serde_json::Value;

use crate::generator::HOSTS;
use crate::ops::Outcome;
use crate::world::{Observed, World, key_name, key_spec, now};

/// One broken invariant.
#[derive(Clone, Debug)]
pub struct Violation {
    pub invariant: &'static str,
    pub host: String,
    pub detail: String,
}

/// Checks made, checks that could not be made, and what broke.
#[derive(Default)]
pub struct Tally {
    pub checked: BTreeMap<&'static str, u64>,
    pub unchecked: BTreeMap<&'static str, u64>,
    pub violations: Vec<Violation>,
}

impl Tally {
    fn pass(&mut self, invariant: &'static str) {
        *self.checked.entry(invariant).or_default() += 1;
    }

    fn skip(&mut self, invariant: &'static str) {
        *self.unchecked.entry(invariant).or_default() += 1;
    }

    fn fail(&mut self, invariant: &'static str, host: &str, detail: String) {
        *self.checked.entry(invariant).or_default() += 1;
        self.violations.push(Violation {
            invariant,
            host: host.to_string(),
            detail,
        });
    }

    /// One check: passes when `ok`, else fails with `detail`.
    fn check(
        &mut self,
        invariant: &'static str,
        host: &str,
        ok: bool,
        detail: impl FnOnce() -> String,
    ) {
        if ok {
            self.pass(invariant)
        } else {
            self.fail(invariant, host, detail())
        }
    }
}

/// A store path, shortened for messages: its name after the hash.
pub fn short(path: &Option<String>) -> String {
    match path {
        None => "nothing".to_string(),
        Some(p) => p
            .rsplit('/')
            .next()
            .and_then(|n| n.split_once('-'))
            .map(|(_, name)| name.to_string())
            .unwrap_or_else(|| p.clone()),
    }
}

fn shorts(paths: &BTreeSet<String>) -> String {
    let names: Vec<String> = paths.iter().map(|p| short(&Some(p.clone()))).collect();
    format!("{{{}}}", names.join(", "))
}

/// I1: every host runs the system it ran before the operation, or one the
/// operation planned for it (or one a watchdog still owed may go back to);
/// its boot default likewise.
pub fn i1(
    tally: &mut Tally,
    before: &BTreeMap<String, Observed>,
    after: &BTreeMap<String, Observed>,
    outcome: &Outcome,
    carry: &BTreeMap<String, BTreeSet<String>>,
) {
    for host in HOSTS {
        let mut allowed: BTreeSet<String> = outcome.planned.get(host).cloned().unwrap_or_default();
        allowed.extend(carry.get(host).cloned().unwrap_or_default());
        let (b, a) = (&before[host], &after[host]);
        for (what, was, is) in [
            ("runs", &b.running, &a.running),
            ("boots", &b.boot, &a.boot),
        ] {
            let ok = is == was || is.as_ref().is_some_and(|p| allowed.contains(p));
            tally.check("I1", host, ok, || {
                format!(
                    "{host} {what} {} (before: {}; planned: {})",
                    short(is),
                    short(was),
                    shorts(&allowed)
                )
            });
        }
    }
}

/// I3: no host ever ran (or was made to boot) a system that no operation
/// planned for it: every activation in its history since the last check.
pub fn i3(tally: &mut Tally, world: &mut World) {
    for host in HOSTS {
        let history = world.fleet.activation_history(host);
        let seen = world.i3_seen.get(host).copied().unwrap_or(0);
        let planned = world.ever_planned.get(host).cloned().unwrap_or_default();
        for entry in history.iter().skip(seen) {
            let act = &entry.activation;
            if act.action == "dry-activate" {
                continue;
            }
            tally.check("I3", host, planned.contains(&act.path), || {
                format!(
                    "{host} activated {} ({}, by {}) that no operation planned for it",
                    short(&Some(act.path.clone())),
                    act.action,
                    entry.by
                )
            });
        }
        world.i3_seen.insert(host.to_string(), history.len());
    }
}

/// I5: never two activations on one host at once. An activation without an
/// end ended when its host's processes were killed; one whose process is
/// gone without a kill has no known end (unchecked).
pub fn i5(tally: &mut Tally, world: &World) {
    for host in HOSTS {
        let kills = world.kills.get(host).cloned().unwrap_or_default();
        let mut spans: Vec<(f64, Option<f64>, String)> = Vec::new();
        for entry in world.fleet.activation_history(host) {
            let act = &entry.activation;
            let end = act.end.or_else(|| {
                kills.iter().copied().find(|&k| k >= act.start).or_else(|| {
                    std::path::Path::new(&format!("/proc/{}", entry.pid))
                        .exists()
                        .then(now)
                })
            });
            spans.push((
                act.start,
                end,
                format!("{} {}", act.action, short(&Some(act.path.clone()))),
            ));
        }
        spans.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut open: Option<(f64, String)> = None;
        for (start, end, what) in spans {
            match &open {
                Some((until, other)) if start < *until => {
                    tally.fail(
                        "I5",
                        host,
                        format!("{host}: {what} started while {other} ran"),
                    );
                }
                _ => tally.pass("I5"),
            }
            match end {
                Some(end) => {
                    if open.as_ref().is_none_or(|(until, _)| end > *until) {
                        open = Some((end, what));
                    }
                }
                None => tally.skip("I5"),
            }
        }
    }
}

fn owner_ids(user: &str, group: &str) -> (Option<u32>, Option<u32>) {
    let find = |file: &str, name: &str| {
        std::fs::read_to_string(file).ok().and_then(|text| {
            text.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.first() == Some(&name))
                    .then(|| f.get(2)?.parse().ok())
                    .flatten()
            })
        })
    };
    (find("/etc/passwd", user), find("/etc/group", group))
}

/// I4: every key is only on its own host, whole, with its configured owner
/// and mode. A key that is absent (never uploaded, or gone with a reboot's
/// `/run`) breaks nothing; one that a run reported uploaded must be there.
/// The keys kept for the way back (`.nix-deploy-undo`) are keys too: only
/// the host's own, whole, in root-only directories.
pub fn i4(tally: &mut Tally, world: &World, uploaded: &BTreeSet<String>) {
    i4_kept(tally, world);
    let texts: BTreeMap<String, BTreeSet<String>> = world.key_texts.clone();
    for (i, host) in HOSTS.iter().enumerate() {
        let dir = world.fleet.host_dir(host).join("run/keys");
        let own = key_name(host);
        let spec = key_spec(i);
        let (uid, gid) = owner_ids(spec.user, spec.group);
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).collect())
            .unwrap_or_default();
        if uploaded.contains(*host) {
            let there = entries
                .iter()
                .any(|e| e.file_name().to_string_lossy() == own);
            tally.check("I4", host, there, || {
                format!("{host}: its key {own} was reported uploaded but is not in /run/keys")
            });
        }
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let contents = std::fs::read_to_string(&path).unwrap_or_default();
            // Another host's secret, under any name, is a leak.
            for (other, other_texts) in &texts {
                if other != host && other_texts.contains(&contents) {
                    tally.fail(
                        "I4",
                        host,
                        format!("{host}: /run/keys/{name} holds {other}'s secret"),
                    );
                }
            }
            if name.starts_with('.') {
                // An upload's temporary file (root-only until renamed).
                continue;
            }
            if name != own {
                tally.fail(
                    "I4",
                    host,
                    format!("{host}: /run/keys/{name} is not one of its keys"),
                );
                continue;
            }
            let whole = texts.get(*host).is_some_and(|t| t.contains(&contents));
            tally.check("I4", host, whole, || {
                format!(
                    "{host}: /run/keys/{name} is not a whole key of its own: {:?}",
                    contents.chars().take(80).collect::<String>()
                )
            });
            match std::fs::metadata(&path) {
                Ok(meta) => {
                    let mode = meta.permissions().mode() & 0o7777;
                    let ok = mode == spec.mode
                        && uid.is_none_or(|u| u == meta.uid())
                        && gid.is_none_or(|g| g == meta.gid());
                    tally.check("I4", host, ok, || {
                        format!(
                            "{host}: /run/keys/{name} is {}:{} {:o}, configured {}:{} {:o}",
                            meta.uid(),
                            meta.gid(),
                            mode,
                            spec.user,
                            spec.group,
                            spec.mode
                        )
                    });
                }
                Err(e) => tally.fail("I4", host, format!("{host}: /run/keys/{name}: {e}")),
            }
        }
    }
}

/// I4 for the keys kept beside `/run/keys` for the way back: every
/// directory root's and `0700`, no other host's secret in any file, and
/// every kept key (in a set's `old/`) whole and the host's own.
fn i4_kept(tally: &mut Tally, world: &World) {
    let texts = &world.key_texts;
    for host in HOSTS {
        let root = world.fleet.host_dir(host).join("run/keys/.nix-deploy-undo");
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&dir) else {
                continue;
            };
            let mode = meta.permissions().mode() & 0o7777;
            tally.check(
                "I4",
                host,
                meta.is_dir() && mode == 0o700 && meta.uid() == 0,
                || {
                    format!(
                        "{host}: {} is not a root-only directory ({:o}, uid {})",
                        dir.display(),
                        mode,
                        meta.uid()
                    )
                },
            );
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let contents = std::fs::read_to_string(&path).unwrap_or_default();
                for (other, other_texts) in texts {
                    if other != host && other_texts.contains(&contents) {
                        tally.fail(
                            "I4",
                            host,
                            format!("{host}: {} holds {other}'s secret", path.display()),
                        );
                    }
                }
                if dir.file_name().is_some_and(|d| d == "old") {
                    let whole = texts.get(host).is_some_and(|t| t.contains(&contents));
                    tally.check("I4", host, whole, || {
                        format!("{host}: {} is not a whole key of its own", path.display())
                    });
                }
            }
        }
    }
}

/// The hosts a finished upload-keys or deployment reported keys uploaded to.
pub fn uploaded_keys(outcome: &Outcome) -> BTreeSet<String> {
    let Some(run) = &outcome.finished else {
        return BTreeSet::new();
    };
    if run["kind"] != "upload-keys" {
        return BTreeSet::new();
    }
    run["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| matches!(h["status"].as_str(), Some("deployed" | "succeeded")))
        .filter_map(|h| h["name"].as_str().map(str::to_string))
        .collect()
}

fn during_swap(world: &World) -> &'static str {
    if world.swapped.is_some() {
        " (while the ssh config is swapped)"
    } else {
        ""
    }
}

/// I2: what the coordinator reports equals what each host runs and boots:
/// the finished run's host results (`show`), `status`, the API's status
/// and deployment, and `plan` (probing every host).
pub fn i2(tally: &mut Tally, world: &mut World, outcome: &Outcome) {
    let after = world.observe_all();
    let swap = during_swap(world);
    if let Some(run) = &outcome.finished {
        i2_run(tally, world, run, &after, swap);
    }
    // status, before anything probes the hosts again.
    let status = world.read("status", &["status"]).json;
    let records: BTreeMap<String, Value> = status["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| Some((h["name"].as_str()?.to_string(), h.clone())))
        .collect();
    for host in HOSTS {
        if world.stale.contains(host) {
            tally.skip("I2");
            continue;
        }
        let Some(record) = records.get(host) else {
            tally.fail("I2", host, format!("status does not list {host}"));
            continue;
        };
        let seen = &after[host];
        let said = record["current_path"].as_str().map(str::to_string);
        tally.check("I2", host, said == seen.running, || {
            format!(
                "status says {host} runs {}, it runs {}{swap}",
                short(&said),
                short(&seen.running)
            )
        });
        let boot = record["boot_path"].as_str().map(str::to_string);
        if boot.is_some() {
            tally.check("I2", host, boot == seen.boot, || {
                format!(
                    "status says {host} boots {}, it boots {}{swap}",
                    short(&boot),
                    short(&seen.boot)
                )
            });
        }
        let pending = record["pending_reboot"].as_bool().unwrap_or(false);
        let truly = seen.running != seen.boot;
        tally.check("I2", host, pending == truly, || {
            format!(
                "status says {host} {} a reboot, it runs {} and boots {}{swap}",
                if pending { "awaits" } else { "awaits no" },
                short(&seen.running),
                short(&seen.boot)
            )
        });
        // Its last result is the one its last deployment recorded.
        if let (Some(id), Some(last)) = (
            record["last_deployment_id"].as_i64(),
            record["last_status"].as_str(),
        ) {
            let shown = world.read("show", &["show", &id.to_string()]).json;
            let in_run = shown["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|h| h["name"] == host)
                .and_then(|h| h["status"].as_str().map(str::to_string));
            tally.check("I2", host, in_run.as_deref() == Some(last), || {
                format!(
                    "status says {host}'s last result is {last}, deployment #{id} says {in_run:?}"
                )
            });
        }
    }
    // The API serves the same status as the CLI.
    match world.api("/api/v1/status") {
        Ok(api) => {
            let same = api["hosts"] == status["hosts"];
            tally.check("I2", "*", same, || {
                format!(
                    "the API's status differs from the CLI's:\nAPI: {}\nCLI: {}",
                    api["hosts"], status["hosts"]
                )
            });
        }
        Err(e) => tally.fail("I2", "*", format!("GET /api/v1/status failed: {e:#}")),
    }
    // plan probes every host.
    let plan = world.read("plan", &["plan"]).json;
    let unreachable: BTreeSet<String> = plan["unreachable"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str().map(str::to_string))
        .collect();
    let pending: BTreeSet<String> = plan["pending_reboot"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str().map(str::to_string))
        .collect();
    for host in HOSTS {
        let entry = plan["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h["name"] == host);
        let Some(entry) = entry.filter(|_| !unreachable.contains(host)) else {
            tally.skip("I2");
            continue;
        };
        // Observed again: a watchdog may have decided meanwhile.
        let seen = world.observe(host);
        let said = entry["current"]["path"].as_str().map(str::to_string);
        tally.check("I2", host, said == seen.running, || {
            format!(
                "plan says {host} runs {}, it runs {}{swap}",
                short(&said),
                short(&seen.running)
            )
        });
        let truly = seen.running != seen.boot && seen.boot.is_some();
        tally.check("I2", host, pending.contains(host) == truly, || {
            format!(
                "plan says {host} {} a reboot, it runs {} and boots {}{swap}",
                if pending.contains(host) {
                    "awaits"
                } else {
                    "awaits no"
                },
                short(&seen.running),
                short(&seen.boot)
            )
        });
        world.stale.remove(host);
    }
}

/// A finished run's report against the hosts: `show` of it, and the API's
/// copy of it; `exec` must have run on the host it names.
fn i2_run(
    tally: &mut Tally,
    world: &mut World,
    run: &Value,
    after: &BTreeMap<String, Observed>,
    swap: &str,
) {
    let Some(id) = run["id"].as_i64() else {
        return;
    };
    let shown = world.read("show", &["show", &id.to_string()]).json;
    match world.api(&format!("/api/v1/deployments/{id}")) {
        Ok(api) => {
            let key = |d: &Value| -> Vec<(Value, Value, Value)> {
                d["hosts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|h| {
                        (
                            h["name"].clone(),
                            h["status"].clone(),
                            h["to"]["path"].clone(),
                        )
                    })
                    .collect()
            };
            tally.check("I2", "*", key(&api) == key(&shown), || {
                format!("deployment #{id}: the API's host runs differ from show's")
            });
        }
        Err(e) => tally.fail(
            "I2",
            "*",
            format!("GET /api/v1/deployments/{id} failed: {e:#}"),
        ),
    }
    let kind = shown["kind"].as_str().unwrap_or("deploy").to_string();
    for h in shown["hosts"].as_array().into_iter().flatten() {
        let Some(host) = h["name"].as_str() else {
            continue;
        };
        let Some(seen) = after.get(host) else {
            continue;
        };
        let status = h["status"].as_str().unwrap_or("?");
        if kind == "exec" {
            if status == "succeeded" || status == "deployed" {
                let out = h["output"]["stdout"]
                    .as_str()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                tally.check("I2", host, out == host, || {
                    format!("exec #{id} on {host} ran on {out:?}'s machine{swap}")
                });
            }
            continue;
        }
        if kind != "deploy" {
            continue;
        }
        let to = h["to"]["path"].as_str().map(str::to_string);
        let from = h["from"]["path"].as_str().map(str::to_string);
        let goal = h["goal"].as_str().unwrap_or("switch");
        match status {
            "deployed" => {
                let (runs, boots) = match goal {
                    "boot" => (false, true),
                    "test" => (true, false),
                    "dry-activate" => (false, false),
                    _ => (true, true),
                };
                if runs {
                    tally.check("I2", host, seen.running == to, || {
                        format!(
                            "#{id} says {host} deployed {} ({goal}), it runs {}{swap}",
                            short(&to),
                            short(&seen.running)
                        )
                    });
                }
                if boots {
                    tally.check("I2", host, seen.boot == to, || {
                        format!(
                            "#{id} says {host} deployed {} ({goal}), it boots {}{swap}",
                            short(&to),
                            short(&seen.boot)
                        )
                    });
                }
            }
            "rolled-back" => {
                // A rollback on request goes to its target (`to`); a
                // deployment's way back to what the host ran (`from`).
                let back_to = if shown["strategy"] == "rollback" {
                    &to
                } else {
                    &from
                };
                tally.check("I2", host, seen.running == *back_to, || {
                    format!(
                        "#{id} says {host} rolled back to {}, it runs {}{swap}",
                        short(back_to),
                        short(&seen.running)
                    )
                });
            }
            _ => {}
        }
    }
}
