//! Strategies and failure policy, proven by the hosts' own activation records
//! (`/run/activations.log` written by each host's switch-to-configuration).

use nix_deploy_testkit::{Activation, HostSpec, UnitState};

use crate::helpers::{Harness, host, status};

fn switches(h: &Harness, name: &str) -> Vec<Activation> {
    h.fleet.activations(name)
}

/// Start of the host's last activation, in seconds.
fn last_start(h: &Harness, name: &str) -> f64 {
    switches(h, name).last().expect("activated").start
}

fn last_end(h: &Harness, name: &str) -> f64 {
    switches(h, name)
        .last()
        .expect("activated")
        .end
        .expect("finished")
}

/// When the step of a host finished, in seconds (from the report).
fn step_finished(report: &serde_json::Value, name: &str, step: &str) -> f64 {
    host(report, name)["steps"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|s| s["step"] == step)
        .and_then(|s| s["finished_at"].as_i64())
        .unwrap_or_else(|| panic!("{name} has no finished {step} step")) as f64
        / 1000.0
}

fn most_concurrent(spans: &[(f64, f64)]) -> usize {
    spans
        .iter()
        .map(|(start, _)| {
            spans
                .iter()
                .filter(|(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Bring every host to generation 1, then bump them all.
fn deployed_then_bumped(h: &mut Harness) {
    let (code, report, stderr) = h.deploy(&["--parallel-limit", "8"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    for name in h.fleet.host_names() {
        h.fleet.update(&name, |s| s.bump()).unwrap();
    }
}

#[test]
fn dependents_activate_only_after_their_dependency_validated() {
    let h = Harness::start(vec![
        HostSpec::new("p620")
            .role("infrastructure")
            .tags(&["monitoring"])
            .activation_delay_ms(600),
        HostSpec::new("p510").depends_on(&["p620"]),
        HostSpec::new("razer").depends_on(&["@monitoring"]),
        HostSpec::new("samsung"),
    ]);
    let (code, report, stderr) = h.deploy(&["--parallel-limit", "4"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let validated = step_finished(&report, "p620", "validate");
    for dependent in ["p510", "razer", "samsung"] {
        // samsung has no dependency, but infrastructure goes first when nothing else orders hosts.
        assert!(
            last_start(&h, dependent) >= validated,
            "{dependent} activated at {} before p620 was validated at {validated}",
            last_start(&h, dependent)
        );
    }
    // The dependents themselves ran in parallel.
    let spans: Vec<(f64, f64)> = ["p510", "razer", "samsung"]
        .iter()
        .map(|n| (last_start(&h, n), last_end(&h, n)))
        .collect();
    assert!(spans.iter().all(|s| s.0 >= validated));

    let (_, plan, _) = h.json(&["plan", "--no-build"]);
    assert_eq!(
        plan["phases"].as_array().unwrap().len(),
        0,
        "nothing left to deploy"
    );
}

#[test]
fn plan_shows_phases_dependencies_estimates_risk_and_summaries() {
    let mut h = Harness::start(vec![
        HostSpec::new("p620").role("infrastructure"),
        HostSpec::new("p510").depends_on(&["p620"]),
        HostSpec::new("razer").depends_on(&["p620"]),
    ]);
    let (code, plan, stderr) = h.json(&["plan"]);
    assert_eq!(code, 0, "{stderr}");
    let phases: Vec<Vec<String>> = plan["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect()
        })
        .collect();
    assert_eq!(phases, vec![vec!["p620"], vec!["p510", "razer"]]);
    let razer = plan["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "razer")
        .unwrap();
    assert_eq!(razer["changed"], true);
    assert_eq!(razer["depends_on"], serde_json::json!(["p620"]));
    assert!(razer["estimate_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(razer["risk"], "MEDIUM", "no history yet: {razer:#}");
    assert!(
        razer["summary"].is_object(),
        "a summary for changed hosts: {razer:#}"
    );
    assert!(plan["eta_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        plan["strategy_reason"]
            .as_str()
            .unwrap()
            .starts_with("smart")
    );
    assert_eq!(h.fleet.generation("p620"), None, "plan changes nothing");

    // After a deployment, estimates come from history.
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet.update("razer", |s| s.bump()).unwrap();
    let (_, plan, _) = h.json(&["plan"]);
    let razer = plan["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "razer")
        .unwrap();
    assert_eq!(razer["estimate_from_history"], true);
    assert!(razer["estimate_seconds"].as_f64().unwrap() < 30.0);
    assert_eq!(razer["summary"]["compared"], true);
    let text = String::from_utf8_lossy(&h.run(&["plan"]).stdout).into_owned();
    for needle in [
        "Phase 1",
        "razer",
        "Estimated time",
        "Risk level",
        "Rollback strategy",
        "Skipped",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn a_cycle_or_unknown_dependency_exits_2_and_touches_nothing() {
    let mut h = Harness::start(vec![
        HostSpec::new("a").depends_on(&["b"]),
        HostSpec::new("b").depends_on(&["c"]),
        HostSpec::new("c").depends_on(&["a"]),
    ]);
    let out = h.run(&["deploy"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cycle") && stderr.contains("a → b → c → a"),
        "{stderr}"
    );
    for name in ["a", "b", "c"] {
        assert_eq!(h.fleet.generation(name), None);
    }

    h.fleet
        .update("c", |s| s.dependencies = vec!["ghost".into()])
        .unwrap();
    let out = h.run(&["deploy"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`ghost`"), "{stderr}");
    let (_, history, _) = h.json(&["history"]);
    assert_eq!(history["deployments"].as_array().unwrap().len(), 0);
}

#[test]
fn rolling_with_batch_2_never_activates_more_than_2_at_once() {
    let specs = (1..=5)
        .map(|i| HostSpec::new(&format!("r{i}")).activation_delay_ms(400))
        .collect();
    let h = Harness::start(specs);
    let (code, report, stderr) = h.deploy(&[
        "--strategy",
        "rolling",
        "--batch-size",
        "2",
        "--parallel-limit",
        "5",
    ]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let names: Vec<String> = (1..=5).map(|i| format!("r{i}")).collect();
    let spans: Vec<(f64, f64)> = names
        .iter()
        .map(|n| (last_start(&h, n), last_end(&h, n)))
        .collect();
    assert_eq!(most_concurrent(&spans), 2, "{spans:?}");
    // Each batch starts only after the previous batch was validated.
    assert!(last_start(&h, "r3") >= step_finished(&report, "r2", "validate"));
    assert!(last_start(&h, "r5") >= step_finished(&report, "r4", "validate"));
}

#[test]
fn a_failing_canary_stops_the_deployment_with_the_others_untouched() {
    let mut h = Harness::start(vec![
        HostSpec::new("c1"),
        HostSpec::new("c2"),
        HostSpec::new("c3"),
    ]);
    deployed_then_bumped(&mut h);
    h.fleet.update("c2", |s| s.fail_switch = true).unwrap();
    let (code, report, stderr) = h.deploy(&[
        "--strategy",
        "canary",
        "--canary",
        "c2",
        "--canary-soak",
        "1s",
    ]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "c2"), "rolled-back");
    assert_eq!(h.fleet.generation("c2"), Some(1));
    for other in ["c1", "c3"] {
        assert_eq!(status(&report, other), "skipped", "{report:#}");
        assert!(
            host(&report, other)["reason"]
                .as_str()
                .unwrap()
                .contains("canary c2")
        );
        assert_eq!(h.fleet.generations(other), vec![1], "{other} untouched");
        assert_eq!(switches(&h, other).len(), 1, "{other} untouched");
    }
}

#[test]
fn a_healthy_canary_soaks_before_the_rest_follow() {
    let h = Harness::start(vec![
        HostSpec::new("k1"),
        HostSpec::new("k2"),
        HostSpec::new("k3"),
    ]);
    let (code, report, stderr) = h.deploy(&["--strategy", "canary", "--canary-soak", "2s"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    // The first by name is the canary.
    let canary_done = last_end(&h, "k1");
    for other in ["k2", "k3"] {
        assert!(
            last_start(&h, other) >= canary_done + 2.0,
            "{other} started before the canary's 2s soak ended"
        );
    }
    let soak = host(&report, "k1")["steps"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["step"] == "soak");
    assert!(soak, "the canary has a soak step");
}

#[test]
fn blue_green_with_one_failing_host_leaves_every_host_on_its_old_system() {
    let mut h = Harness::start(vec![
        HostSpec::new("b1"),
        HostSpec::new("b2"),
        HostSpec::new("b3"),
    ]);
    deployed_then_bumped(&mut h);
    let old: Vec<String> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| h.fleet.current_system(n).unwrap())
        .collect();
    h.fleet.update("b3", |s| s.fail_switch = true).unwrap();
    let (code, report, stderr) = h.deploy(&["--strategy", "blue-green", "--continue-on-failure"]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    for (i, name) in ["b1", "b2", "b3"].iter().enumerate() {
        assert_eq!(status(&report, name), "rolled-back", "{report:#}");
        assert_eq!(
            h.fleet.current_system(name).as_ref(),
            Some(&old[i]),
            "{name} runs its old system"
        );
        assert_eq!(
            h.fleet.generation(name),
            Some(1),
            "{name} boots its old generation"
        );
        assert_eq!(
            h.fleet.generations(name),
            vec![1],
            "no new generation on {name}"
        );
        assert!(
            h.fleet.boots(name).is_empty(),
            "no boot entry was written on {name}"
        );
    }
    // b1 and b2 really ran the new system (test) before going back.
    assert!(switches(&h, "b1").iter().any(|a| a.action == "test"));
}

#[test]
fn blue_green_commits_every_host_when_all_are_healthy() {
    let mut h = Harness::start(vec![HostSpec::new("g1"), HostSpec::new("g2")]);
    deployed_then_bumped(&mut h);
    let (code, report, stderr) = h.deploy(&["--strategy", "blue-green"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    for name in ["g1", "g2"] {
        let new = h.fleet.toplevel(name).unwrap();
        assert_eq!(status(&report, name), "deployed");
        assert_eq!(h.fleet.current_system(name), Some(new.clone()));
        assert_eq!(h.fleet.generation(name), Some(2));
        assert_eq!(
            h.fleet.boots(name),
            vec![new],
            "boot default committed on {name}"
        );
        let commit = host(&report, name)["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["step"] == "commit");
        assert!(commit);
    }
    // All activations with `test` finished before the first commit.
    let last_test = ["g1", "g2"]
        .iter()
        .flat_map(|n| switches(&h, n))
        .filter(|a| a.action == "test")
        .map(|a| a.end.unwrap())
        .fold(0.0, f64::max);
    let first_boot = ["g1", "g2"]
        .iter()
        .flat_map(|n| switches(&h, n))
        .filter(|a| a.action == "boot")
        .map(|a| a.start)
        .fold(f64::MAX, f64::min);
    assert!(last_test <= first_boot);
}

fn failures_fleet() -> Harness {
    let mut h = Harness::start(vec![
        HostSpec::new("a"),
        HostSpec::new("b"),
        HostSpec::new("c"),
        HostSpec::new("d"),
    ]);
    deployed_then_bumped(&mut h);
    for name in ["a", "b"] {
        h.fleet.update(name, |s| s.fail_switch = true).unwrap();
    }
    h
}

#[test]
fn max_failures_equalled_does_not_abort() {
    let h = failures_fleet();
    let (code, report, stderr) =
        h.deploy(&["--parallel", "--max-failures", "2", "--parallel-limit", "1"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(status(&report, "a"), "rolled-back");
    assert_eq!(status(&report, "b"), "rolled-back");
    assert_eq!(status(&report, "c"), "deployed", "{report:#}");
    assert_eq!(status(&report, "d"), "deployed");
    assert!(report["error"].is_null(), "not aborted: {report:#}");
}

#[test]
fn max_failures_exceeded_aborts() {
    let h = failures_fleet();
    let (code, report, stderr) =
        h.deploy(&["--parallel", "--max-failures", "1", "--parallel-limit", "1"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(status(&report, "a"), "rolled-back");
    assert_eq!(status(&report, "b"), "rolled-back");
    assert_eq!(status(&report, "c"), "skipped", "{report:#}");
    assert_eq!(status(&report, "d"), "skipped");
    assert!(report["error"].as_str().unwrap().contains("max-failures"));
    assert_eq!(h.fleet.generations("c"), vec![1]);
}

#[test]
fn by_default_one_failure_aborts_and_rolls_back_what_was_deployed() {
    let mut h = Harness::start(vec![
        HostSpec::new("a"),
        HostSpec::new("b"),
        HostSpec::new("c"),
    ]);
    deployed_then_bumped(&mut h);
    h.fleet.update("b", |s| s.fail_switch = true).unwrap();
    let old_a = h.fleet.current_system("a").unwrap();
    let (code, report, stderr) = h.deploy(&["--parallel-limit", "1"]);
    assert_eq!(code, 1, "{stderr}");
    // a was deployed first, then b failed: the abort sends a back, c never starts.
    assert_eq!(status(&report, "a"), "rolled-back", "{report:#}");
    assert!(
        host(&report, "a")["error"]
            .as_str()
            .unwrap()
            .contains("aborted")
    );
    assert_eq!(h.fleet.current_system("a"), Some(old_a));
    assert_eq!(h.fleet.generation("a"), Some(1));
    assert_eq!(status(&report, "b"), "rolled-back");
    assert_eq!(status(&report, "c"), "skipped");
    assert_eq!(h.fleet.generations("c"), vec![1]);
}

#[test]
fn smart_skips_unchanged_hosts_and_puts_a_canary_first_in_a_role_of_three() {
    let mut h = Harness::start(vec![
        HostSpec::new("w1").role("web"),
        HostSpec::new("w2").role("web"),
        HostSpec::new("w3").role("web"),
        HostSpec::new("w4").role("web"),
    ]);
    deployed_then_bumped(&mut h);
    h.fleet.update("w4", |s| s.version -= 1).unwrap(); // back to what it runs
    let (code, report, stderr) = h.deploy(&["--parallel-limit", "4"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "w4"), "skipped");
    assert_eq!(switches(&h, "w4").len(), 1);
    let canary_validated = step_finished(&report, "w1", "validate");
    for other in ["w2", "w3"] {
        assert!(
            last_start(&h, other) >= canary_validated,
            "{other} went before the canary"
        );
    }
}

#[test]
fn a_failing_health_check_rolls_the_host_back() {
    let mut h = Harness::start(vec![
        HostSpec::new("svc")
            .service("nginx")
            .health_check(r#"{ service = "nginx"; period = 1; }"#),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    let old = h.fleet.current_system("svc").unwrap();
    h.fleet
        .update("svc", |s| {
            s.bump();
            s.units = vec![("nginx".into(), UnitState::Failed)];
        })
        .unwrap();
    let (code, report, stderr) = h.deploy(&["--health-timeout", "3"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(status(&report, "svc"), "rolled-back");
    let error = host(&report, "svc")["error"].as_str().unwrap();
    assert!(
        error.contains("svc: validate") && error.contains("nginx"),
        "{error}"
    );
    assert_eq!(h.fleet.current_system("svc"), Some(old));
    assert_eq!(h.fleet.generation("svc"), Some(1));
    assert_eq!(
        h.fleet.unit_state("svc", "nginx"),
        "active",
        "the old system's unit is back"
    );
}

#[test]
fn change_summaries_compare_the_running_closure_with_the_new_one() {
    let mut h = Harness::start(vec![
        HostSpec::new("p620").service("nginx").package("htop-3.2.2"),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("p620", |s| {
            s.bump();
            s.kernel = "6.7.2".into();
            s.extra_packages = vec!["prometheus-2.48.0".into()];
            s.units.push(("grafana".into(), UnitState::Active));
        })
        .unwrap();
    let (code, plan, stderr) = h.json(&["plan"]);
    assert_eq!(code, 0, "{stderr}");
    let p620 = &plan["hosts"][0];
    let summary = &p620["summary"];
    assert_eq!(summary["compared"], true, "{p620:#}");
    assert_eq!(
        summary["added"],
        serde_json::json!(["grafana-1.2.0", "prometheus-2.48.0"])
    );
    assert_eq!(summary["removed"], serde_json::json!(["htop-3.2.2"]));
    assert_eq!(summary["upgraded"][0]["name"], "nginx", "{summary:#}");
    assert_eq!(summary["upgraded"][0]["from"], "1.1.0");
    assert_eq!(summary["upgraded"][0]["to"], "1.2.0");
    assert_eq!(summary["kernel_changed"], true);
    assert_eq!(
        summary["units_added"],
        serde_json::json!(["grafana.service"])
    );
    assert_eq!(
        summary["units_changed"],
        serde_json::json!(["nginx.service"])
    );
    assert_eq!(p620["risk"], "HIGH");
    assert!(
        p620["risk_reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "kernel changes")
    );

    // The deployment stores the same summary with the host run.
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(host(&report, "p620")["summary"]["kernel_changed"], true);
    let text = String::from_utf8_lossy(&h.run(&["plan"]).stdout).into_owned();
    assert!(text.contains("Nothing to deploy"), "{text}");
}
