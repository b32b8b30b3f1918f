//! Faults the randomized fault campaign (`tests/chaos`) found, each as a
//! plain deterministic test: the shortest sequence of operations that shows
//! it, and the campaign's invariant it breaks (I1: a host runs and boots
//! only what it ran or what was planned for it; I2: what the coordinator
//! reports is what each host runs and boots; I3: no host ever ran a system
//! nobody planned for it).

use nix_deploy_testkit::{HostSpec, UnitState};
use serde_json::Value;

use crate::helpers::{Harness, host, status};

/// Waits until no activation on `name` waits for a decision any more: its
/// watchdog (if any) decided, and switched back if it did.
fn watchdogs_decided(h: &Harness, name: &str) {
    let dir = h.fleet.host_dir(name).join("run/nix-deploy");
    h.until(60, &format!("{name}'s watchdogs to decide"), || {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return true;
        };
        entries.filter_map(|e| e.ok()).all(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(token) = name.strip_suffix(".pid") else {
                return true;
            };
            let result =
                std::fs::read_to_string(dir.join(format!("{token}.result"))).unwrap_or_default();
            dir.join(format!("{token}.decision")).exists() && result.trim() != "reverting"
        })
    });
}

/// The system generation `g` of a host is.
fn generation(h: &Harness, name: &str, g: u32) -> Option<String> {
    h.fleet.generation_path(name, g)
}

/// What the host boots: its profile's generation.
fn boot_default(h: &Harness, name: &str) -> Option<String> {
    h.fleet
        .generation(name)
        .and_then(|g| generation(h, name, g))
}

/// Systems the host ever activated (switch or test), from its history.
fn activated(h: &Harness, name: &str) -> Vec<String> {
    h.fleet
        .activation_history(name)
        .into_iter()
        .filter(|e| matches!(e.activation.action.as_str(), "switch" | "test"))
        .map(|e| e.activation.path)
        .collect()
}

fn status_record(h: &Harness, name: &str) -> Value {
    let (code, status, stderr) = h.json(&["status"]);
    assert_eq!(code, 0, "{stderr}");
    status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status:#}"))
        .clone()
}

/// Campaign seed 1796407140752257746, step 4 (I2): with two hosts' addresses
/// swapped in the ssh config while masters to the right machines are kept,
/// the activation goes through h1's kept master to h1's machine, but the
/// confirmation's new connection reaches h2's machine, where `mkdir
/// TOKEN.decision` succeeds for an activation it never had. The deployment
/// reports h1 `deployed`; h1's own watchdog, never confirmed, switches it
/// back: h1 does not run what the report and `status` say.
#[test]
fn a_confirmation_never_reaches_another_machine_than_the_activation() {
    let mut h = Harness::start(vec![HostSpec::new("s1"), HostSpec::new("s2")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let first = h.fleet.current_system("s1");
    h.fleet.update("s1", |s| s.bump()).unwrap();
    h.fleet.swap_ssh_addresses("s1", "s2").unwrap();
    let (_, report, stderr) = h.deploy(&["s1", "--confirm-timeout", "3"]);
    watchdogs_decided(&h, "s1");
    let running = h.fleet.current_system("s1");
    if status(&report, "s1") == "deployed" {
        assert_eq!(
            running.as_deref(),
            host(&report, "s1")["to"]["path"].as_str(),
            "s1 is reported deployed but its watchdog switched it back to {first:?}: \
             the confirmation went to s2's machine\n{report:#}\n{stderr}"
        );
    }
    let record = status_record(&h, "s1");
    assert_eq!(
        record["current_path"].as_str(),
        running.as_deref(),
        "status: {record:#}"
    );
    // And s2's machine never ran s1's system.
    let s1_new = h.fleet.toplevel("s1").unwrap();
    assert!(!activated(&h, "s2").contains(&s1_new));
}

/// Issue 18's fault 1 as the campaign's I3 sees it: swap two hosts'
/// addresses, run a command (its masters are kept, to the wrong machines),
/// correct the ssh config, deploy h1: h1's new system must go to h1's
/// machine, and h2's machine must never run it.
#[test]
fn after_the_ssh_config_is_corrected_a_deployment_goes_to_the_right_machine() {
    let h = Harness::start(vec![HostSpec::new("w1"), HostSpec::new("w2")]);
    let out = h.run(&["--ssh-keep-alive", "0", "deploy"]);
    assert_eq!(out.status.code(), Some(0));
    h.fleet.swap_ssh_addresses("w1", "w2").unwrap();
    // Any command while the config is wrong (its masters are kept).
    let (_, exec, _) = h.json(&["exec", "w1", "--", "cat", "/run/testkit-host"]);
    h.fleet.correct_ssh_config().unwrap();
    let mut h = h;
    h.fleet.update("w1", |s| s.bump()).unwrap();
    let new = h.fleet.toplevel("w1").unwrap();
    let (_, report, stderr) = h.deploy(&["w1", "--confirm-timeout", "3"]);
    watchdogs_decided(&h, "w1");
    watchdogs_decided(&h, "w2");
    assert!(
        !activated(&h, "w2").contains(&new),
        "w1's system was activated on w2's machine: {report:#}\n{stderr}"
    );
    if status(&report, "w1") == "deployed" {
        assert_eq!(h.fleet.current_system("w1"), Some(new), "{report:#}");
    }
    // And the command run while the config was wrong either refused or ran
    // on w1's machine, never reporting another machine's output as w1's.
    if status(&exec, "w1") == "succeeded" {
        assert_eq!(host(&exec, "w1")["output"]["stdout"], "w1", "{exec:#}");
    }
}

/// A host that runs g1 and was staged to boot g2 (`--goal boot`).
fn staged_to_boot(name: &str, change: impl Fn(&mut HostSpec)) -> Harness {
    let mut h = Harness::start(vec![HostSpec::new(name).service("app")]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet.update(name, |s| s.bump()).unwrap();
    let (code, report, stderr) = h.deploy(&["--goal", "boot"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(h.fleet.current_system(name), generation(&h, name, 1));
    assert_eq!(boot_default(&h, name), generation(&h, name, 2));
    h.fleet
        .update(name, |s| {
            s.bump();
            change(s);
        })
        .unwrap();
    h
}

/// Campaign seed 1796407140752257746, step 28 (I1), by the coordinator's
/// way back: a host runs g1 and boots g2 (`--goal boot`); a switch to g3
/// fails; "rolling back" switches it live to its profile's previous
/// generation g2, a system nobody asked it to run. The way back restores
/// both: it runs g1 and boots g2.
#[test]
fn a_failed_switch_puts_back_the_running_system_not_the_staged_one() {
    let h = staged_to_boot("fb", |s| s.fail_switch = true);
    let (code, report, stderr) = h.deploy(&["--confirm-timeout", "3"]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    watchdogs_decided(&h, "fb");
    let g1 = generation(&h, "fb", 1);
    let g2 = generation(&h, "fb", 2);
    assert_eq!(
        h.fleet.current_system("fb"),
        g1,
        "runs g2, staged for boot only: {report:#}"
    );
    assert_eq!(boot_default(&h, "fb"), g2, "{report:#}");
    assert!(
        !activated(&h, "fb").contains(&g2.clone().unwrap()),
        "g2 was never to run before a reboot: {report:#}"
    );
}

/// Campaign seed 1796407140752257746, step 28 (I1), by the watchdog: the
/// same host, the coordinator killed while it validates g3; the watchdog
/// switches back to the profile's previous generation, g2, instead of the
/// running g1.
#[test]
fn a_watchdog_puts_back_the_running_system_not_the_staged_one() {
    let h = staged_to_boot("fw", |s| {
        s.units = vec![("app".to_string(), UnitState::Failed)];
    });
    let mut child = h.spawn(
        "deploy",
        &["deploy", "--confirm-timeout", "3", "--health-timeout", "60"],
    );
    h.until(60, "the coordinator to validate g3", || {
        std::fs::read_to_string(h.state_dir().join("deploy.err"))
            .is_ok_and(|e| e.contains("fw: validating"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // Its watchdog decides once the confirm timeout passed unextended.
    watchdogs_decided(&h, "fw");
    assert_eq!(h.fleet.current_system("fw"), generation(&h, "fw", 1));
    assert_eq!(boot_default(&h, "fw"), generation(&h, "fw", 2));
}

/// Campaign seed 1796405269095369965, step 27 (I2): a host staged to boot
/// g2, whose switch fails, deployed with `switch`: the activation of g2
/// fails, and the way back to "the previous generation" is g2 itself; the
/// host runs g2, reported `rollback-failed`, while `status` keeps saying it
/// runs g1 and awaits a reboot.
#[test]
fn a_host_whose_way_back_failed_is_reported_running_what_it_runs() {
    let mut h = Harness::start(vec![HostSpec::new("rf").service("app")]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("rf", |s| {
            s.bump();
            s.fail_switch = true;
        })
        .unwrap();
    let (code, report, stderr) = h.deploy(&["--goal", "boot"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let (_, report, stderr) = h.deploy(&["--confirm-timeout", "3"]);
    watchdogs_decided(&h, "rf");
    let record = status_record(&h, "rf");
    let running = h.fleet.current_system("rf");
    assert_eq!(
        record["current_path"].as_str(),
        running.as_deref(),
        "status: {record:#}\nreport: {report:#}\n{stderr}"
    );
    assert_eq!(
        record["pending_reboot"].as_bool(),
        Some(running != boot_default(&h, "rf")),
        "status: {record:#}"
    );
}

/// Campaign seed 1796405269095369965, step 16 (I2), issue 18's fault 18:
/// a deployment aborts (one host fails, `--max-failures 0`), so a host it
/// had already deployed is rolled back to g1 (running and boot default);
/// `status` then claims that host boots g2 and awaits a reboot.
#[test]
fn after_an_aborted_deployment_status_claims_no_pending_reboot() {
    let mut h = Harness::start(vec![
        HostSpec::new("ab1"),
        HostSpec::new("ab2").service("app"),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet.update("ab1", |s| s.bump()).unwrap();
    h.fleet
        .update("ab2", |s| {
            s.bump();
            s.units = vec![("app".to_string(), UnitState::Failed)];
        })
        .unwrap();
    let (code, report, stderr) = h.deploy(&[
        "--sequential",
        "--max-failures",
        "0",
        "--health-timeout",
        "3",
        "--confirm-timeout",
        "3",
    ]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "ab1"), "rolled-back", "{report:#}");
    watchdogs_decided(&h, "ab1");
    let g1 = generation(&h, "ab1", 1);
    assert_eq!(h.fleet.current_system("ab1"), g1);
    assert_eq!(boot_default(&h, "ab1"), g1);
    let record = status_record(&h, "ab1");
    assert_eq!(record["boot_path"].as_str(), g1.as_deref(), "{record:#}");
    assert_eq!(record["pending_reboot"], false, "{record:#}");
}

/// Campaign seed 1796390675351769882, step 23 (I1, I3, I4): two hosts'
/// addresses swapped in the ssh config, no master kept for h1 (its machine
/// was rebooted, or it expired): a deployment of h1 opens a new connection
/// to h2's machine, activates h1's system there and writes h1's secret into
/// h2's `/run/keys`, and reports h1 `deployed`.
#[test]
fn a_swapped_ssh_config_never_puts_a_hosts_system_or_secret_on_another_machine() {
    let keys = r#"keys."k-x1" = { text = "the secret of x1"; };"#;
    let mut h = Harness::start(vec![
        HostSpec::new("x1").deployment_extra(keys),
        HostSpec::new("x2"),
    ]);
    let out = h.run(&["--ssh-keep-alive", "0", "deploy"]);
    assert_eq!(out.status.code(), Some(0));
    h.fleet.update("x1", |s| s.bump()).unwrap();
    let new = h.fleet.toplevel("x1").unwrap();
    h.fleet.swap_ssh_addresses("x1", "x2").unwrap();
    let (_, report, stderr) = h.deploy(&["x1", "--confirm-timeout", "3"]);
    watchdogs_decided(&h, "x2");
    assert!(
        !activated(&h, "x2").contains(&new),
        "x1's system was activated on x2's machine: {report:#}\n{stderr}"
    );
    assert!(
        !h.fleet.host_dir("x2").join("run/keys/k-x1").exists(),
        "x1's secret is on x2's machine: {report:#}"
    );
    if status(&report, "x1") == "deployed" {
        assert_eq!(h.fleet.current_system("x1"), Some(new), "{report:#}");
    }
}
