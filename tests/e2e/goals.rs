//! Deployment goals and reboots against real test hosts: what `switch`,
//! `boot`, `test` and `dry-activate` do to a host's profile, boot generation
//! and running system; reboots that come back on the new system (or go back
//! through the boot generation); reboots only where the kernel changed; GC
//! roots on the coordinator.

use nix_deploy_testkit::{HostSpec, UnitState};
use serde_json::Value;

use crate::helpers::{Harness, host, status};

fn steps(run: &Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap().to_string())
        .collect()
}

fn status_of<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status:#}"))
}

#[test]
fn boot_makes_the_new_generation_the_boot_default_without_activating_it() {
    let mut h = Harness::start(vec![HostSpec::new("g1").service("nginx")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let old = h.fleet.current_system("g1").unwrap();
    h.fleet.update("g1", |s| s.bump()).unwrap();
    let new = h.fleet.toplevel("g1").unwrap();

    let (code, report, stderr) = h.deploy(&["--goal", "boot"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(report["options"]["goal"], "boot");
    let run = host(&report, "g1");
    assert_eq!(status(&report, "g1"), "deployed");
    assert_eq!(run["goal"], "boot");
    assert_eq!(run["to"]["generation"], 2);
    // The profile (boot default) is the new system, which is not running.
    assert_eq!(h.fleet.generation("g1"), Some(2));
    assert_eq!(
        h.fleet.generation_path("g1", 2).as_deref(),
        Some(new.as_str())
    );
    assert_eq!(h.fleet.current_system("g1").as_deref(), Some(old.as_str()));
    assert_eq!(h.fleet.boots("g1"), vec![new.clone()]);
    assert_eq!(h.fleet.activations("g1").last().unwrap().action, "boot");
    assert!(!steps(run).contains(&"reboot".to_string()));

    // status and plan say it waits for a reboot.
    let (_, fleet, _) = h.json(&["status"]);
    let g1 = status_of(&fleet, "g1");
    assert_eq!(g1["pending_reboot"], true, "{g1:#}");
    assert_eq!(g1["boot_path"], new.as_str());
    assert_eq!(g1["current_path"], old.as_str());
    let text = String::from_utf8_lossy(&h.run(&["status"]).stdout).into_owned();
    assert!(text.contains("pending reboot"), "{text}");
    let (_, plan, _) = h.json(&["plan", "--no-build"]);
    assert_eq!(plan["pending_reboot"], serde_json::json!(["g1"]));
    let text = String::from_utf8_lossy(&h.run(&["plan", "--no-build"]).stdout).into_owned();
    assert!(text.contains("PENDING REBOOT"), "{text}");

    // A real reboot boots it; then nothing is pending any more.
    h.fleet.reboot_host("g1").unwrap();
    assert_eq!(h.fleet.current_system("g1").as_deref(), Some(new.as_str()));
    assert_eq!(h.fleet.unit_state("g1", "nginx"), "active");
    let (_, plan, _) = h.json(&["plan", "--no-build"]);
    assert_eq!(plan["pending_reboot"], serde_json::json!([]));
    assert_eq!(plan["skipped"], serde_json::json!(["g1"]));
}

#[test]
fn test_activates_without_touching_the_profile_and_is_gone_after_a_reboot() {
    let mut h = Harness::start(vec![HostSpec::new("t1")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let old = h.fleet.current_system("t1").unwrap();
    h.fleet.update("t1", |s| s.bump()).unwrap();
    let new = h.fleet.toplevel("t1").unwrap();
    let (code, report, stderr) = h.deploy(&["--goal", "test"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "t1"), "deployed");
    assert_eq!(
        steps(host(&report, "t1")),
        [
            "pre-flight",
            "build",
            "copy",
            "activate",
            "validate",
            "confirm"
        ]
    );
    assert_eq!(h.fleet.current_system("t1").as_deref(), Some(new.as_str()));
    assert_eq!(h.fleet.generations("t1"), vec![1], "no new generation");
    assert_eq!(h.fleet.activations("t1").last().unwrap().action, "test");
    h.fleet.reboot_host("t1").unwrap();
    assert_eq!(h.fleet.current_system("t1").as_deref(), Some(old.as_str()));

    // A failing test activation goes back with `test` too: profile untouched.
    h.fleet
        .update("t1", |s| {
            s.bump();
            s.fail_switch = true;
        })
        .unwrap();
    let (code, report, _) = h.deploy(&["--goal", "test"]);
    assert_eq!(code, 1);
    assert_eq!(status(&report, "t1"), "rolled-back", "{report:#}");
    assert_eq!(h.fleet.current_system("t1").as_deref(), Some(old.as_str()));
    assert_eq!(h.fleet.generations("t1"), vec![1]);
    assert_eq!(h.fleet.activations("t1").last().unwrap().action, "test");
}

#[test]
fn dry_activate_changes_nothing_and_keeps_what_would_change() {
    let mut h = Harness::start(vec![HostSpec::new("d1").service("nginx")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let old = h.fleet.current_system("d1").unwrap();
    h.fleet.update("d1", |s| s.bump()).unwrap();
    let new = h.fleet.toplevel("d1").unwrap();
    let (code, report, stderr) = h.deploy(&["--goal", "dry-activate"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let run = host(&report, "d1");
    assert_eq!(status(&report, "d1"), "succeeded", "{run:#}");
    assert_eq!(run["output"]["exit_code"], 0);
    assert!(
        run["output"]["stderr"]
            .as_str()
            .unwrap()
            .contains(&format!("would activate {new}")),
        "{run:#}"
    );
    assert!(!steps(run).contains(&"set-profile".to_string()));
    assert_eq!(h.fleet.current_system("d1").as_deref(), Some(old.as_str()));
    assert_eq!(h.fleet.generations("d1"), vec![1]);
    assert_eq!(
        h.fleet.activations("d1").last().unwrap().action,
        "dry-activate"
    );
    // The output is stored: `show` has it.
    let id = report["id"].as_i64().unwrap().to_string();
    let shown = String::from_utf8_lossy(&h.run(&["show", &id]).stdout).into_owned();
    assert!(shown.contains("dry-activate output"), "{shown}");
    // The host still counts as not deployed: a plan still wants it.
    let (_, plan, _) = h.json(&["plan", "--no-build"]);
    assert_eq!(plan["to_deploy"], serde_json::json!(["d1"]));
}

#[test]
fn goals_that_cannot_go_together_exit_2_and_touch_nothing() {
    let h = Harness::start(vec![HostSpec::new("n1")]);
    for (args, needle) in [
        (vec!["deploy", "--goal", "reboot"], "unknown goal"),
        (
            vec!["deploy", "--goal", "test", "--reboot"],
            "throws a test activation away",
        ),
        (
            vec!["deploy", "--goal", "dry-activate", "--reboot=auto"],
            "nothing new to boot",
        ),
        (
            vec!["deploy", "--strategy", "blue-green", "--goal", "boot"],
            "blue-green",
        ),
        (
            vec!["deploy", "--reboot=sometimes"],
            "always, auto or never",
        ),
    ] {
        let out = h.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    assert_eq!(h.fleet.generation("n1"), None);
    let (_, history, _) = h.json(&["history"]);
    assert_eq!(history["deployments"], Value::Array(Vec::new()));
}

#[test]
fn a_reboot_comes_back_with_a_new_boot_id_on_the_new_system_and_is_validated() {
    let mut h = Harness::start(vec![HostSpec::new("r1").service("nginx")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let boot_id = h.fleet.boot_id("r1").unwrap();
    h.fleet
        .update("r1", |s| {
            s.bump();
            s.kernel = "6.7.0".into();
        })
        .unwrap();
    let new = h.fleet.toplevel("r1").unwrap();
    let (code, report, stderr) =
        h.json_serving_reboots("boot-reboot", &["deploy", "--goal", "boot", "--reboot"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let run = host(&report, "r1");
    assert_eq!(status(&report, "r1"), "deployed");
    assert_eq!(
        steps(run),
        [
            "pre-flight",
            "build",
            "copy",
            "set-profile",
            "activate",
            "validate",
            "confirm",
            "reboot",
            "validate"
        ]
    );
    let new_boot_id = h.fleet.boot_id("r1").unwrap();
    assert_ne!(new_boot_id, boot_id);
    assert_eq!(run["reboot"]["boot_id_before"], boot_id.as_str());
    assert_eq!(run["reboot"]["boot_id_after"], new_boot_id.as_str());
    assert_eq!(run["reboot"]["system"], new.as_str());
    // Really rebooted into it: booted, running, units up, nothing pending.
    assert_eq!(h.fleet.reboots("r1"), vec![new.clone()]);
    assert_eq!(h.fleet.booted_system("r1").as_deref(), Some(new.as_str()));
    assert_eq!(h.fleet.current_system("r1").as_deref(), Some(new.as_str()));
    assert_eq!(h.fleet.unit_state("r1", "nginx"), "active");
    let (_, fleet, _) = h.json(&["status"]);
    let r1 = status_of(&fleet, "r1");
    assert_eq!(r1["pending_reboot"], false, "{r1:#}");
    assert_eq!(r1["current_path"], new.as_str());

    // `switch` then reboot works the same way.
    h.fleet.update("r1", |s| s.bump()).unwrap();
    let newer = h.fleet.toplevel("r1").unwrap();
    let (code, report, stderr) = h.json_serving_reboots("switch-reboot", &["deploy", "--reboot"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(h.fleet.reboots("r1"), vec![new, newer.clone()]);
    assert_eq!(h.fleet.current_system("r1"), Some(newer));
    assert_ne!(h.fleet.boot_id("r1").unwrap(), new_boot_id);
}

#[test]
fn a_new_system_that_fails_after_the_reboot_goes_back_through_the_boot_generation() {
    let mut h = Harness::start(vec![HostSpec::new("f1").service("api")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let old = h.fleet.current_system("f1").unwrap();
    // The new system's api never comes up; nothing shows before it boots.
    h.fleet
        .update("f1", |s| {
            s.bump();
            s.units = vec![("api".into(), UnitState::Failed)];
        })
        .unwrap();
    let new = h.fleet.toplevel("f1").unwrap();
    let (code, report, stderr) = h.json_serving_reboots(
        "fail-after-reboot",
        &[
            "deploy",
            "--goal",
            "boot",
            "--reboot",
            "--health-timeout",
            "3s",
        ],
    );
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    let run = host(&report, "f1");
    assert_eq!(status(&report, "f1"), "rolled-back", "{run:#}");
    let error = run["error"].as_str().unwrap();
    assert!(error.contains("service api"), "{error}");
    assert!(
        error.contains("rolled back through the boot generation to generation 1"),
        "{error}"
    );
    assert!(error.contains("rebooted into it"), "{error}");
    // Booted the new system, failed, booted the old one again.
    assert_eq!(h.fleet.reboots("f1"), vec![new, old.clone()]);
    assert_eq!(h.fleet.current_system("f1").as_deref(), Some(old.as_str()));
    assert_eq!(h.fleet.booted_system("f1").as_deref(), Some(old.as_str()));
    assert_eq!(
        h.fleet.generation("f1"),
        Some(1),
        "the old generation is the boot default"
    );
    assert_eq!(h.fleet.unit_state("f1", "api"), "active");
    assert!(h.consistent("f1"));
}

#[test]
fn reboot_auto_reboots_only_the_hosts_whose_kernel_changed() {
    let mut h = Harness::start(vec![HostSpec::new("k1"), HostSpec::new("k2")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let (k1_boot, k2_boot) = (
        h.fleet.boot_id("k1").unwrap(),
        h.fleet.boot_id("k2").unwrap(),
    );
    h.fleet
        .update("k1", |s| {
            s.bump();
            s.kernel = "6.8.2".into();
        })
        .unwrap();
    h.fleet.update("k2", |s| s.bump()).unwrap();
    // The plan says which ones need a reboot.
    let (code, plan, stderr) = h.json(&["plan"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(plan["reboot_required"], serde_json::json!(["k1"]));
    let text = String::from_utf8_lossy(&h.run(&["plan"]).stdout).into_owned();
    assert!(text.contains("REBOOT REQUIRED"), "{text}");

    let (code, report, stderr) = h.json_serving_reboots("auto", &["deploy", "--reboot=auto"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert!(steps(host(&report, "k1")).contains(&"reboot".to_string()));
    assert!(!steps(host(&report, "k2")).contains(&"reboot".to_string()));
    assert!(host(&report, "k2")["reboot"].is_null());
    assert_ne!(h.fleet.boot_id("k1").unwrap(), k1_boot);
    assert_eq!(h.fleet.boot_id("k2").unwrap(), k2_boot);
    assert_eq!(h.fleet.reboots("k1").len(), 1);
    assert!(h.fleet.reboots("k2").is_empty());
}

#[test]
fn deployed_toplevels_are_gc_roots_on_the_coordinator_pruned_per_host() {
    let mut h = Harness::start(vec![HostSpec::new("gc1").package("gcroot-marker-1.0")]);
    let mut deployed = Vec::new();
    for _ in 0..5 {
        assert_eq!(h.deploy(&[]).0, 0);
        deployed.push(h.fleet.current_system("gc1").unwrap());
        h.fleet.update("gc1", |s| s.bump()).unwrap();
    }
    let dir = h.state_dir().join("gcroots/gc1");
    let mut links: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            std::fs::read_link(e.unwrap().path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    links.sort();
    let mut newest: Vec<String> = deployed[2..].to_vec();
    newest.sort();
    assert_eq!(
        links, newest,
        "the three newest, the current and the previous among them"
    );
    // Nix knows them as roots: a collection on the coordinator keeps them.
    let roots = |path: &str| {
        let out = std::process::Command::new("nix-store")
            .args(["--query", "--roots", path])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for path in &deployed[2..] {
        assert!(
            roots(path).contains(&dir.to_string_lossy().into_owned()),
            "{path}"
        );
    }
    assert!(!roots(&deployed[0]).contains(&dir.to_string_lossy().into_owned()));
}

/// Issue 18's fault 9: `--reboot` of a host that is the coordinator's own
/// machine (its boot id is ours) is refused before anything on it is
/// touched, never after its activation.
#[test]
fn a_reboot_of_the_coordinators_own_machine_is_refused_before_touching_it() {
    let mut h = Harness::start(vec![HostSpec::new("self1"), HostSpec::new("other1")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let ours = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    std::fs::write(h.fleet.host_dir("self1").join("boot_id"), &ours).unwrap();
    for name in ["self1", "other1"] {
        h.fleet.update(name, |s| s.bump()).unwrap();
    }
    let before = h.fleet.current_system("self1");
    let activations = h.fleet.activations("self1").len();
    let (code, report, stderr) = h.json_serving_reboots(
        "self-reboot",
        &["deploy", "--reboot", "--max-failures", "1"],
    );
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "self1"), "failed", "{report:#}");
    let error = host(&report, "self1")["error"].as_str().unwrap_or_default();
    assert!(error.contains("coordinator's own boot id"), "{error}");
    assert_eq!(
        h.fleet.current_system("self1"),
        before,
        "nothing was activated"
    );
    assert_eq!(
        h.fleet.generation("self1"),
        Some(1),
        "the profile was not set"
    );
    assert_eq!(h.fleet.activations("self1").len(), activations);
    assert_eq!(status(&report, "other1"), "deployed", "{report:#}");
    assert_eq!(h.fleet.generation("other1"), Some(2));
}

/// Issue 18's fault 17: the system a host boots stays a GC root on the
/// coordinator, however many `--goal test` deployments come after it.
#[test]
fn the_boot_default_stays_a_gc_root_after_test_deployments() {
    let mut h = Harness::start(vec![HostSpec::new("gct")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let booted = h.fleet.current_system("gct").unwrap();
    for _ in 0..4 {
        h.fleet.update("gct", |s| s.bump()).unwrap();
        let (code, report, stderr) = h.deploy(&["--goal", "test"]);
        assert_eq!(code, 0, "{report:#}\n{stderr}");
    }
    assert_eq!(
        h.fleet.generation("gct"),
        Some(1),
        "test never sets the profile"
    );
    let dir = h.state_dir().join("gcroots/gct");
    let links: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            std::fs::read_link(e.unwrap().path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(
        links.contains(&booted),
        "the boot default was pruned: {links:?}"
    );
    let running = h.fleet.current_system("gct").unwrap();
    assert!(links.contains(&running), "{links:?}");
}
