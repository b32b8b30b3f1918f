//! The deploy path end to end: generations, change detection, rollback,
//! unreachable hosts, selection and bad input.

use nix_deploy_testkit::HostSpec;

use crate::helpers::{Harness, host, status};

fn three() -> Vec<HostSpec> {
    vec![
        HostSpec::new("web1").tags(&["web"]).service("nginx"),
        HostSpec::new("web2").tags(&["web"]),
        HostSpec::new("db1").role("infrastructure"),
    ]
}

#[test]
fn first_deploy_puts_every_host_on_generation_one_running_the_evaluated_path() {
    let h = Harness::start(three());
    let (code, report, stderr) = h.deploy(&["--all"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(report["status"], "succeeded");
    for name in ["web1", "web2", "db1"] {
        let expected = h.fleet.toplevel(name).unwrap();
        assert_eq!(status(&report, name), "deployed", "{report:#}");
        assert_eq!(
            h.fleet.current_system(name).as_deref(),
            Some(expected.as_str())
        );
        assert_eq!(h.fleet.generation(name), Some(1));
        assert_eq!(host(&report, name)["to"]["generation"], 1);
        assert_eq!(host(&report, name)["to"]["path"], expected.as_str());
        assert!(host(&report, name)["from"]["path"].is_null());
        assert_eq!(h.fleet.activations(name).len(), 1);
    }
    // The unit the new system brings is really active on the host.
    assert_eq!(h.fleet.unit_state("web1", "nginx"), "active");
    // Progress went to stderr while it ran.
    assert!(stderr.contains("web1: activating"), "{stderr}");
}

#[test]
fn a_second_run_changes_nothing_and_a_bump_deploys_only_that_host() {
    let mut h = Harness::start(three());
    let (code, _, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{stderr}");

    let (code, report, stderr) = h.deploy(&["--all"]);
    assert_eq!(code, 0, "{stderr}");
    for name in ["web1", "web2", "db1"] {
        assert_eq!(status(&report, name), "skipped", "{report:#}");
        assert_eq!(
            h.fleet.generations(name),
            vec![1],
            "no new generation on {name}"
        );
        assert_eq!(
            h.fleet.activations(name).len(),
            1,
            "{name} was not re-activated"
        );
    }

    h.fleet.update("web2", |s| s.bump()).unwrap();
    let new_web2 = h.fleet.toplevel("web2").unwrap();
    let (code, report, stderr) = h.deploy(&["--all"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status(&report, "web2"), "deployed");
    assert_eq!(host(&report, "web2")["from"]["generation"], 1);
    assert_eq!(host(&report, "web2")["to"]["generation"], 2);
    assert_eq!(status(&report, "web1"), "skipped");
    assert_eq!(status(&report, "db1"), "skipped");
    assert_eq!(h.fleet.generation("web2"), Some(2));
    assert_eq!(h.fleet.current_system("web2"), Some(new_web2));
    assert_eq!(h.fleet.generations("web1"), vec![1]);
    assert_eq!(h.fleet.generations("db1"), vec![1]);

    // --force re-activates an unchanged host.
    let (code, report, stderr) = h.deploy(&["web1", "--force"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status(&report, "web1"), "deployed");
    assert_eq!(h.fleet.activations("web1").len(), 2);
}

#[test]
fn a_failing_switch_rolls_the_host_back_to_its_old_path_and_generation() {
    let mut h = Harness::start(three());
    let (code, _, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{stderr}");
    let old = h.fleet.current_system("web1").unwrap();

    h.fleet
        .update("web1", |s| {
            s.bump();
            s.fail_switch = true;
        })
        .unwrap();
    h.fleet.update("web2", |s| s.bump()).unwrap();
    let (code, report, stderr) = h.deploy(&["--continue-on-failure"]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(report["status"], "failed");
    assert_eq!(status(&report, "web1"), "rolled-back", "{report:#}");
    let error = host(&report, "web1")["error"].as_str().unwrap();
    assert!(
        error.contains("web1: activate"),
        "error names host and step: {error}"
    );
    assert!(
        error.contains("units failed"),
        "error carries the failing output: {error}"
    );
    assert!(error.contains("rolled back to generation 1"), "{error}");
    // Really back: the old system runs and the profile points at generation 1.
    assert_eq!(h.fleet.current_system("web1"), Some(old));
    assert_eq!(h.fleet.generation("web1"), Some(1));
    // The other changed host was deployed all the same.
    assert_eq!(status(&report, "web2"), "deployed");
    assert_eq!(h.fleet.generation("web2"), Some(2));

    // The table says the same, naming host and step.
    h.fleet.update("web1", |s| s.bump()).unwrap();
    let out = h.run(&["deploy", "web1"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("rolled back"), "{stdout}");
    assert!(stdout.contains("web1: activate"), "{stdout}");
}

#[test]
fn without_rollback_on_failure_a_failed_host_is_left_as_it_is() {
    let mut h = Harness::start(vec![HostSpec::new("solo").rollback_on_failure(false)]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("solo", |s| {
            s.bump();
            s.fail_switch = true;
        })
        .unwrap();
    let (code, report, _) = h.deploy(&[]);
    assert_eq!(code, 1);
    assert_eq!(status(&report, "solo"), "failed");
    assert_eq!(h.fleet.generation("solo"), Some(2));
    assert!(
        host(&report, "solo")["error"]
            .as_str()
            .unwrap()
            .contains("rollbackOnFailure is off")
    );
}

#[test]
fn a_failing_first_deployment_has_nothing_to_roll_back_to() {
    let h = Harness::start(vec![HostSpec::new("fresh").fail_switch(true)]);
    let (code, report, _) = h.deploy(&[]);
    assert_eq!(code, 1);
    assert_eq!(status(&report, "fresh"), "failed");
    assert!(
        host(&report, "fresh")["error"]
            .as_str()
            .unwrap()
            .contains("no previous generation")
    );
}

#[test]
fn an_unreachable_host_is_reported_while_the_others_deploy() {
    let mut h = Harness::start(three());
    h.fleet.stop_host("db1").unwrap();
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(status(&report, "db1"), "unreachable", "{report:#}");
    let error = host(&report, "db1")["error"].as_str().unwrap();
    assert!(error.contains("db1"), "{error}");
    assert_eq!(status(&report, "web1"), "deployed");
    assert_eq!(status(&report, "web2"), "deployed");
    assert_eq!(h.fleet.generation("web1"), Some(1));

    // Back online, the next run deploys it and leaves the others alone.
    h.fleet.start_host("db1").unwrap();
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(status(&report, "db1"), "deployed");
    assert_eq!(status(&report, "web1"), "skipped");
}

#[test]
fn an_unknown_host_exits_2_and_touches_nothing() {
    let h = Harness::start(three());
    let out = h.run(&["deploy", "web1", "web3"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown host `web3`"), "{stderr}");
    for name in ["web1", "web2", "db1"] {
        assert_eq!(h.fleet.generation(name), None);
        assert!(h.fleet.activations(name).is_empty());
    }
    let (_, history, _) = h.json(&["history"]);
    assert_eq!(history["deployments"].as_array().unwrap().len(), 0);

    // An unknown tag, too.
    let out = h.run(&["deploy", "--on", "@nope"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn selection_by_tag_deploys_only_tagged_hosts() {
    let h = Harness::start(three());
    let (code, report, _) = h.deploy(&["--on", "@web"]);
    assert_eq!(code, 0);
    assert_eq!(report["hosts"].as_array().unwrap().len(), 2);
    assert_eq!(h.fleet.generation("web1"), Some(1));
    assert_eq!(h.fleet.generation("web2"), Some(1));
    assert_eq!(h.fleet.generation("db1"), None);
}

#[test]
fn parallel_limit_bounds_concurrent_activations() {
    // Activations long enough that two hosts started together overlap
    // even when the machine is busy (the second check below).
    let specs = (1..=4)
        .map(|i| HostSpec::new(&format!("n{i}")).activation_delay_ms(2500))
        .collect();
    let h = Harness::start(specs);
    let (code, report, stderr) = h.deploy(&["--parallel-limit", "2"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let mut spans = Vec::new();
    for i in 1..=4 {
        for a in h.fleet.activations(&format!("n{i}")) {
            spans.push((a.start, a.end.expect("activation finished")));
        }
    }
    assert_eq!(spans.len(), 4);
    let most = spans
        .iter()
        .map(|(start, _)| {
            spans
                .iter()
                .filter(|(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap();
    assert!(
        most <= 2,
        "{most} activations overlapped with --parallel-limit 2"
    );
    assert!(
        most == 2,
        "hosts should run in parallel up to the limit: {spans:?}"
    );
}
