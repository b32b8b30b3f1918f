//! One host's `config.deployment` metadata error is that host's alone: it
//! fails to evaluate (named, with the attribute at fault), a selection
//! without it deploys, a selection with it is refused (exit 2) before
//! anything is touched, and no error ever repeats the value at fault (a
//! secret may have been typed into the wrong attribute).

use nix_deploy_testkit::HostSpec;
use serde_json::Value;

use crate::helpers::{Harness, files_containing, status};

/// Issue 18, fault 11: a key's parse error echoed the value into stderr,
/// `--json` and the database, and one host's bad key failed every other
/// host's deployment.
#[test]
fn a_bad_key_fails_only_its_host_and_its_value_is_never_repeated() {
    const VALUE: &str = "73194821";
    let h = Harness::start(vec![
        HostSpec::new("badkey")
            .deployment_extra(&format!(r#"keys.db = {{ text = "x"; user = {VALUE}; }};"#)),
        HostSpec::new("fine"),
    ]);

    // The other host deploys.
    let (code, report, stderr) = h.deploy(&["fine"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "fine"), "deployed");
    assert!(!stderr.contains(VALUE), "{stderr}");

    // The plan names the host, the key and the attribute, not the value.
    let (code, plan, stderr) = h.json(&["plan", "--no-build"]);
    assert_eq!(code, 1, "{plan:#}\n{stderr}");
    let failed = &plan["evaluation"]["failed"];
    assert_eq!(failed[0]["host"], "badkey", "{plan:#}");
    let error = failed[0]["error"].as_str().unwrap();
    assert!(
        error.contains("deployment.keys.db.user") && error.contains("string"),
        "{error}"
    );
    assert!(!plan.to_string().contains(VALUE), "{plan:#}");
    assert!(!stderr.contains(VALUE), "{stderr}");

    // Selecting it is refused, naming it; nothing of it is touched.
    for args in [&["badkey"][..], &[][..]] {
        let out = h.run(&[&["--json", "deploy"][..], args].concat());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("badkey") && stderr.contains("deployment.keys.db.user"),
            "{stderr}"
        );
        assert!(
            !stderr.contains(VALUE) && !stdout.contains(VALUE),
            "{stderr}"
        );
    }
    assert_eq!(h.fleet.generation("badkey"), None);
    let out = h.run(&["upload-keys", "badkey"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(VALUE));

    // Nothing in the state directory (the database, its WAL) holds it.
    let (_, shown, _) = h.json(&["show"]);
    assert!(!shown.to_string().contains(VALUE), "{shown:#}");
    assert_eq!(
        files_containing(h.state_dir(), VALUE),
        Vec::<String>::new(),
        "the value reached the state directory"
    );
    let (_, history, _) = h.json(&["history"]);
    assert_eq!(history["deployments"].as_array().map(Vec::len), Some(1));
    assert_ne!(history["deployments"], Value::Null);
}
