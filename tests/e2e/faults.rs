//! Trust under real faults: slow and flapping services, a non-root deploy
//! user with sudo and a nix-daemon, frozen hosts, a coordinator killed at a
//! chosen step, a database that refuses writes, huge numbers. Every test
//! checks what each host really runs against what the report and the
//! history say.

use std::time::{Duration, Instant};

use nix_deploy::store::Store;
use nix_deploy_testkit::HostSpec;
use serde_json::Value;

use crate::helpers::{Harness, host, status};

/// Deploy generation 1 of every host, then apply `change` to each (a bump
/// and whatever makes the next generation hard).
fn fleet_at_generation_one(specs: Vec<HostSpec>, change: impl Fn(&mut HostSpec)) -> Harness {
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let mut h = Harness::start(specs);
    let (code, report, stderr) = h.deploy(&["--parallel-limit", "8"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    for name in &names {
        h.fleet
            .update(name, |s| {
                s.bump();
                change(s);
            })
            .unwrap();
    }
    h
}

/// What the report says a host runs must be what it runs.
fn report_matches_host(h: &Harness, report: &Value, name: &str) {
    let run = host(report, name);
    let running = h.fleet.current_system(name);
    let generation = h.fleet.generation(name);
    let (path, expected_generation) = match run["status"].as_str().unwrap() {
        "deployed" => (run["to"]["path"].as_str(), run["to"]["generation"].as_u64()),
        "rolled-back" | "failed" | "skipped" | "unhealthy" | "cancelled" => (
            run["from"]["path"].as_str(),
            run["from"]["generation"].as_u64(),
        ),
        other => panic!("{name} ended {other}: {report:#}"),
    };
    assert_eq!(running.as_deref(), path, "{name}: {report:#}");
    assert_eq!(
        generation.map(u64::from),
        expected_generation,
        "{name}: {report:#}"
    );
    assert!(h.consistent(name), "{name} is between generations");
}

/// The store of a harness, read from the test (its own process lock).
fn with_store<T>(h: &Harness, f: impl AsyncFnOnce(&Store) -> T) -> T {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::open(h.state_dir()).await.unwrap();
        let out = f(&store).await;
        store.close().await;
        out
    })
}

#[test]
fn the_whole_flow_works_as_a_non_root_user_with_sudo() {
    let mut h = Harness::start(vec![HostSpec::new("nr").user("deploy").service("web")]);
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(h.fleet.generation("nr"), Some(1));
    h.fleet.update("nr", |s| s.bump()).unwrap();
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "nr"), "deployed");
    report_matches_host(&h, &report, "nr");
    // Rollback on request, as the same user.
    let (code, report, stderr) = h.json(&["rollback", "nr"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(h.fleet.generation("nr"), Some(1));
    assert!(h.consistent("nr"));
    // A failing generation is rolled back by that user too.
    h.fleet
        .update("nr", |s| {
            s.bump();
            s.fail_switch = true;
        })
        .unwrap();
    let (code, report, _) = h.deploy(&[]);
    assert_eq!(code, 1);
    assert_eq!(status(&report, "nr"), "rolled-back", "{report:#}");
    report_matches_host(&h, &report, "nr");
    // Everything logged in as that user, never as root.
    let log = h.fleet.sshd_log("nr");
    assert!(log.contains("Accepted publickey for deploy"), "{log}");
    assert!(!log.contains("for root"), "{log}");
}

#[test]
fn a_service_slower_than_the_confirm_timeout_is_deployed_and_stays_deployed() {
    let h = fleet_at_generation_one(vec![HostSpec::new("s1").service("app")], |s| {
        s.units.clear();
        s.health_checks.clear();
        *s = s.clone().slow_service("app", 6000);
    });
    let (code, report, stderr) = h.deploy(&["--confirm-timeout", "2", "--health-timeout", "30"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "s1"), "deployed", "{report:#}");
    report_matches_host(&h, &report, "s1");
    // Well past the confirm timeout, no watchdog has switched it back.
    std::thread::sleep(Duration::from_secs(4));
    report_matches_host(&h, &report, "s1");
    assert_eq!(h.fleet.activations("s1").len(), 2, "no revert ran");
}

#[test]
fn a_health_check_that_never_passes_is_rolled_back_never_reported_deployed() {
    let h = fleet_at_generation_one(vec![HostSpec::new("s2").service("app")], |s| {
        s.units.clear();
        s.health_checks.clear();
        *s = s.clone().failing_service("app");
    });
    let (code, report, stderr) = h.deploy(&["--confirm-timeout", "2", "--health-timeout", "6"]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "s2"), "rolled-back", "{report:#}");
    report_matches_host(&h, &report, "s2");
}

#[test]
fn a_watchdog_left_by_a_killed_coordinator_never_reverts_a_later_deployment() {
    let mut h = fleet_at_generation_one(vec![HostSpec::new("w1").service("app")], |s| {
        s.units.clear();
        s.health_checks.clear();
        *s = s.clone().slow_service("app", 30_000);
    });
    let new = h.fleet.toplevel("w1").unwrap();
    let mut child = h.spawn(
        "killed",
        &[
            "deploy",
            "--confirm-timeout",
            "12",
            "--health-timeout",
            "60",
        ],
    );
    h.until(30, "the activation of generation 2 to end", || {
        h.fleet
            .activations("w1")
            .iter()
            .any(|a| a.path == new && a.end.is_some())
    });
    child.kill().unwrap(); // SIGKILL, during validation: the watchdog stays armed.
    child.wait().unwrap();
    // A newer generation, deployed at once by another run.
    h.fleet
        .update("w1", |s| {
            s.bump();
            s.units.clear();
            s.health_checks.clear();
            *s = s.clone().service("app");
        })
        .unwrap();
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    report_matches_host(&h, &report, "w1");
    // Well past the old watchdog's deadline: still what we reported.
    std::thread::sleep(Duration::from_secs(16));
    report_matches_host(&h, &report, "w1");
    let (_, history, _) = h.json(&["status"]);
    let w1 = &history["hosts"][0];
    assert_eq!(
        w1["current_path"],
        h.fleet.current_system("w1").unwrap().as_str()
    );
}

#[test]
fn blue_green_hosts_staged_before_a_crash_are_committed_by_resume() {
    let h = fleet_at_generation_one(
        vec![
            HostSpec::new("bg1"),
            HostSpec::new("bg2"),
            HostSpec::new("bg3"),
        ],
        |s| {
            if s.name == "bg3" {
                s.activation_delay_ms = 8000;
            }
        },
    );
    let targets = h.fleet.toplevels().unwrap();
    let mut child = h.spawn("killed", &["deploy", "--strategy", "blue-green"]);
    // bg1 and bg2 staged (and confirmed) while bg3 still activates.
    h.until(30, "two hosts staged with `test`", || {
        ["bg1", "bg2"].iter().all(|n| {
            h.fleet.current_system(n).as_deref() == Some(targets[*n].as_str())
                // Decided: the first deployment's activation, and now this one.
                && h.fleet
                    .ssh(n, "ls /run/nix-deploy/ | grep -c decision")
                    .unwrap_or_default()
                    .trim()
                    == "2"
        })
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // They run the new system but would boot the old one: not unchanged.
    let (_, plan, _) = h.json(&["plan", "--no-build"]);
    for name in ["bg1", "bg2"] {
        let planned = plan["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap();
        assert_eq!(planned["state"], "changed", "{plan:#}");
    }
    let (code, report, stderr) = h.json(&["resume"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    for name in ["bg1", "bg2", "bg3"] {
        assert_eq!(status(&report, name), "deployed", "{report:#}");
        assert_eq!(
            h.fleet.current_system(name).as_deref(),
            Some(targets[name].as_str())
        );
        assert!(h.consistent(name), "{name} would boot another system");
    }
    let (_, plan, _) = h.json(&["plan", "--no-build"]);
    assert_eq!(plan["to_deploy"], serde_json::json!([]), "{plan:#}");
}

#[test]
fn cancelling_blue_green_reverts_every_staged_host() {
    let h = fleet_at_generation_one(
        vec![
            HostSpec::new("c1"),
            HostSpec::new("c2"),
            HostSpec::new("c3"),
        ],
        |s| s.activation_delay_ms = 1500,
    );
    let child = h.spawn(
        "bg",
        &[
            "deploy",
            "--strategy",
            "blue-green",
            "--parallel-limit",
            "1",
        ],
    );
    let staged = h.fleet.toplevel("c1").unwrap();
    h.until(30, "c1 staged", || {
        h.fleet.current_system("c1").as_deref() == Some(staged.as_str())
    });
    let out = h.run(&["cancel"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let (code, report, stderr) = h.wait("bg", child);
    assert_ne!(code, 0, "{report:#}\n{stderr}");
    for name in ["c1", "c2", "c3"] {
        assert_ne!(status(&report, name), "deployed", "{report:#}");
        assert_eq!(h.fleet.generation(name), Some(1), "{name}");
        assert!(h.consistent(name), "{name}");
        report_matches_host(&h, &report, name);
    }
}

#[test]
fn resuming_an_interrupted_rollback_finishes_the_rollback() {
    let mut h = Harness::start(vec![HostSpec::new("rb").activation_delay_ms(5000)]);
    assert_eq!(h.deploy(&[]).0, 0);
    let old = h.fleet.current_system("rb").unwrap();
    h.fleet
        .update("rb", |s| {
            s.bump();
            s.activation_delay_ms = 0;
        })
        .unwrap();
    assert_eq!(h.deploy(&[]).0, 0);
    let mut child = h.spawn("rollback", &["rollback", "rb"]);
    h.until(30, "the rollback's activation to start", || {
        h.fleet
            .activations("rb")
            .iter()
            .filter(|a| a.path == old)
            .count()
            == 2
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let (code, report, stderr) = h.json(&["resume"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(report["strategy"], "rollback", "{report:#}");
    // Back, not forward: generation 1's system.
    assert_eq!(h.fleet.current_system("rb").as_deref(), Some(old.as_str()));
    assert_eq!(h.fleet.generation("rb"), Some(1));
    assert!(h.consistent("rb"));
}

#[test]
fn an_expired_lease_of_a_live_holder_is_never_taken_over() {
    let mut h = Harness::start(vec![HostSpec::new("ls").activation_delay_ms(6000)]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("ls", |s| {
            s.bump();
            s.activation_delay_ms = 0;
        })
        .unwrap();
    assert_eq!(h.deploy(&[]).0, 0);
    let old = h.fleet.generation_path("ls", 1).unwrap();
    let child = h.spawn("rollback", &["rollback", "ls"]);
    h.until(30, "the rollback to hold the host", || {
        h.fleet
            .activations("ls")
            .iter()
            .filter(|a| a.path == old)
            .count()
            == 2
    });
    // Its lease expires while it works (as with no renewal for a minute).
    with_store(&h, async |store| {
        let lease = store.lease("ls").await.unwrap().expect("leased");
        sqlx::query("UPDATE leases SET expires_at = 0 WHERE owner = $1")
            .bind(&lease.owner)
            .execute(store.pool())
            .await
            .unwrap();
    });
    let out = h.run(&["deploy", "--force", "ls"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ls is busy"), "{stderr}");
    let (code, report, stderr) = h.wait("rollback", child);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(h.fleet.generation("ls"), Some(1));
    assert!(h.consistent("ls"));
}

#[test]
fn a_database_that_refuses_writes_for_a_while_loses_nothing_and_leaves_no_host_between_generations()
{
    let h = fleet_at_generation_one(vec![HostSpec::new("db1")], |s| {
        s.activation_delay_ms = 2000;
    });
    let child = h.spawn("deploy", &["deploy"]);
    h.until(30, "the new generation to be the profile", || {
        h.fleet.generations("db1").contains(&2)
    });
    // Another writer holds the database for longer than its busy timeout.
    with_store(&h, async |store| {
        let mut conn = store.pool().acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *conn)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(14)).await;
        sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    });
    let (code, report, stderr) = h.wait("deploy", child);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "db1"), "deployed", "{report:#}");
    report_matches_host(&h, &report, "db1");
    // And the history says so too.
    let (_, shown, _) = h.json(&["show"]);
    assert_eq!(status(&shown, "db1"), "deployed");
    let kinds: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.last(), Some(&"deployment-finished"));
}

#[test]
fn huge_numbers_are_refused_before_anything_is_touched() {
    let h = fleet_at_generation_one(vec![HostSpec::new("n1")], |_| {});
    for args in [
        &["--health-timeout", "18446744073709551615"][..],
        &["--confirm-timeout", "9223372036854775808"],
        &["--canary-soak", "5124095576030431h"],
        &["--activation-timeout", "18446744073709551615s"],
        &["--parallel-limit", "18446744073709551615"],
        &["--batch-size", "0%"],
        &["--max-failures", "101%"],
        &["--min-free-space", "18446744073709551615"],
    ] {
        let mut all = vec!["deploy"];
        all.extend_from_slice(args);
        let out = h.run(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    }
    let out = h.run(&["--connect-timeout", "18446744073709551615", "plan"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(h.fleet.generation("n1"), Some(1));
    assert_eq!(h.fleet.activations("n1").len(), 1, "nothing was touched");
}

#[test]
fn a_host_frozen_during_activation_is_deployed_once_it_answers_again() {
    let mut h = fleet_at_generation_one(vec![HostSpec::new("ice"), HostSpec::new("ok")], |s| {
        s.activation_delay_ms = 2000
    });
    // Remote commands time out well before the host answers again.
    h.command_timeout = "5";
    let new = h.fleet.toplevel("ice").unwrap();
    let child = h.spawn("deploy", &["deploy", "--parallel"]);
    h.until(30, "ice's activation to start", || {
        h.fleet.activations("ice").iter().any(|a| a.path == new)
    });
    h.fleet.freeze_host("ice").unwrap();
    let frozen = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    h.fleet.thaw_host("ice").unwrap();
    let (code, report, stderr) = h.wait("deploy", child);
    assert!(frozen.elapsed() > Duration::from_secs(20));
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    for name in ["ice", "ok"] {
        assert_eq!(status(&report, name), "deployed", "{report:#}");
        report_matches_host(&h, &report, name);
    }
}
