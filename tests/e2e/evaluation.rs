//! Evaluation at fleet scale, against NixOS-shaped flakes (nixpkgs' own
//! `lib.evalModules`, from the testkit's vendored `fixtures/nixpkgs-lib.tar.xz`): the
//! project's module agrees with the inventory; shards; the evaluation cache
//! never serves a stale result; one host's error names it while the others
//! are planned; hosts are probed while the rest of the fleet evaluates.

use std::collections::BTreeMap;
use std::process::Command;

use nix_deploy_core::fleet::{CheckKind, Inventory};
use nix_deploy_core::source::FleetSource;
use nix_deploy_testkit::{HostSpec, NixosFlake, NixosShape};
use serde_json::Value;

use crate::helpers::{Harness, binary, host};

/// `nix eval --json FLAKE#nixosConfigurations --apply EXPR`, as a plain Nix
/// user would run it.
fn nix_eval(flake: &str, apply: &str) -> Value {
    crate::helpers::nix_eval(flake, "nixosConfigurations", apply)
}

/// The attributes the inventory accepts in `value`'s place, as its parser
/// lists them when it meets one it does not know.
fn accepted_attributes(make: impl Fn(Value) -> Value) -> Vec<String> {
    let json = serde_json::json!({ "h": make(serde_json::json!({ "zzUnknown": 1 })) });
    let error = Inventory::from_eval_json(FleetSource::Nixos, &json.to_string())
        .unwrap_err()
        .to_string();
    let list = error
        .split("expected one of ")
        .nth(1)
        .unwrap_or_else(|| panic!("{error}"));
    let mut names: Vec<String> = list
        .split(", ")
        .map(|n| n.trim().trim_matches('`').to_string())
        .collect();
    names.sort();
    names
}

const TOPLEVEL: &str = "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system";
const DRV: &str = "/nix/store/c7syrkx06plw1dwvs86ny93v9ivpjlw3-nixos-system.drv";

#[test]
fn the_module_and_the_inventory_agree_on_every_option_and_default() {
    let flake = NixosFlake::create(
        NixosShape::small(),
        vec![
            HostSpec::new("plain"),
            HostSpec::new("full")
                .role("infrastructure")
                .tags(&["monitoring", "eu"])
                .depends_on(&["plain"])
                .health_check(r#"{ service = "prometheus"; timeout = 5; }"#)
                .health_check(r#"{ http = "http://full:9090/-/healthy"; status = 204; body = "Healthy"; period = 3; }"#)
                .health_check(r#"{ command = "test -e /run/ok"; }"#)
                .rollback_on_failure(false)
                .deployment_extra(
                    r#"targetHost = "full.example.org"; targetUser = "deploy"; targetPort = 2222;
                       allowLocalDeployment = true; buildOnTarget = true; substituteOnDestination = false;
                       replaceUnknownProfiles = false; privilegeEscalationCommand = [ "doas" "--" ];
                       sshOptions = [ "-o" "ProxyJump=bastion" ];
                       keys.db = { keyFile = ./secret; user = "postgres"; };"#,
                ),
            // colmena's nullable options, null.
            HostSpec::new("local").deployment_extra("targetHost = null; targetUser = null;"),
        ],
    )
    .expect("writing the NixOS-shaped flake");
    let evaluated = nix_eval(
        &flake.flake_ref(),
        r#"configurations: builtins.mapAttrs (name: c: {
          deployment = c.config.deployment;
          options = builtins.attrNames c.options.deployment;
          checkOptions = builtins.filter (n: builtins.substring 0 1 n != "_")
            (builtins.attrNames (c.options.deployment.healthChecks.type.getSubOptions [ ]));
          keyOptions = builtins.filter (n: builtins.substring 0 1 n != "_")
            (builtins.attrNames (c.options.deployment.keys.type.getSubOptions [ ]));
        }) configurations"#,
    );

    // Every option the module declares is an attribute the inventory reads,
    // and the other way round; the same for health checks.
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = serde_json::from_value(v.clone()).unwrap();
        n.sort();
        n
    };
    assert_eq!(
        names(&evaluated["plain"]["options"]),
        accepted_attributes(
            |d| serde_json::json!({ "toplevel": TOPLEVEL, "drvPath": DRV, "deployment": d })
        )
    );
    assert_eq!(
        names(&evaluated["plain"]["checkOptions"]),
        accepted_attributes(|c| serde_json::json!({ "toplevel": TOPLEVEL, "drvPath": DRV, "deployment": { "healthChecks": [c] } }))
            .into_iter()
            // Aliases the inventory also accepts for `body`.
            .filter(|n| n != "bodyContains" && n != "contains")
            .collect::<Vec<_>>()
    );
    assert_eq!(
        names(&evaluated["plain"]["keyOptions"]),
        accepted_attributes(|k| serde_json::json!({ "toplevel": TOPLEVEL, "drvPath": DRV, "deployment": { "keys": { "k": k } } }))
            .into_iter()
            // What the fleet's evaluation puts in `text`'s place.
            .filter(|n| n != "hasText")
            .collect::<Vec<_>>()
    );

    // The module's `config.deployment`, through the inventory.
    let fleet: BTreeMap<&str, Value> = ["plain", "full", "local"]
        .into_iter()
        .map(|name| {
            (
                name,
                serde_json::json!({ "toplevel": TOPLEVEL, "drvPath": DRV,
                                    "deployment": evaluated[name]["deployment"] }),
            )
        })
        .collect();
    let inventory =
        Inventory::from_eval_json(FleetSource::Nixos, &serde_json::to_string(&fleet).unwrap())
            .unwrap_or_else(|e| panic!("the inventory refuses the module's output: {e}"));

    // Defaults: the module's are the inventory's own (an empty `deployment`).
    let bare = Inventory::from_eval_json(
        FleetSource::Nixos,
        &serde_json::json!({ "plain": { "toplevel": TOPLEVEL, "drvPath": DRV, "deployment": {} } })
            .to_string(),
    )
    .unwrap();
    assert_eq!(inventory.get("plain"), bare.get("plain"));

    // Every option set: each one arrives as written.
    let full = inventory.get("full").unwrap();
    assert_eq!(full.target.destination.as_deref(), Some("full.example.org"));
    assert_eq!(full.target.user.as_deref(), Some("deploy"));
    assert_eq!(full.target.port, Some(2222));
    assert!(full.allow_local_deployment && full.build_on_target);
    assert_eq!(full.substitute_on_destination, Some(false));
    assert!(!full.replace_unknown_profiles);
    assert_eq!(full.target.escalation, ["doas", "--"]);
    assert_eq!(full.target.ssh_options, ["-o", "ProxyJump=bastion"]);
    // A path-typed keyFile, as colmena takes it: the store copy of the
    // flake's source, read from there, with a warning.
    let key = &full.keys[0];
    assert!(key.in_store(), "{key:?}");
    assert!(
        matches!(&key.source, nix_deploy_core::keys::KeySource::File(p) if p.ends_with("/machines/secret")),
        "{key:?}"
    );
    assert!(full.warnings[0].contains("deployment.keys.db.keyFile"));
    let local = inventory.get("local").unwrap();
    assert_eq!(local.target.destination, None);
    assert_eq!(local.target.user, None);
    assert_eq!(full.role, "infrastructure");
    assert_eq!(full.tags, ["monitoring", "eu"]);
    assert_eq!(full.dependencies, ["plain"]);
    assert!(!full.rollback_on_failure);
    assert_eq!(full.health_checks.len(), 3);
    assert_eq!(
        full.health_checks[0].kind,
        CheckKind::Service {
            unit: "prometheus".into()
        }
    );
    assert_eq!(full.health_checks[0].timeout.as_secs(), 5);
    assert_eq!(
        full.health_checks[1].kind,
        CheckKind::Http {
            url: "http://full:9090/-/healthy".into(),
            status: 204,
            body_contains: Some("Healthy".into()),
        }
    );
    assert_eq!(full.health_checks[1].period.as_secs(), 3);
    assert_eq!(
        full.health_checks[2].kind,
        CheckKind::Command {
            command: "test -e /run/ok".into()
        }
    );
}

/// Each planned host's toplevel and whether it came from the cache.
fn planned(plan: &Value) -> BTreeMap<String, (String, bool)> {
    plan["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                (
                    h["target_path"].as_str().unwrap().to_string(),
                    h["eval_cached"].as_bool().expect("eval_cached"),
                ),
            )
        })
        .collect()
}

/// Plan (without building), check the result against a fresh `nix eval` of
/// the flake as it is now, and return the plan.
fn plan_matching_a_fresh_eval(h: &Harness, extra: &[&str]) -> Value {
    let mut args = vec!["plan", "--no-build"];
    args.extend_from_slice(extra);
    let (code, plan, stderr) = h.json(&args);
    assert_eq!(code, 0, "{plan:#}\n{stderr}");
    let fresh = h.fleet.toplevels().expect("a fresh nix eval");
    let ours: BTreeMap<String, String> = planned(&plan)
        .into_iter()
        .map(|(name, (path, _))| (name, path))
        .collect();
    assert_eq!(ours, fresh, "the plan's toplevels are a fresh evaluation's");
    plan
}

fn cached_hosts(plan: &Value) -> Vec<String> {
    planned(plan)
        .into_iter()
        .filter(|(_, (_, cached))| *cached)
        .map(|(name, _)| name)
        .collect()
}

fn nixos_harness(specs: Vec<HostSpec>, shape: NixosShape) -> Harness {
    let mut h = Harness::start(specs);
    h.fleet.use_nixos(shape).expect("a NixOS-shaped flake");
    h
}

#[test]
fn a_nixos_fleet_is_evaluated_in_shards_deployed_and_then_planned_from_the_cache() {
    let names = ["n1", "n2", "n3", "n4", "n5", "n6"];
    let h = nixos_harness(
        names.iter().map(|n| HostSpec::new(n)).collect(),
        NixosShape::small(),
    );
    let plan = plan_matching_a_fresh_eval(&h, &["--eval-workers", "2"]);
    let evaluation = &plan["evaluation"];
    assert_eq!(evaluation["hosts"], 6);
    assert_eq!(evaluation["evaluated"], 6);
    assert_eq!(evaluation["workers"], 2);
    // 6 hosts, 2 workers, 2 shards each: 3 shards of 2.
    assert_eq!(evaluation["hosts_per_shard"], 2);
    assert_eq!(evaluation["shards"], 3);
    assert!(cached_hosts(&plan).is_empty());
    assert!(evaluation["peak_shard_mib"].as_f64().unwrap() > 0.0);

    // The module-defined fleet deploys for real.
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let toplevels = h.fleet.toplevels().unwrap();
    for name in names {
        assert_eq!(h.fleet.current_system(name).as_ref(), toplevels.get(name));
    }
    let (_, shown, _) = h.json(&["show"]);
    let logged = shown["events"].to_string();
    assert!(
        logged.contains("evaluated 6 host(s), 6 from the cache"),
        "{logged}"
    );

    // Nothing changed: nothing is evaluated, the same results.
    let plan = plan_matching_a_fresh_eval(&h, &[]);
    assert_eq!(plan["evaluation"]["evaluated"], 0);
    assert_eq!(plan["evaluation"]["cache"], "used");
    assert_eq!(cached_hosts(&plan), names);
    assert_eq!(plan["skipped"].as_array().unwrap().len(), 6);
    let text = String::from_utf8_lossy(&h.run(&["plan", "--no-build"]).stdout).into_owned();
    assert!(
        text.contains("Evaluation: 6 host(s), 6 from the cache"),
        "{text}"
    );

    // --no-eval-cache evaluates everything again, to the same results.
    let plan = plan_matching_a_fresh_eval(&h, &["--no-eval-cache"]);
    assert_eq!(plan["evaluation"]["cache"], "bypassed");
    assert_eq!(plan["evaluation"]["evaluated"], 6);
    assert!(cached_hosts(&plan).is_empty());
}

#[test]
fn the_cache_never_serves_a_stale_result() {
    let mut h = nixos_harness(
        vec![HostSpec::new("a"), HostSpec::new("b"), HostSpec::new("c")],
        NixosShape::small(),
    );
    let first = plan_matching_a_fresh_eval(&h, &[]);
    assert!(cached_hosts(&first).is_empty());
    let again = plan_matching_a_fresh_eval(&h, &[]);
    assert_eq!(cached_hosts(&again), ["a", "b", "c"]);
    assert_eq!(planned(&again), {
        let mut p = planned(&first);
        p.values_mut().for_each(|v| v.1 = true);
        p
    });
    let toplevel = |plan: &Value, name: &str| host(plan, name)["target_path"].clone();

    // One host's file changes: the flake's hash changes, every host is
    // evaluated again; only that host's system differs.
    h.fleet.update("b", |s| s.bump()).unwrap();
    let changed_host = plan_matching_a_fresh_eval(&h, &[]);
    assert!(cached_hosts(&changed_host).is_empty());
    assert_ne!(toplevel(&changed_host, "b"), toplevel(&again, "b"));
    assert_eq!(toplevel(&changed_host, "a"), toplevel(&again, "a"));
    assert_eq!(
        cached_hosts(&plan_matching_a_fresh_eval(&h, &[])),
        ["a", "b", "c"]
    );

    // A file every host imports changes: every system differs.
    h.fleet
        .update_nixos(|shape| {
            shape.shared_module = r#"{ lib, ... }: { time.timeZone = "Europe/Paris"; }"#.into()
        })
        .unwrap();
    let changed_shared = plan_matching_a_fresh_eval(&h, &[]);
    assert!(cached_hosts(&changed_shared).is_empty());
    for name in ["a", "b", "c"] {
        assert_ne!(
            toplevel(&changed_shared, name),
            toplevel(&changed_host, name)
        );
    }

    // nixpkgs changes but the lock does not: the lock pins the old one, for
    // us as for nix eval (a fresh evaluation agrees), and the cache stays valid.
    let lib_version = |dir: &std::path::Path| dir.join("lib/.version");
    let nixpkgs = h.fleet.dir().join("nixpkgs-lib");
    std::fs::write(lib_version(&nixpkgs), "99.11").unwrap();
    let unlocked = plan_matching_a_fresh_eval(&h, &[]);
    assert_eq!(planned(&unlocked).len(), 3);
    assert_eq!(cached_hosts(&unlocked), ["a", "b", "c"]);
    assert_eq!(toplevel(&unlocked, "a"), toplevel(&changed_shared, "a"));

    // The lock changes (nix flake lock --update-input): every system differs.
    h.fleet.relock_nixos(|_| Ok(())).unwrap();
    let relocked = plan_matching_a_fresh_eval(&h, &[]);
    assert!(cached_hosts(&relocked).is_empty());
    for name in ["a", "b", "c"] {
        assert_ne!(toplevel(&relocked, name), toplevel(&changed_shared, name));
    }

    // Back to the earlier nixpkgs: the earlier systems again.
    std::fs::write(lib_version(&nixpkgs), "26.11").unwrap();
    h.fleet.relock_nixos(|_| Ok(())).unwrap();
    let back = plan_matching_a_fresh_eval(&h, &[]);
    for name in ["a", "b", "c"] {
        assert_eq!(toplevel(&back, name), toplevel(&changed_shared, name));
    }
}

#[test]
fn one_hosts_evaluation_error_names_it_while_the_others_are_planned() {
    let shape = NixosShape::small()
        // Caught by tryEval: its shard goes on, then it is evaluated alone.
        .host_module(
            "bad1",
            r#"{ lib, ... }: { networking.hostName = lib.mkForce (throw "bad1 is broken on purpose"); }"#,
        )
        // Not catchable: its shard fails and is split until it stands alone.
        .host_module(
            "bad2",
            r#"{ lib, ... }: { testkit.version = lib.mkForce (abort "bad2 aborts on purpose"); }"#,
        );
    let h = nixos_harness(
        vec![
            HostSpec::new("a"),
            HostSpec::new("bad1"),
            HostSpec::new("bad2"),
            HostSpec::new("c").depends_on(&["bad1"]),
            HostSpec::new("d"),
        ],
        shape,
    );
    // One worker: shards [a bad1 bad2] [c d]; the first fails as a whole.
    let (code, plan, stderr) = h.json(&["plan", "--no-build", "--eval-workers", "1"]);
    assert_eq!(code, 1, "{plan:#}\n{stderr}");
    // [a bad1 bad2] fails (bad2's abort), [a] and [bad1 bad2] are tried,
    // [bad1 bad2] fails again, each alone gives its error; then [c d].
    assert_eq!(plan["evaluation"]["shards"], 6, "{plan:#}");
    let failed = plan["evaluation"]["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 2, "{plan:#}");
    assert_eq!(failed[0]["host"], "bad1");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("bad1 is broken on purpose"),
        "{failed:#?}"
    );
    assert_eq!(failed[1]["host"], "bad2");
    assert!(
        failed[1]["error"]
            .as_str()
            .unwrap()
            .contains("bad2 aborts on purpose"),
        "{failed:#?}"
    );
    let fresh: BTreeMap<String, String> = serde_json::from_value(nix_eval(
        &h.fleet.flake_ref(),
        r#"cs: builtins.mapAttrs (n: c: c.config.system.build.toplevel.outPath)
             (builtins.intersectAttrs { a = 1; c = 1; d = 1; } cs)"#,
    ))
    .unwrap();
    let ours: BTreeMap<String, String> = planned(&plan)
        .into_iter()
        .map(|(n, (path, _))| (n, path))
        .collect();
    assert_eq!(
        ours, fresh,
        "the others are planned, from their own results"
    );
    assert_eq!(plan["to_deploy"], serde_json::json!(["a", "c", "d"]));
    let text = String::from_utf8_lossy(&h.run(&["plan", "--no-build"]).stdout).into_owned();
    assert!(text.contains("Could not be evaluated"), "{text}");
    assert!(
        text.contains("bad1: error: bad1 is broken on purpose"),
        "{text}"
    );

    // Results of the others were cached; the broken hosts are tried again.
    let (_, plan, _) = h.json(&["plan", "--no-build"]);
    assert_eq!(cached_hosts(&plan), ["a", "c", "d"]);
    assert_eq!(plan["evaluation"]["evaluated"], 2);

    // Deploying everything, or a host that depends on a broken one, is
    // refused before anything is touched, naming the broken hosts it needs:
    // every one for the whole fleet; for `c`, `bad1` (its metadata, which `c`
    // depends on, throws) but not `bad2`, whose system `c` does not need
    // (and which is therefore not evaluated); for a tag, every host whose
    // metadata (and so whose tags) is unknown.
    for (args, bad2_needed) in [
        (&[][..], true),
        (&["c"][..], false),
        (&["--on", "@web"][..], false),
    ] {
        let out = h.run(&[&["deploy"][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("bad1 is broken on purpose"), "{stderr}");
        assert_eq!(
            stderr.contains("bad2 aborts on purpose"),
            bad2_needed,
            "{args:?}: {stderr}"
        );
    }
    for name in ["a", "c", "d"] {
        assert_eq!(h.fleet.generation(name), None, "{name} was touched");
    }
    let (_, history, _) = h.json(&["history"]);
    assert!(history["deployments"].as_array().unwrap().is_empty());

    // A host that needs none of them is deployed: bad2's toplevel, which
    // fails, is not even evaluated (nor any but a's: 1 system).
    let (code, report, stderr) = h.deploy(&["a", "--no-eval-cache"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(h.fleet.generation("a"), Some(1));
    let (_, shown, _) = h.json(&["show"]);
    let events = shown["events"].to_string();
    assert!(
        events.contains("5 host(s), 5 evaluated (1 with their system)"),
        "{events}"
    );
}

#[test]
fn hosts_are_probed_while_the_rest_of_the_fleet_still_evaluates() {
    // `slow` cannot finish evaluating before `a` was probed: its evaluation
    // builds a derivation (import from derivation) that waits until ssh has
    // connected to `a` (a LocalCommand of `a`'s ssh config creates a file).
    // Without streaming, it would wait out its two minutes and fail.
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("a-was-probed");
    let wait = format!(
        "i=0; while [ ! -e {m} ]; do i=$((i+1)); if [ $i -gt 2400 ]; then echo 'a was never probed' >&2; exit 1; fi; /bin/sleep 0.05; done; echo ok > $out",
        m = marker.display()
    );
    let module = format!(
        r#"{{ lib, ... }}: {{
          networking.hostName = lib.mkForce (builtins.seq (builtins.readFile (builtins.derivation {{
            name = "wait-until-a-is-probed";
            system = {system};
            builder = "/bin/sh";
            args = [ "-c" {wait} ];
          }})) "slow");
        }}"#,
        system = nix_deploy_testkit::nix_string(&nix_deploy_testkit::nix_system()),
        wait = nix_deploy_testkit::nix_string(&wait),
    );
    let h = nixos_harness(
        vec![HostSpec::new("a"), HostSpec::new("slow")],
        NixosShape::small().host_module("slow", &module),
    );
    let mut ssh_config = std::fs::read_to_string(h.fleet.ssh_config()).unwrap();
    ssh_config.push_str(&format!(
        "Host a\n  PermitLocalCommand yes\n  LocalCommand /usr/bin/touch {}\n",
        marker.display()
    ));
    std::fs::write(h.fleet.ssh_config(), ssh_config).unwrap();

    let (code, plan, stderr) = h.json(&["plan", "--no-build", "--eval-workers", "2"]);
    assert_eq!(code, 0, "{plan:#}\n{stderr}");
    assert!(plan["evaluation"]["failed"].as_array().unwrap().is_empty());
    assert_eq!(plan["evaluation"]["shards"], 2);
    assert!(marker.exists());
    assert_eq!(planned(&plan).len(), 2);
}

#[test]
fn a_cycle_is_found_before_anything_is_recorded_or_touched() {
    let h = Harness::start(vec![
        HostSpec::new("x").depends_on(&["y"]),
        HostSpec::new("y").depends_on(&["x"]),
        HostSpec::new("z"),
    ]);
    let out = h.run(&["deploy", "--eval-workers", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cycle"), "{stderr}");
    for name in ["x", "y", "z"] {
        assert_eq!(h.fleet.generation(name), None);
        assert!(h.fleet.activations(name).is_empty());
    }
    // Hosts may have been probed (that changes nothing); nothing was recorded.
    let (_, status, _) = h.json(&["status"]);
    assert!(status["hosts"].as_array().unwrap().is_empty(), "{status:#}");
    let (_, history, _) = h.json(&["history"]);
    assert!(history["deployments"].as_array().unwrap().is_empty());
}

#[test]
fn eval_workers_must_be_a_positive_number() {
    let state = tempfile::tempdir().unwrap();
    for bad in ["0", "many", "257"] {
        let out = Command::new(binary())
            .arg("--state-dir")
            .arg(state.path())
            .args(["plan", "--eval-workers", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--eval-workers"), "{bad}: {stderr}");
    }
    assert_eq!(
        std::fs::read_dir(state.path()).unwrap().count(),
        0,
        "nothing was created"
    );
}
