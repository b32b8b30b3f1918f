//! Keys follow the system: whenever a host goes back to what it ran before a
//! deployment (a failed step, a failed validation, its own watchdog, a
//! blue-green revert, the settling of what a killed coordinator left, a
//! reboot on the way back), its keys go back to what they were before that
//! deployment, and the host's result says what happened to them, no more.
//! `rollback` on request puts the previous deployment's keys back once;
//! `upload-keys` keeps nothing.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use nix_deploy_testkit::{HostSpec, UnitState};
use serde_json::json;

use crate::helpers::{Harness, host, status};

/// A key file on a host: its contents, mode, owner and group.
#[derive(Debug, PartialEq, Eq)]
struct KeyFile {
    contents: String,
    mode: u32,
    uid: u32,
    gid: u32,
}

fn key_file(contents: &str, mode: u32, uid: u32, gid: u32) -> Option<KeyFile> {
    Some(KeyFile {
        contents: contents.into(),
        mode,
        uid,
        gid,
    })
}

/// Where `path` (absolute, on the host) is on this machine: the host's own
/// `/run` and `/root`.
fn on_host(h: &Harness, name: &str, path: &str) -> PathBuf {
    h.fleet.host_dir(name).join(path.trim_start_matches('/'))
}

/// The key at `path` on host `name`, or `None` when there is none.
fn read_key(h: &Harness, name: &str, path: &str) -> Option<KeyFile> {
    let file = on_host(h, name, path);
    let meta = std::fs::symlink_metadata(&file).ok()?;
    Some(KeyFile {
        contents: std::fs::read_to_string(&file).unwrap(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

/// The undo sets kept in key directory `dir` of host `name`.
fn undo_sets(h: &Harness, name: &str, dir: &str) -> Vec<String> {
    let mut sets: Vec<String> = std::fs::read_dir(on_host(h, name, dir).join(".nix-deploy-undo"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    sets.sort();
    sets
}

/// `text` keys, `name = (contents, extra attributes)`.
fn keys_nix(keys: &[(&str, &str, &str)]) -> String {
    let keys: Vec<String> = keys
        .iter()
        .map(|(name, text, extra)| format!(r#""{name}" = {{ text = "{text}"; {extra} }};"#))
        .collect();
    format!("keys = {{ {} }};", keys.join(" "))
}

const NOBODY: &str = r#"user = "nobody"; group = "nogroup"; permissions = "0640";"#;

#[test]
fn a_host_whose_second_key_fails_gets_its_first_key_back_and_says_so() {
    let mut h = Harness::start(vec![
        HostSpec::new("ka").deployment_extra(&keys_nix(&[("k1", "old-one", NOBODY)])),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    assert_eq!(
        read_key(&h, "ka", "/run/keys/k1"),
        key_file("old-one", 0o640, 65534, 65534)
    );
    // k1 is replaced (another owner and mode), k2 created, then k3's
    // command fails: nothing was activated.
    h.fleet
        .update("ka", |s| {
            s.bump();
            s.deployment_extra = Some(
                r#"keys = {
                  k1 = { text = "new-one"; };
                  k2 = { text = "brand-new"; };
                  k3 = { keyCommand = [ "false" ]; };
                };"#
                .into(),
            );
        })
        .unwrap();
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    let run = host(&report, "ka");
    assert_eq!(status(&report, "ka"), "failed", "{run:#}");
    assert_eq!(h.fleet.generation("ka"), Some(1));
    // The first key is back as it was, the new one gone.
    assert_eq!(
        read_key(&h, "ka", "/run/keys/k1"),
        key_file("old-one", 0o640, 65534, 65534)
    );
    assert_eq!(read_key(&h, "ka", "/run/keys/k2"), None);
    assert_eq!(read_key(&h, "ka", "/run/keys/k3"), None);
    // Said, and nothing more.
    assert_eq!(
        run["keys"],
        json!({ "restored": ["/run/keys/k1"], "removed": ["/run/keys/k2"] }),
        "{run:#}"
    );
    let error = run["error"].as_str().unwrap();
    assert!(error.contains("ka: keys: k3:"), "{error}");
    assert!(
        error.contains(
            "keys: restored 1 (/run/keys/k1); removed 1 created by this deployment (/run/keys/k2)"
        ),
        "{error}"
    );
    // Nothing of this deployment is left to undo; the first deployment's
    // set stays for `rollback`.
    assert_eq!(undo_sets(&h, "ka", "/run/keys"), ["previous"]);
}

#[test]
fn a_host_whose_activation_or_health_check_fails_gets_generation_1s_keys_back() {
    // kb through sudo, as a non-root deploy user; its health check fails.
    // kc's activation fails.
    let mut h = Harness::start(vec![
        HostSpec::new("kb")
            .user("deploy")
            .service("app")
            .deployment_extra(&keys_nix(&[("db", "gen-1", NOBODY)])),
        HostSpec::new("kc").deployment_extra(&keys_nix(&[("db", "gen-1", NOBODY)])),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("kb", |s| {
            s.bump();
            s.units = vec![("app".into(), UnitState::Failed)];
            s.deployment_extra = Some(keys_nix(&[("db", "gen-2", "")]));
        })
        .unwrap();
    h.fleet
        .update("kc", |s| {
            s.bump();
            s.fail_switch = true;
            s.deployment_extra = Some(keys_nix(&[("db", "gen-2", ""), ("new", "x", "")]));
        })
        .unwrap();
    let (code, report, stderr) = h.deploy(&["--health-timeout", "3s", "--continue-on-failure"]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    for (name, expected, said) in [
        (
            "kb",
            json!({ "restored": ["/run/keys/db"] }),
            "keys: restored 1 (/run/keys/db)",
        ),
        (
            "kc",
            json!({ "restored": ["/run/keys/db"], "removed": ["/run/keys/new"] }),
            "keys: restored 1 (/run/keys/db); removed 1 created by this deployment (/run/keys/new)",
        ),
    ] {
        let run = host(&report, name);
        assert_eq!(h.fleet.generation(name), Some(1), "{run:#}");
        assert_eq!(
            read_key(&h, name, "/run/keys/db"),
            key_file("gen-1", 0o640, 65534, 65534),
            "{name}"
        );
        assert_eq!(read_key(&h, name, "/run/keys/new"), None, "{name}");
        assert_eq!(status(&report, name), "rolled-back", "{run:#}");
        assert_eq!(run["keys"], expected, "{run:#}");
        let error = run["error"].as_str().unwrap();
        assert!(error.contains(said), "{said}\n{error}");
        assert_eq!(undo_sets(&h, name, "/run/keys"), ["previous"], "{name}");
    }
    assert!(
        host(&report, "kc")["error"]
            .as_str()
            .unwrap()
            .contains("kc: activate")
    );
}

#[test]
fn keys_follow_the_system_when_the_hosts_watchdog_reverts_it() {
    let mut h = Harness::start(vec![
        HostSpec::new("kw").deployment_extra(&keys_nix(&[("db", "gen-1", NOBODY)])),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("kw", |s| {
            s.bump();
            s.deployment_extra = Some(keys_nix(&[("db", "gen-2", "")]));
        })
        .unwrap();
    // New connections get no answer: the confirmation fails and the host's
    // watchdog switches it back by itself.
    h.fleet.pause_listener("kw").unwrap();
    let (code, report, stderr) = h.deploy(&["--confirm-timeout", "5s"]);
    h.fleet.resume_listener("kw").unwrap();
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    let run = host(&report, "kw");
    assert_eq!(status(&report, "kw"), "rolled-back", "{run:#}");
    assert!(
        run["error"].as_str().unwrap().contains("watchdog"),
        "{run:#}"
    );
    assert_eq!(h.fleet.generation("kw"), Some(1));
    assert_eq!(
        read_key(&h, "kw", "/run/keys/db"),
        key_file("gen-1", 0o640, 65534, 65534)
    );
    assert_eq!(
        run["keys"],
        json!({ "restored": ["/run/keys/db"] }),
        "{run:#}"
    );
}

#[test]
fn keys_a_killed_coordinator_left_follow_the_system_its_activation_is_settled_to() {
    let spec = HostSpec::new("kk").deployment_extra(&keys_nix(&[("db", "gen-1", NOBODY)]));
    let mut h = Harness::start(vec![spec.clone()]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("kk", |s| {
            s.bump();
            s.activation_delay_ms = 3000;
            s.deployment_extra = Some(keys_nix(&[("db", "gen-2", "")]));
        })
        .unwrap();
    let mut child = h.spawn("killed", &["deploy", "--confirm-timeout", "60"]);
    h.until(30, "the activation of generation 2", || {
        h.fleet.activations("kk").len() >= 2
    });
    child.kill().unwrap(); // SIGKILL: the activation is left undecided
    child.wait().unwrap();
    assert_eq!(
        read_key(&h, "kk", "/run/keys/db"),
        key_file("gen-2", 0o600, 0, 0)
    );
    // Back to generation 1 in the flake: the next deployment settles the
    // abandoned activation (switched back), then has nothing to change.
    h.fleet.update("kk", |s| *s = spec.clone()).unwrap();
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "kk"), "skipped", "{report:#}");
    assert_eq!(h.fleet.generation("kk"), Some(1));
    assert_eq!(
        read_key(&h, "kk", "/run/keys/db"),
        key_file("gen-1", 0o640, 65534, 65534)
    );
    let id = report["id"].as_i64().unwrap().to_string();
    let (_, shown, _) = h.json(&["show", &id]);
    assert!(
        shown
            .to_string()
            .contains("keys: restored 1 (/run/keys/db)"),
        "{shown:#}"
    );
}

#[test]
fn rollback_on_request_puts_the_previous_keys_back_once_and_upload_keys_keeps_nothing() {
    let mut h = Harness::start(vec![HostSpec::new("kr")]);
    // upload-keys changes no system: it keeps nothing to undo.
    h.fleet
        .update("kr", |s| {
            s.deployment_extra = Some(keys_nix(&[("db", "gen-0", "")]))
        })
        .unwrap();
    let (code, uploaded, stderr) = h.json(&["upload-keys", "kr"]);
    assert_eq!(code, 0, "{uploaded:#}\n{stderr}");
    assert_eq!(undo_sets(&h, "kr", "/run/keys"), Vec::<String>::new());
    assert!(!on_host(&h, "kr", "/run/keys/.nix-deploy-undo").exists());

    h.fleet
        .update("kr", |s| {
            s.deployment_extra = Some(keys_nix(&[("db", "gen-1", NOBODY)]))
        })
        .unwrap();
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("kr", |s| {
            s.bump();
            s.deployment_extra = Some(keys_nix(&[("db", "gen-2", ""), ("new", "x", "")]));
        })
        .unwrap();
    assert_eq!(h.deploy(&[]).0, 0);
    assert_eq!(
        read_key(&h, "kr", "/run/keys/db"),
        key_file("gen-2", 0o600, 0, 0)
    );
    // upload-keys again: what is kept for `rollback` stays as it was.
    let kept = undo_sets(&h, "kr", "/run/keys");
    let (code, _, _) = h.json(&["upload-keys", "kr"]);
    assert_eq!(code, 0);
    assert_eq!(undo_sets(&h, "kr", "/run/keys"), kept);

    let (code, report, stderr) = h.json(&["rollback", "kr"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let run = host(&report, "kr");
    assert_eq!(h.fleet.generation("kr"), Some(1));
    assert_eq!(
        read_key(&h, "kr", "/run/keys/db"),
        key_file("gen-1", 0o640, 65534, 65534)
    );
    assert_eq!(read_key(&h, "kr", "/run/keys/new"), None);
    assert_eq!(status(&report, "kr"), "rolled-back", "{run:#}");
    assert_eq!(
        run["keys"],
        json!({ "restored": ["/run/keys/db"], "removed": ["/run/keys/new"] }),
        "{run:#}"
    );
    assert_eq!(kept, ["previous"], "what the rollback put back");
    assert_eq!(undo_sets(&h, "kr", "/run/keys"), Vec::<String>::new());

    // Nothing is kept for generation 2 now: the keys are left, and it says so.
    let (code, report, stderr) = h.json(&["rollback", "kr", "--to-generation", "2"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    let run = host(&report, "kr");
    assert_eq!(h.fleet.generation("kr"), Some(2));
    assert_eq!(
        read_key(&h, "kr", "/run/keys/db"),
        key_file("gen-1", 0o640, 65534, 65534)
    );
    let left = run["keys"]["left"].as_str().unwrap_or_default();
    assert!(left.contains("left as they are"), "{run:#}");
    assert_eq!(run["keys"].as_object().unwrap().len(), 1, "{run:#}");
}

#[test]
fn a_blue_green_revert_puts_the_staged_hosts_keys_back() {
    let mut h = Harness::start(vec![
        HostSpec::new("kg1").deployment_extra(&keys_nix(&[("db", "gen-1", NOBODY)])),
        HostSpec::new("kg2"),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("kg1", |s| {
            s.bump();
            s.deployment_extra = Some(keys_nix(&[("db", "gen-2", "")]));
        })
        .unwrap();
    h.fleet
        .update("kg2", |s| {
            s.bump();
            s.fail_switch = true;
        })
        .unwrap();
    let (code, report, stderr) = h.deploy(&["--strategy", "blue-green", "--continue-on-failure"]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    let run = host(&report, "kg1");
    assert_eq!(status(&report, "kg1"), "rolled-back", "{run:#}");
    assert_eq!(h.fleet.generations("kg1"), vec![1]);
    assert_eq!(
        read_key(&h, "kg1", "/run/keys/db"),
        key_file("gen-1", 0o640, 65534, 65534)
    );
    assert_eq!(
        run["keys"],
        json!({ "restored": ["/run/keys/db"] }),
        "{run:#}"
    );
    assert_eq!(undo_sets(&h, "kg1", "/run/keys"), ["previous"]);
}

#[test]
fn keys_lost_with_run_on_a_way_back_through_a_reboot_are_said_to_be_this_deployments() {
    let both = |run: &str, kept: &str, extra: &str| {
        format!(
            r#"keys = {{ r = {{ text = "{run}"; {extra} }}; p = {{ text = "{kept}"; destDir = "/root/keys"; {extra} }}; }};"#
        )
    };
    let mut h = Harness::start(vec![
        HostSpec::new("kt")
            .service("api")
            .deployment_extra(&both("run-1", "kept-1", NOBODY)),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("kt", |s| {
            s.bump();
            s.units = vec![("api".into(), UnitState::Failed)];
            s.deployment_extra = Some(both("run-2", "kept-2", ""));
        })
        .unwrap();
    let (code, report, stderr) = h.json_serving_reboots(
        "keys-through-reboot",
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
    let run = host(&report, "kt");
    assert_eq!(status(&report, "kt"), "rolled-back", "{run:#}");
    assert_eq!(h.fleet.generation("kt"), Some(1));
    // What survived the reboots is put back; what /run lost is this
    // deployment's, uploaded again, and the result says so.
    assert_eq!(
        read_key(&h, "kt", "/root/keys/p"),
        key_file("kept-1", 0o640, 65534, 65534)
    );
    assert_eq!(
        read_key(&h, "kt", "/run/keys/r"),
        key_file("run-2", 0o600, 0, 0)
    );
    assert_eq!(
        run["keys"],
        json!({ "restored": ["/root/keys/p"], "uploaded_again": ["/run/keys/r"] }),
        "{run:#}"
    );
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("uploaded again after the reboot with this deployment's contents"),
        "{error}"
    );
}

#[test]
fn an_undo_directory_that_is_a_link_is_refused_and_the_key_left_as_it_was() {
    let mut h = Harness::start(vec![
        HostSpec::new("kl").deployment_extra(&keys_nix(&[("db", "gen-1", NOBODY)])),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    // Whoever can write the key's directory points the undo directory
    // elsewhere: root must not follow it.
    let undo = on_host(&h, "kl", "/run/keys/.nix-deploy-undo");
    std::fs::remove_dir_all(&undo).unwrap();
    let elsewhere = on_host(&h, "kl", "/run/elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink("/run/elsewhere", &undo).unwrap();
    h.fleet
        .update("kl", |s| {
            s.bump();
            s.deployment_extra = Some(keys_nix(&[("db", "gen-2", "")]));
        })
        .unwrap();
    let (code, report, stderr) = h.deploy(&[]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    let run = host(&report, "kl");
    assert_eq!(status(&report, "kl"), "failed", "{run:#}");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains(
            "/run/keys/.nix-deploy-undo is a symlink: the key on the host is left as it was"
        ),
        "{error}"
    );
    assert_eq!(
        read_key(&h, "kl", "/run/keys/db"),
        key_file("gen-1", 0o640, 65534, 65534)
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    // What was kept could not be looked at: it says so, and claims nothing.
    assert_eq!(
        run["keys"],
        json!({ "failed": ["/run/keys/db: /run/keys/.nix-deploy-undo is a symlink"] }),
        "{run:#}"
    );
    assert_eq!(h.fleet.generation("kl"), Some(1));
}
