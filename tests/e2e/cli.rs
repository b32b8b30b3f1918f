//! The read-only commands and bad input: plan, status, history, show,
//! malformed flakes, and the Nix files of the project itself.

use nix_deploy::testkit::HostSpec;

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
