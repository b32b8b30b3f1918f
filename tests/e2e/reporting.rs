//! What is reported is what happened (issue 18's fault 18): a rollback on
//! request is reported as a rollback, a host that failed is counted as
//! failed whether or not it went back, and a deployment with nothing to do
//! never hides a host's last real deployment.

use nix_deploy_testkit::{HostSpec, UnitState};

use crate::helpers::Harness;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_rollback_on_request_says_it_rolled_back() {
    let mut h = Harness::start(vec![HostSpec::new("rb")]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet.update("rb", |s| s.bump()).unwrap();
    assert_eq!(h.deploy(&[]).0, 0);
    let out = h.run(&["rollback", "rb"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("ROLLED BACK") && said.contains("2 → 1"),
        "{said}"
    );
    assert!(!said.contains("DEPLOYED"), "{said}");
    assert_eq!(h.fleet.generation("rb"), Some(1));
    let (_, status, _) = h.json(&["status"]);
    assert_eq!(
        status["hosts"][0]["last_status"], "rolled-back",
        "{status:#}"
    );
    assert_eq!(status["hosts"][0]["generation"], 1, "{status:#}");
}

#[test]
fn a_failed_host_is_counted_failed_and_a_no_op_keeps_the_last_result() {
    let mut h = Harness::start(vec![
        HostSpec::new("a-ok"),
        HostSpec::new("z-bad").service("app"),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    let (_, status, _) = h.json(&["status"]);
    let first = status["hosts"][0]["last_deployment_id"].clone();

    // Nothing changed: nothing to do, and the last result stays.
    let (code, _, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{stderr}");
    let (_, status, _) = h.json(&["status"]);
    for host in status["hosts"].as_array().unwrap() {
        assert_eq!(host["last_status"], "deployed", "{status:#}");
        assert_eq!(host["last_deployment_id"], first, "{status:#}");
    }

    // z-bad fails its checks and goes back; a-ok is deployed, then goes back
    // because the deployment aborted.
    h.fleet.update("a-ok", |s| s.bump()).unwrap();
    h.fleet
        .update("z-bad", |s| {
            s.bump();
            s.units = vec![("app".to_string(), UnitState::Failed)];
        })
        .unwrap();
    let out = h.run(&[
        "deploy",
        "--sequential",
        "--max-failures",
        "0",
        "--health-timeout",
        "2",
    ]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("1 failed (1 of them rolled back)") && said.contains("1 rolled back"),
        "{said}"
    );
}
