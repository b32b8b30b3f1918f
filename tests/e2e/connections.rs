//! SSH masters kept between runs (`--ssh-keep-alive`): a repeated command
//! pays no handshake, the confirmation never rides a kept master, and
//! nothing is left behind when keeping is off.

use std::os::unix::fs::PermissionsExt;

use nix_deploy_testkit::HostSpec;

use crate::helpers::{Harness, host, status};

/// The records of kept masters in the state directory.
fn records(h: &Harness) -> Vec<String> {
    std::fs::read_dir(h.state_dir().join("ssh"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".master"))
        .collect()
}

/// The host's sshd processes other than its listener: the sessions of
/// established connections.
fn sessions(h: &Harness, name: &str) -> Vec<u32> {
    let listener = h.fleet.pid(name);
    let mut pids: Vec<u32> = h
        .fleet
        .host_processes(name)
        .into_iter()
        .filter(|p| Some(*p) != listener)
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|comm| comm.starts_with("sshd"))
        })
        .collect();
    pids.sort();
    pids
}

/// The sessions once connections that are closing are gone: the same set
/// twice in a row, a moment apart.
fn settled_sessions(h: &Harness, name: &str) -> Vec<u32> {
    let mut last = sessions(h, name);
    h.until(10, "the host's connections to settle", || {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = sessions(h, name);
        std::mem::replace(&mut last, now.clone()) == now
    });
    last
}

#[test]
fn a_second_command_reuses_the_kept_master_without_a_new_handshake() {
    let h = Harness::start(vec![HostSpec::new("k1")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let dir = h.state_dir().join("ssh");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o700,
        "whoever reaches a master's socket runs commands as us"
    );
    assert_eq!(records(&h).len(), 1, "one kept master for the one host");
    let kept = settled_sessions(&h, "k1");
    assert!(
        !kept.is_empty(),
        "the master's connection outlives the deploy"
    );

    // New connections are never answered now: only the kept master can
    // reach the host.
    h.fleet.pause_listener("k1").unwrap();
    let (code, plan, stderr) = h.json(&["plan"]);
    let after = settled_sessions(&h, "k1");
    let other = tempfile::tempdir().unwrap();
    let out = h.run_in(
        other.path(),
        &["--ssh-keep-alive", "0", "--json", "plan"],
        &[],
    );
    let fresh_plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    h.fleet.resume_listener("k1").unwrap();
    assert_eq!(code, 0, "{plan:#}\n{stderr}");
    assert_eq!(host(&plan, "k1")["state"], "unchanged", "{plan:#}");
    assert_eq!(after, kept, "no new connection was made");
    // Without a kept master the same plan cannot get in: the check above
    // could fail.
    assert_ne!(
        fresh_plan["hosts"][0]["state"],
        "unchanged",
        "{fresh_plan:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_confirmation_opens_a_new_connection_even_with_a_kept_master() {
    let mut h = Harness::start(vec![HostSpec::new("k2")]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet.update("k2", |s| s.bump()).unwrap();
    // The kept master works, new connections get no answer: only a
    // confirmation over a kept master could succeed.
    h.fleet.pause_listener("k2").unwrap();
    let (code, report, stderr) = h.deploy(&["--confirm-timeout", "5s"]);
    h.fleet.resume_listener("k2").unwrap();
    assert_ne!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "k2"), "rolled-back", "{report:#}");
    let error = host(&report, "k2")["error"].as_str().unwrap_or_default();
    assert!(error.contains("confirm"), "{error}");
    assert_eq!(h.fleet.generation("k2"), Some(1));
    assert!(h.consistent("k2"));
}

#[test]
fn a_dead_kept_master_is_replaced_and_keep_alive_0_leaves_nothing() {
    let h = Harness::start(vec![HostSpec::new("k3")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let before = std::fs::read_to_string(h.state_dir().join("ssh").join(&records(&h)[0])).unwrap();
    // A network blip kills the master's connection.
    h.fleet.drop_connections("k3").unwrap();
    h.until(10, "the kept master to notice", || {
        sessions(&h, "k3").is_empty()
    });
    let (code, plan, stderr) = h.json(&["plan"]);
    assert_eq!(code, 0, "{plan:#}\n{stderr}");
    assert_eq!(host(&plan, "k3")["state"], "unchanged", "{plan:#}");
    let records_now = records(&h);
    assert_eq!(records_now.len(), 1);
    let after = std::fs::read_to_string(h.state_dir().join("ssh").join(&records_now[0])).unwrap();
    assert_ne!(before, after, "a new master replaced the dead one");

    // Keeping off: the command closes what it opened.
    let other = tempfile::tempdir().unwrap();
    h.fleet.drop_connections("k3").unwrap();
    h.until(10, "the kept master to go", || {
        sessions(&h, "k3").is_empty()
    });
    let out = h.run_in(other.path(), &["--ssh-keep-alive", "0", "plan"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        settled_sessions(&h, "k3").is_empty(),
        "a connection outlived the command"
    );
    let kept: Vec<_> = std::fs::read_dir(other.path().join("ssh"))
        .into_iter()
        .flatten()
        .collect();
    assert!(kept.is_empty(), "nothing is kept with --ssh-keep-alive 0");
}
