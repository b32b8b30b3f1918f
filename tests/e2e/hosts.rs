//! How each host is reached and treated follows its own metadata, with
//! colmena's meaning: `sshOptions` (our sessions and `nix copy` alike),
//! `privilegeEscalationCommand` (instead of `sudo -n`),
//! `replaceUnknownProfiles = false` (a system someone else deployed is not
//! replaced), and an attribute nobody knows fails that host alone.

use nix_deploy_testkit::{HostSpec, NixosShape};

use crate::helpers::{Harness, host, status};

#[test]
fn each_host_is_reached_and_treated_as_its_metadata_says() {
    let log = tempfile::NamedTempFile::new().unwrap();
    // Written by the host's non-root user.
    std::fs::set_permissions(
        log.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let mut h = Harness::start(vec![
        HostSpec::new("opts"),
        HostSpec::new("escalated").user("deploy"),
        HostSpec::new("foreign"),
        HostSpec::new("typo").deployment_extra(r#"tagz = [ "web" ];"#),
    ]);
    // The module's options: an attribute nobody declared is an error.
    h.fleet.use_nixos(NixosShape::small()).unwrap();
    // `opts` is reached by its address, which the ssh config does not know:
    // only its own ssh options give the identity, user and known hosts.
    let address = h.fleet.address("opts");
    let fleet_dir = h.fleet.dir().to_path_buf();
    h.fleet
        .update("opts", |s| {
            s.deployment_extra = Some(format!(
                r#"targetHost = "{address}"; sshOptions = [ "-i" "{id}" "-o" "IdentitiesOnly=yes" "-o" "User=root" "-o" "UserKnownHostsFile={known}" ];"#,
                id = fleet_dir.join("id").display(),
                known = fleet_dir.join("known_hosts").display(),
            ))
        })
        .unwrap();
    // `escalated` runs its privileged steps through its own command, which
    // says what it ran.
    let log_path = log.path().display().to_string();
    h.fleet
        .update("escalated", |s| {
            s.deployment_extra = Some(format!(
                r#"privilegeEscalationCommand = [ "sh" "-c" "echo \"$*\" >> {log_path}; exec sudo -n -- \"$@\"" "escalate" ];"#
            ))
        })
        .unwrap();
    // `foreign` runs a system someone else deployed, and must keep it.
    let theirs = h.fleet.provision("foreign").unwrap();
    h.fleet
        .update("foreign", |s| {
            s.bump();
            s.deployment_extra = Some("replaceUnknownProfiles = false;".into());
        })
        .unwrap();

    let (code, report, stderr) = h.deploy(&["opts", "escalated"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "opts"), "deployed", "{report:#}");
    assert_eq!(status(&report, "escalated"), "deployed", "{report:#}");
    let escalated = std::fs::read_to_string(log.path()).unwrap();
    assert!(escalated.contains("nix-env"), "{escalated}");

    let (code, report, stderr) = h.deploy(&["foreign"]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "foreign"), "failed", "{report:#}");
    let error = host(&report, "foreign")["error"].as_str().unwrap();
    assert!(
        error.contains("never deployed") && error.contains("replaceUnknownProfiles"),
        "{error}"
    );
    assert_eq!(
        h.fleet.current_system("foreign").as_deref(),
        Some(theirs.as_str())
    );
    assert_eq!(h.fleet.generations("foreign"), [1]);

    // An attribute nobody knows: that host alone fails to evaluate.
    let out = h.run(&["deploy", "typo"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("typo") && stderr.contains("deployment.tagz"),
        "{stderr}"
    );
    assert_eq!(h.fleet.generation("typo"), None);
}
