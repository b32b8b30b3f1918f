//! `apply-local`: deploying the machine the coordinator runs on, through
//! the same safety steps as a deployment over SSH (health checks,
//! validation, the way back). The coordinator runs *inside* a test host's
//! mount namespace (over ssh), where `/nix` and `/run` are the host's own,
//! never on the real machine.

use std::process::{Command, Output};

use nix_deploy_testkit::{HostSpec, NixosShape};
use serde_json::Value;

use crate::helpers::{Harness, binary, status, unique_version};

/// Run `nix-deploy --json ARGS` on host `on`, as root, in its namespace.
/// The host has its own `/root`, which hides a checkout under it: the
/// binary runs from a copy in the state directory (in `/tmp`, which the
/// host shares).
fn on_host(h: &Harness, on: &str, state: &std::path::Path, args: &[&str]) -> (i32, Value, String) {
    let copy = state.join("nix-deploy-under-test");
    if !copy.exists() {
        std::fs::copy(binary(), &copy).expect("copying nix-deploy where the host sees it");
    }
    let mut command = vec![
        copy.display().to_string(),
        "--json".into(),
        "--flake".into(),
        h.fleet.flake_ref(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    command.extend(args.iter().map(|a| a.to_string()));
    let script = nix_deploy_core::shell::join(&command);
    let out: Output = Command::new("ssh")
        .arg("-F")
        .arg(h.fleet.ssh_config())
        .args([on, "--", &script])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running ssh");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), value, stderr)
}

#[test]
fn apply_local_deploys_the_machine_it_runs_on_through_the_same_safety_steps() {
    let mut h = Harness::start(vec![
        // Not reached over SSH at all: only apply-local on itself deploys it.
        HostSpec::new("here")
            .version(unique_version())
            .service("web")
            .deployment_extra("targetHost = null; allowLocalDeployment = true;"),
        HostSpec::new("other"),
    ]);
    h.fleet.use_nixos(NixosShape::small()).unwrap();
    let state = tempfile::tempdir().unwrap();
    let toplevel = h.fleet.toplevel("here").unwrap();

    let (code, report, stderr) =
        on_host(&h, "here", state.path(), &["apply-local", "--node", "here"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "here"), "deployed", "{report:#}");
    assert_eq!(
        h.fleet.current_system("here").as_deref(),
        Some(toplevel.as_str())
    );
    assert_eq!(h.fleet.generation("here"), Some(1));
    assert_eq!(h.fleet.unit_state("here", "web"), "active");
    // Nothing was copied: the host built its system in its own store, and
    // the real machine's store never held it.
    assert!(
        h.fleet
            .host_dir("here")
            .join(toplevel.trim_start_matches('/'))
            .exists()
    );
    let on_this_machine = Command::new("nix")
        .env("NIX_CONFIG", nix_deploy_testkit::nix_config())
        .args(["path-info", &toplevel])
        .output()
        .unwrap();
    assert!(
        !on_this_machine.status.success(),
        "built on the real machine"
    );

    // A failing switch: switched back, here, to the generation it ran.
    h.fleet
        .update("here", |s| {
            s.bump();
            s.fail_switch = true;
        })
        .unwrap();
    let (code, report, stderr) =
        on_host(&h, "here", state.path(), &["apply-local", "--node", "here"]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "here"), "rolled-back", "{report:#}");
    assert_eq!(
        h.fleet.current_system("here").as_deref(),
        Some(toplevel.as_str())
    );
    assert_eq!(h.fleet.generation("here"), Some(1));

    // A host that does not allow it is refused, untouched.
    let (code, _, stderr) = on_host(
        &h,
        "other",
        state.path(),
        &["apply-local", "--node", "other"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("allowLocalDeployment"), "{stderr}");
    assert_eq!(h.fleet.generation("other"), None);
}
