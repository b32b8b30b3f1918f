//! Cancel, crash recovery and resume, one deployment per host, and rollback on
//! request. Each test checks that no host is left between generations.

use nix_deploy_testkit::HostSpec;

use crate::helpers::{Harness, status};

/// A fleet at generation 1 whose hosts then change, each activation of the
/// change taking `delay_ms`.
pub(crate) fn slow_fleet(names: &[&str], delay_ms: u64) -> Harness {
    let mut h = Harness::start(names.iter().map(|n| HostSpec::new(n)).collect());
    assert_eq!(h.deploy(&["--parallel-limit", "8"]).0, 0);
    for name in names {
        h.fleet
            .update(name, |s| {
                s.bump();
                s.activation_delay_ms = delay_ms;
            })
            .unwrap();
    }
    h
}

#[test]
fn a_second_deployment_on_a_busy_host_is_refused_naming_the_holder() {
    let h = slow_fleet(&["busy", "free"], 2500);
    let first = h.spawn("first", &["deploy", "busy"]);
    h.until(20, "the first deployment to activate", || {
        h.fleet.activations("busy").len() >= 2
    });
    let out = h.run(&["deploy", "busy", "free"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("busy is busy") && stderr.contains("deployment #2"),
        "{stderr}"
    );
    // Nothing of the refused deployment happened: `free` was not touched.
    assert_eq!(h.fleet.generations("free"), vec![1]);
    let (code, report, stderr) = h.wait("first", first);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(h.fleet.generation("busy"), Some(2));
    // Released: the next deployment goes through.
    assert_eq!(h.deploy(&["free"]).0, 0);
}

#[test]
fn cancel_mid_deployment_leaves_no_host_between_generations() {
    let names = ["c1", "c2", "c3", "c4"];
    let h = slow_fleet(&names, 1200);
    let child = h.spawn("deploy", &["deploy", "--parallel", "--parallel-limit", "1"]);
    h.until(20, "the first activation", || {
        h.fleet.activations("c1").len() >= 2
    });
    let out = h.run(&["cancel"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, report, stderr) = h.wait("deploy", child);
    assert_eq!(code, 3, "cancelled: {report:#}\n{stderr}");
    assert_eq!(report["status"], "cancelled");
    assert_eq!(
        status(&report, "c1"),
        "deployed",
        "the host in the middle finished"
    );
    let cancelled = names
        .iter()
        .filter(|n| status(&report, n) == "cancelled")
        .count();
    assert!(cancelled >= 2, "{report:#}");
    for name in names {
        assert!(h.consistent(name), "{name} is between generations");
    }
    // Resume finishes the rest.
    let (code, report, stderr) = h.json(&["resume"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    for name in names {
        assert_eq!(h.fleet.generation(name), Some(2), "{name}");
        assert!(h.consistent(name));
    }
}

#[test]
fn a_killed_coordinator_is_reported_interrupted_and_resume_completes() {
    let names = ["k1", "k2", "k3"];
    let h = slow_fleet(&names, 1500);
    let mut child = h.spawn(
        "deploy",
        &[
            "deploy",
            "--parallel",
            "--parallel-limit",
            "1",
            "--confirm-timeout",
            "2",
        ],
    );
    h.until(20, "the first activation", || {
        h.fleet.activations("k1").len() >= 2
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // The next start finds it running with a dead owner.
    let (code, history, stderr) = h.json(&["history"]);
    assert_eq!(code, 0);
    assert!(stderr.contains("interrupted"), "{stderr}");
    let latest = &history["deployments"][0];
    assert_eq!(latest["status"], "interrupted", "{history:#}");
    assert!(
        latest["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["status"] == "interrupted"),
        "{latest:#}"
    );
    // Nothing written before the kill was lost.
    let id = latest["id"].as_i64().unwrap().to_string();
    let (_, shown, _) = h.json(&["show", &id]);
    let kinds: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"step-started") && kinds.contains(&"host-probed"),
        "{kinds:?}"
    );

    let (code, report, stderr) = h.json(&["resume", &id]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(report["id"].as_i64().unwrap().to_string(), id);
    assert_eq!(report["status"], "succeeded");
    for name in names {
        assert_eq!(
            h.fleet.current_system(name),
            Some(h.fleet.toplevel(name).unwrap()),
            "{name}"
        );
        assert!(h.consistent(name), "{name} is between generations");
    }
}

#[test]
fn rollback_on_request_switches_to_the_previous_generation_and_is_recorded() {
    let mut h = Harness::start(vec![HostSpec::new("r1")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let first = h.fleet.current_system("r1").unwrap();
    h.fleet.update("r1", |s| s.bump()).unwrap();
    assert_eq!(h.deploy(&[]).0, 0);
    assert_eq!(h.fleet.generation("r1"), Some(2));

    let (code, report, stderr) = h.json(&["rollback", "r1"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "r1"), "rolled-back");
    assert_eq!(report["status"], "succeeded");
    assert_eq!(h.fleet.current_system("r1"), Some(first));
    assert_eq!(h.fleet.generation("r1"), Some(1));
    let (_, history, _) = h.json(&["history"]);
    assert_eq!(history["deployments"][0]["strategy"], "rollback");

    // And forward again to an explicit generation.
    let (code, _, _) = h.json(&["rollback", "r1", "--to-generation", "2"]);
    assert_eq!(code, 0);
    assert_eq!(h.fleet.generation("r1"), Some(2));
    let out = h.run(&["rollback", "r1", "--to-generation", "9"]);
    assert_eq!(out.status.code(), Some(2));
    let out = h.run(&["rollback", "nope"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_live_coordinator_run_through_a_symlink_is_never_declared_dead() {
    let h = slow_fleet(&["slow", "other"], 4000);
    // Operators run us through wrappers and symlinks: nothing in the command
    // line says "nix-deploy".
    let link = h.state_dir().join("nd");
    std::os::unix::fs::symlink(crate::helpers::binary(), &link).unwrap();
    let first = h.spawn_program(&link, "first", &["deploy", "slow"]);
    h.until(20, "the first deployment to activate", || {
        h.fleet.activations("slow").len() >= 2
    });
    // Any other invocation, even a read-only one, opens the history.
    let out = h.run(&["history"]);
    assert_eq!(out.status.code(), Some(0));
    // The first still holds its host: a second deployment is refused.
    let out = h.run(&["deploy", "--force", "slow"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("slow is busy"), "{stderr}");
    let (code, report, stderr) = h.wait("first", first);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(report["status"], "succeeded", "{report:#}");
    // One activation of the new system only: the two never overlapped.
    assert_eq!(h.fleet.activations("slow").len(), 2);
    assert!(h.consistent("slow"));
}

/// Issue 18's fault 2: `resume` deploys what the deployment planned, never
/// the flake as it is by then. A rolling deployment of generation 2 is
/// killed after its first host; the flake moves on to generation 3; resume
/// puts generation 2 on the others, and what the deployment recorded it
/// would deploy is never overwritten.
#[test]
fn resume_deploys_what_was_planned_not_the_flake_as_it_is_now() {
    let names = ["p1", "p2", "p3"];
    let mut h = slow_fleet(&names, 1500);
    assert_eq!(h.deploy(&[]).0, 0);
    for name in names {
        h.fleet.update(name, |s| s.bump()).unwrap();
    }
    let planned: Vec<String> = names.iter().map(|n| h.fleet.toplevel(n).unwrap()).collect();
    let mut child = h.spawn(
        "deploy",
        &[
            "deploy",
            "--strategy",
            "rolling",
            "--batch-size",
            "1",
            "--confirm-timeout",
            "2",
        ],
    );
    h.until(60, "the first host on generation 2", || {
        h.fleet.current_system("p1").as_deref() == Some(planned[0].as_str())
            && h.fleet.activations("p2").len() >= 2
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for name in names {
        h.fleet.update(name, |s| s.bump()).unwrap();
    }
    let now: Vec<String> = names.iter().map(|n| h.fleet.toplevel(n).unwrap()).collect();
    assert_ne!(planned, now);

    let (_, history, _) = h.json(&["history"]);
    let id = history["deployments"][0]["id"]
        .as_i64()
        .unwrap()
        .to_string();
    let (code, report, stderr) = h.json(&["resume", &id]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    for (name, planned) in names.iter().zip(&planned) {
        assert_eq!(
            h.fleet.current_system(name).as_deref(),
            Some(planned.as_str()),
            "{name} runs what the deployment planned"
        );
        assert!(h.consistent(name), "{name} is between generations");
    }
    for (name, newer) in names.iter().zip(&now) {
        assert!(
            h.fleet.activations(name).iter().all(|a| &a.path != newer),
            "{name} never ran the flake's later system"
        );
    }
    let (_, shown, _) = h.json(&["show", &id]);
    for (name, planned) in names.iter().zip(&planned) {
        let run = shown["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == *name)
            .unwrap();
        assert_eq!(
            run["to"]["path"].as_str(),
            Some(planned.as_str()),
            "{shown:#}"
        );
    }
}
