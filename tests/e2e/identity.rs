//! Each host is known by the machine it is: its identity (`/etc/machine-id`)
//! is learned at first contact, and every new connection, kept master and
//! confirmation is checked against it. A kept master is found by where the
//! ssh config really sends a host (`ssh -G`), not by the words of the
//! config. So an ssh config that points one host at another machine — and
//! is corrected later — never deploys a host's system, or writes its
//! secret, on another machine.

use nix_deploy_testkit::HostSpec;

use crate::helpers::{Harness, status};

/// Point `a` at `b`'s address and `b` at `a`'s in the fleet's ssh config
/// (the known hosts stay as they are, keyed by address, so ssh itself sees
/// nothing wrong).
fn swap_addresses(h: &Harness, a: &str, b: &str) {
    let path = h.fleet.ssh_config();
    let text = std::fs::read_to_string(&path).unwrap();
    let (addr_a, addr_b) = (h.fleet.address(a), h.fleet.address(b));
    let swapped = text
        .replace(&format!("HostName {addr_a}\n"), "HostName @A@\n")
        .replace(
            &format!("HostName {addr_b}\n"),
            &format!("HostName {addr_a}\n"),
        )
        .replace("HostName @A@\n", &format!("HostName {addr_b}\n"));
    assert_ne!(swapped, text);
    std::fs::write(&path, swapped).unwrap();
}

fn secret() -> String {
    format!(
        "s1-secret-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[test]
fn a_corrected_ssh_config_never_sends_a_host_to_another_machine() {
    let key = secret();
    let mut h = Harness::start(vec![
        HostSpec::new("s1").deployment_extra(&format!(r#"keys.token.text = "{key}";"#)),
        HostSpec::new("s2"),
    ]);
    // First contact, without keeping masters: they are made below.
    assert_eq!(h.deploy(&["--ssh-keep-alive", "0"]).0, 0);
    let s2_system = h.fleet.current_system("s2").unwrap();
    let original = std::fs::read_to_string(h.fleet.ssh_config()).unwrap();

    // A mistake in the ssh config: s1 and s2 swapped. Any command now
    // meets the wrong machines, and must say so rather than use them.
    swap_addresses(&h, "s1", "s2");
    let (_, plan, stderr) = h.json(&["plan"]);
    let said = format!("{plan}\n{stderr}");
    assert!(
        said.contains("is not the one first seen as s1")
            && said.contains("is not the one first seen as s2"),
        "the swapped hosts are named as other machines:\n{said}"
    );
    let keys = h.run(&["upload-keys", "s1"]);
    assert_ne!(keys.status.code(), Some(0), "s1's key must not go to s2");

    // Corrected. s1 gets its new system on its own machine.
    std::fs::write(h.fleet.ssh_config(), original).unwrap();
    h.fleet.update("s1", |s| s.bump()).unwrap();
    let s1_new = h.fleet.toplevel("s1").unwrap();
    let keys = h.run(&["upload-keys", "s1"]);
    assert_eq!(
        keys.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&keys.stderr)
    );
    let (code, report, stderr) = h.deploy(&["s1"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "s1"), "deployed");
    assert_eq!(
        h.fleet.current_system("s1").as_deref(),
        Some(s1_new.as_str())
    );
    assert_eq!(
        h.fleet.current_system("s2").as_deref(),
        Some(s2_system.as_str()),
        "s2 still runs its own system"
    );
    assert!(
        h.fleet.activations("s2").iter().all(|a| a.path != s1_new),
        "s1's system was never activated on s2: {:?}",
        h.fleet.activations("s2")
    );
    let s2_keys = h
        .fleet
        .ssh("s2", "cat /run/keys/* 2>/dev/null || true")
        .unwrap();
    assert!(!s2_keys.contains(&key), "s1's secret is on s2");
    let s1_keys = h.fleet.ssh("s1", "cat /run/keys/token").unwrap();
    assert_eq!(s1_keys.trim(), key);
    let (_, status_report, _) = h.json(&["status"]);
    let s1 = status_report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "s1")
        .unwrap();
    assert_eq!(s1["current_path"].as_str(), Some(s1_new.as_str()));
}

#[test]
fn a_decision_for_an_activation_the_host_never_had_fails() {
    let h = Harness::start(vec![HostSpec::new("d1")]);
    assert_eq!(h.deploy(&[]).0, 0);
    for decision in [
        nix_deploy_core::remote::Decision::Confirmed,
        nix_deploy_core::remote::Decision::TakenBack,
    ] {
        let fence = nix_deploy_core::remote::Fence::new(1, 1, 1).unwrap();
        let argv = nix_deploy_core::remote::decide_argv("f00dcafe0123", decision, &fence);
        let script = nix_deploy_core::shell::join(&argv);
        let result = h.fleet.ssh("d1", &script);
        assert!(
            result.is_err(),
            "deciding an unknown activation ({decision:?}) must fail: {result:?}"
        );
    }
    let leftovers = h
        .fleet
        .ssh("d1", "ls /run/nix-deploy | grep f00dcafe0123 || true")
        .unwrap();
    assert!(leftovers.trim().is_empty(), "{leftovers}");
}
