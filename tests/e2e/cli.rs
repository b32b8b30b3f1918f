//! The read-only commands and bad input: plan, status, history, show,
//! malformed flakes, and the Nix files of the project itself.

use nix_deploy_testkit::HostSpec;

use crate::helpers::Harness;

#[test]
fn plan_shows_states_and_changes_nothing() {
    let mut h = Harness::start(vec![
        HostSpec::new("p620").role("infrastructure"),
        HostSpec::new("razer"),
    ]);
    let (code, plan, stderr) = h.json(&["plan"]);
    assert_eq!(code, 0, "{stderr}");
    let hosts = plan["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2);
    assert!(
        hosts
            .iter()
            .all(|x| x["state"] == "changed" && x["action"] == "deploy")
    );
    assert_eq!(h.fleet.generation("p620"), None, "plan must not deploy");

    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet.update("razer", |s| s.bump()).unwrap();
    let (_, plan, _) = h.json(&["plan"]);
    assert_eq!(plan["to_deploy"], serde_json::json!(["razer"]));
    assert_eq!(plan["skipped"], serde_json::json!(["p620"]));
    assert_eq!(h.fleet.generation("razer"), Some(1), "plan must not deploy");

    let out = h.run(&["plan"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CHANGED") && text.contains("UNCHANGED"),
        "{text}"
    );
}

#[test]
fn status_and_history_remember_deployments() {
    let mut h = Harness::start(vec![HostSpec::new("a"), HostSpec::new("b")]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet.update("b", |s| s.bump()).unwrap();
    assert_eq!(h.deploy(&[]).0, 0);

    let (code, status, _) = h.json(&["status"]);
    assert_eq!(code, 0);
    let b = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "b")
        .unwrap();
    assert_eq!(b["generation"], 2);
    assert_eq!(b["current_path"], h.fleet.toplevel("b").unwrap().as_str());
    assert_eq!(b["last_status"], "deployed");

    let (_, history, _) = h.json(&["history", "--limit", "10"]);
    let deployments = history["deployments"].as_array().unwrap();
    assert_eq!(deployments.len(), 2);
    assert!(deployments[0]["id"].as_i64() > deployments[1]["id"].as_i64());
    assert_eq!(deployments[0]["status"], "succeeded");
    let runs = deployments[0]["hosts"].as_array().unwrap();
    let run_b = runs.iter().find(|r| r["name"] == "b").unwrap();
    assert_eq!(run_b["from"]["generation"], 1);
    assert_eq!(run_b["to"]["generation"], 2);
    let steps: Vec<&str> = run_b["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "pre-flight",
            "build",
            "copy",
            "set-profile",
            "activate",
            "validate",
            "confirm"
        ]
    );

    let id = deployments[0]["id"].as_i64().unwrap().to_string();
    let (code, shown, _) = h.json(&["show", &id]);
    assert_eq!(code, 0);
    let kinds: Vec<&str> = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"deployment-started"));
    assert_eq!(kinds.last(), Some(&"deployment-finished"));
    assert!(kinds.contains(&"step-finished"));
}

#[test]
fn a_malformed_flake_exits_2_with_nix_error() {
    let h = Harness::start(vec![HostSpec::new("a")]);
    let flake = h.fleet.dir().join("flake/flake.nix");
    std::fs::write(&flake, "{ outputs = { self }: { nixosConfigurations = ").unwrap();
    let out = h.run(&["deploy"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("evaluating"), "{stderr}");
    assert_eq!(h.fleet.generation("a"), None);

    // A flake reference with an attribute is refused before Nix runs.
    let out = std::process::Command::new(crate::helpers::binary())
        .args(["--flake", ".#web1", "--state-dir"])
        .arg(h.state_dir())
        .arg("plan")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn project_nix_files_parse() {
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["flake.nix", "nix/module.nix"] {
        let out = std::process::Command::new("nix-instantiate")
            .args(["--parse", &format!("{root}/{file}")])
            .output()
            .expect("nix-instantiate");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_duration_flag_reads_durations_as_people_write_them() {
    let h = Harness::start(vec![HostSpec::new("d1")]);
    let (code, report, stderr) = h.deploy(&[
        "--health-timeout",
        "10s",
        "--confirm-timeout",
        "2m",
        "--activation-timeout",
        "1h30m",
        "--connect-timeout",
        "10s",
        "--command-timeout",
        "1m",
    ]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(h.fleet.generation("d1"), Some(1));
    let out = h.run(&["health", "d1", "--within", "5s"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // A bad or huge value exits 2 naming the flag with an example, and
    // touches nothing.
    for (flag, value, expected) in [
        ("--health-timeout", "10x", "30s"),
        ("--confirm-timeout", "18446744073709551615", "too long"),
        ("--connect-timeout", "0", "at least 1s"),
        ("--canary-soak", "5124095576030431h", "too long"),
        ("--activation-timeout", "soon", "30s"),
    ] {
        let out = h.run(&["deploy", "--force", flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(expected),
            "{flag} {value}: {stderr}"
        );
    }
    assert_eq!(h.fleet.generation("d1"), Some(1));
    assert_eq!(h.fleet.activations("d1").len(), 1);
}

#[test]
fn history_tells_who_deployed_and_what_was_rolled_back() {
    let mut h = Harness::start(vec![HostSpec::new("ok"), HostSpec::new("bad")]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("bad", |s| {
            s.bump();
            s.fail_switch = true;
        })
        .unwrap();
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(crate::helpers::status(&report, "bad"), "rolled-back");

    // Without USER or LOGNAME (as under CI), the uid's name from /etc/passwd.
    let out = std::process::Command::new(crate::helpers::binary())
        .env_remove("USER")
        .env_remove("LOGNAME")
        .env_remove("SUDO_USER")
        .args(["--state-dir"])
        .arg(h.state_dir())
        .args(["history"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(!text.contains("unknown@"), "{text}");
    assert!(text.contains(&format!("@{} (cli)", host.trim())), "{text}");
    assert!(
        text.contains("0 deployed, 1 skipped, 1 failed (1 of them rolled back)"),
        "{text}"
    );

    // SUDO_USER names the person behind sudo.
    let out = h.run_with_env(&["deploy", "--force", "ok"], &[("SUDO_USER", "alice")]);
    assert_eq!(out.status.code(), Some(0));
    let (_, history, _) = h.json(&["history", "--limit", "1"]);
    let by = history["deployments"][0]["requested_by"].as_str().unwrap();
    assert!(by.starts_with("alice@"), "{by}");
}

#[test]
fn a_host_without_history_is_estimated_from_the_fleet() {
    let mut h = Harness::start(vec![HostSpec::new("old1"), HostSpec::new("old2")]);
    let (_, plan, _) = h.json(&["plan", "--no-build"]);
    // Nobody has history yet: the default, said as such.
    assert_eq!(plan["hosts"][0]["estimate_source"], "default");
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet.add_host(HostSpec::new("new1")).unwrap();
    let (code, plan, stderr) = h.json(&["plan", "--no-build"]);
    assert_eq!(code, 0, "{stderr}");
    let new = plan["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "new1")
        .unwrap()
        .clone();
    assert_eq!(new["estimate_source"], "fleet");
    // The fleet's own hosts took seconds, not the minute of the default.
    let estimate = new["estimate_seconds"].as_f64().unwrap();
    assert!(estimate > 0.0 && estimate < 30.0, "{estimate}");
    let text = String::from_utf8_lossy(&h.run(&["plan", "--no-build"]).stdout).into_owned();
    assert!(text.contains("(fleet median)"), "{text}");
    assert!(!text.contains("(no history)"), "{text}");
}
