//! Fleets as colmena's and deploy-rs's users write them, planned and
//! deployed unchanged: a colmena hive (`colmenaHive`, the testkit's
//! reproduction of colmena's `makeHive`) with colmena's `deployment.*` and
//! `meta`, and deploy-rs nodes (`deploy.nodes`, `activate.nixos` profiles)
//! with deploy-rs's settings, each meaning what it means there.

use std::collections::BTreeMap;
use std::process::Command;

use nix_deploy_testkit::{HostSpec, NixosShape, nix_config};

use crate::helpers::{Harness, nix_eval, status, unique_version};

/// Whether the coordinator's own store holds `path`.
fn coordinator_has(path: &str) -> bool {
    Command::new("nix")
        .env("NIX_CONFIG", nix_config())
        .args(["path-info", path])
        .output()
        .expect("running nix path-info")
        .status
        .success()
}

/// The results of the activations a host ran (`/run/nix-deploy/*.result`).
fn activation_results(h: &Harness, host: &str) -> Vec<String> {
    let dir = h.fleet.host_dir(host).join("run/nix-deploy");
    let mut results: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".result"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .map(|t| t.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    results.sort();
    results
}

#[test]
fn a_colmena_hive_is_planned_and_deployed_as_colmena_means_it() {
    let mut h = Harness::start(vec![
        HostSpec::new("c1").tags(&["web"]).deployment_extra(
            // A path-typed keyFile, as colmena takes it (a file of the flake).
            r#"keys.script = { keyFile = ../hosts/c1/switch-to-configuration.sh; permissions = "0640"; };"#,
        ),
        // A non-root user: colmena's privilegeEscalationCommand (sudo -H --).
        HostSpec::new("c2").tags(&["web"]).user("deploy"),
        // Not reached over SSH: only `apply-local` on itself deploys it.
        HostSpec::new("c3").deployment_extra("targetHost = null; allowLocalDeployment = true;"),
    ]);
    h.fleet
        .use_nixos(
            NixosShape::small()
                .colmena()
                .fleet_settings("{ allowApplyAll = false; }"),
        )
        .expect("a colmena hive");
    let flake = h.fleet.flake_ref();
    let toplevels: BTreeMap<String, String> = serde_json::from_value(nix_eval(
        &flake,
        "colmenaHive.toplevel",
        "builtins.mapAttrs (n: t: t.outPath)",
    ))
    .unwrap();

    // Planned from the hive, without naming hosts (a plan changes nothing).
    let (code, plan, stderr) = h.json(&["plan", "--no-build"]);
    assert_eq!(code, 0, "{plan:#}\n{stderr}");
    assert_eq!(plan["evaluation"]["source"], "colmena", "{plan:#}");
    assert_eq!(
        plan["to_deploy"],
        serde_json::json!(["c1", "c2"]),
        "{plan:#}"
    );

    // meta.allowApplyAll = false: a deployment names its hosts.
    let out = h.run(&["deploy"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("allowApplyAll"), "{stderr}");
    // targetHost = null: not deployed over SSH.
    let out = h.run(&["deploy", "c3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("targetHost is null"), "{stderr}");
    assert!(h.fleet.generations("c1").is_empty());

    let (code, report, stderr) = h.deploy(&["--on", "@web"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    for name in ["c1", "c2"] {
        assert_eq!(status(&report, name), "deployed", "{report:#}");
        assert_eq!(h.fleet.current_system(name).as_ref(), toplevels.get(name));
        assert_eq!(h.fleet.generation(name), Some(1));
    }
    assert_eq!(h.fleet.current_system("c3"), None);
    // The key came from the flake's file, as colmena reads it.
    let key = std::fs::read_to_string(h.fleet.host_dir("c1").join("run/keys/script")).unwrap();
    let source = std::fs::read_to_string(
        h.fleet
            .dir()
            .join("flake/hosts/c1/switch-to-configuration.sh"),
    )
    .unwrap();
    assert_eq!(key, source);
    let (_, shown, _) = h.json(&["show"]);
    let events = shown["events"].to_string();
    assert!(
        events.contains("deployment.keys.script.keyFile is in the Nix store"),
        "{events}"
    );

    // `eval`'s nodes are the hive's; `doctor` says where the fleet is, checks
    // c1 and says c3 is not reached over SSH.
    let (code, value, stderr) = h.json(&[
        "eval",
        "-E",
        "{ nodes, ... }: { names = builtins.attrNames nodes; \
         tags = nodes.c1.config.deployment.tags; }",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        value,
        serde_json::json!({ "names": ["c1", "c2", "c3"], "tags": ["web"] })
    );
    let (_, report, stderr) = h.json(&["doctor", "c1", "c3"]);
    let finding = |host: Option<&str>, check: &str| {
        report["findings"]
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|f| f["host"].as_str() == host && f["check"] == check)
            })
            .unwrap_or_else(|| panic!("no {check} finding: {report:#}\n{stderr}"))
            .clone()
    };
    let flake = finding(None, "flake");
    assert!(
        flake["detail"]
            .as_str()
            .is_some_and(|d| d.contains("3 host(s) in colmenaHive (colmena)")),
        "{flake:#}"
    );
    assert_eq!(finding(Some("c1"), "reachable")["verdict"], "ok");
    assert_eq!(finding(Some("c1"), "copy")["verdict"], "ok");
    let c3 = finding(Some("c3"), "reachable");
    assert!(
        c3["detail"].to_string().contains("targetHost is null"),
        "{c3:#}"
    );

    // One host of a changed fleet: its system alone is evaluated.
    h.fleet.update("c1", |s| s.bump()).unwrap();
    h.fleet.update("c2", |s| s.bump()).unwrap();
    let (code, report, stderr) = h.deploy(&["c1"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(h.fleet.generation("c1"), Some(2));
    assert_eq!(h.fleet.generation("c2"), Some(1));
    let (_, shown, _) = h.json(&["show"]);
    let events = shown["events"].to_string();
    assert!(
        events.contains("3 host(s), 3 evaluated (1 with their system)"),
        "{events}"
    );
}

#[test]
fn deploy_rs_nodes_are_deployed_with_deploy_rs_settings() {
    let mut h = Harness::start(vec![
        HostSpec::new("d1"),
        // magicRollback = false: activated without a watchdog, nothing to confirm.
        HostSpec::new("d2").deployment_extra("magicRollback = false; activationTimeout = 120;"),
        // remoteBuild: built on the host; the coordinator never holds it.
        HostSpec::new("d3")
            .version(unique_version())
            .deployment_extra("remoteBuild = true;"),
    ]);
    h.fleet
        .use_nixos(
            NixosShape::small()
                .deploy_rs()
                .fleet_settings(r#"{ sshUser = "root"; confirmTimeout = 20; }"#),
        )
        .expect("deploy-rs nodes");
    // What the hosts must run: the toplevels deploy-rs's profiles wrap.
    let toplevels = h.fleet.toplevels().unwrap();

    let (code, plan, stderr) = h.json(&["plan", "--no-build"]);
    assert_eq!(code, 0, "{plan:#}\n{stderr}");
    assert_eq!(plan["evaluation"]["source"], "deploy-rs", "{plan:#}");
    for name in ["d1", "d2", "d3"] {
        let planned = plan["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap();
        assert_eq!(
            planned["target_path"].as_str(),
            toplevels.get(name).map(String::as_str)
        );
    }

    // The same flake read as its nixosConfigurations, when asked; a source
    // it does not have is bad input.
    let (code, plan, stderr) = h.json(&["plan", "--no-build", "--source", "nixos"]);
    assert_eq!(code, 0, "{plan:#}\n{stderr}");
    assert_eq!(plan["evaluation"]["source"], "nixos", "{plan:#}");
    let out = h.run(&["plan", "--no-build", "--source", "colmena"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no `colmenaHive` output"), "{stderr}");

    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    for name in ["d1", "d2", "d3"] {
        assert_eq!(status(&report, name), "deployed", "{report:#}");
        assert_eq!(h.fleet.current_system(name).as_ref(), toplevels.get(name));
        assert_eq!(
            h.fleet.generation_path(name, 1).as_ref(),
            toplevels.get(name),
            "{name}'s profile points at what it runs"
        );
    }
    assert_eq!(activation_results(&h, "d1"), ["confirmed"]);
    assert_eq!(activation_results(&h, "d2"), ["no watchdog"]);
    assert!(coordinator_has(&toplevels["d1"]));
    assert!(
        !coordinator_has(&toplevels["d3"]),
        "d3 was built on the coordinator"
    );
    // Unchanged: nothing to do.
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert!(
        report["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|host| host["status"] == "skipped"),
        "{report:#}"
    );

    // `eval`'s nodes are deploy-rs's nodes (or, asked, the configurations).
    let names = "{ nodes, ... }: builtins.attrNames nodes";
    let (code, value, stderr) = h.json(&["eval", "-E", "{ nodes, ... }: nodes.d3.remoteBuild"]);
    assert_eq!((code, value), (0, serde_json::json!(true)), "{stderr}");
    let (code, value, stderr) = h.json(&["--source", "nixos", "eval", "-E", names]);
    assert_eq!(
        (code, value),
        (0, serde_json::json!(["d1", "d2", "d3"])),
        "{stderr}"
    );

    // d2's next switch fails: no watchdog takes it back (magic rollback is
    // off), the coordinator does, at once, to what it ran.
    h.fleet
        .update("d2", |s| {
            s.bump();
            s.fail_switch = true;
        })
        .unwrap();
    let (code, report, stderr) = h.deploy(&["d2"]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "d2"), "rolled-back", "{report:#}");
    assert_eq!(h.fleet.current_system("d2").as_ref(), toplevels.get("d2"));
    assert_eq!(h.fleet.generation("d2"), Some(1));
    assert_eq!(
        activation_results(&h, "d2"),
        ["no watchdog", "no watchdog", "restored 0"]
    );
}
