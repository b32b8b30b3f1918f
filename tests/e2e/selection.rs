//! Selection as people write it, against a real fleet: globs on names and
//! tags, several `--on`, comma lists, `--exclude`, the same for `plan`,
//! `deploy` and `exec`; and selectors that match nothing exit 2 with nothing
//! recorded or touched.

use nix_deploy_testkit::HostSpec;
use serde_json::Value;

use crate::helpers::Harness;

fn fleet() -> Harness {
    Harness::start(vec![
        HostSpec::new("web-1").tags(&["web", "edge-eu"]),
        HostSpec::new("web-2").tags(&["web", "edge-us"]),
        HostSpec::new("db-1").tags(&["db"]).role("infrastructure"),
        HostSpec::new("mon").tags(&["monitoring"]),
    ])
}

fn names(report: &Value) -> Vec<String> {
    let mut names: Vec<String> = report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn every_selection_form_selects_what_it_says() {
    let h = fleet();
    let plan = |args: &[&str]| {
        let mut all = vec!["plan", "--no-build"];
        all.extend_from_slice(args);
        let (code, report, stderr) = h.json(&all);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        names(&report)
    };
    assert_eq!(plan(&[]), ["db-1", "mon", "web-1", "web-2"]);
    assert_eq!(
        plan(&["--all", "--exclude", "mon"]),
        ["db-1", "web-1", "web-2"]
    );
    assert_eq!(plan(&["web-*"]), ["web-1", "web-2"]);
    assert_eq!(plan(&["--on", "web-*"]), ["web-1", "web-2"]);
    assert_eq!(plan(&["--on", "@edge-*"]), ["web-1", "web-2"]);
    assert_eq!(plan(&["--on", "@edge-eu"]), ["web-1"]);
    assert_eq!(plan(&["--on", "web-1", "--on", "@db"]), ["db-1", "web-1"]);
    assert_eq!(plan(&["--on", "web-1,@monitoring"]), ["mon", "web-1"]);
    assert_eq!(plan(&["mon", "--on", "@db"]), ["db-1", "mon"]);
    assert_eq!(plan(&["--on", "@web", "--exclude", "web-2"]), ["web-1"]);
    assert_eq!(
        plan(&["--exclude", "@web", "--exclude", "d?-[0-9]"]),
        ["mon"]
    );
    assert_eq!(plan(&["*-[12]"]), ["db-1", "web-1", "web-2"]);
}

#[test]
fn deploy_and_exec_take_the_same_selection() {
    let h = fleet();
    let (code, report, stderr) = h.deploy(&["--on", "web-*", "--exclude", "@edge-us"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(names(&report), ["web-1"]);
    assert_eq!(h.fleet.generation("web-1"), Some(1));
    for other in ["web-2", "db-1", "mon"] {
        assert_eq!(h.fleet.generation(other), None, "{other}");
    }
    let (code, report, stderr) = h.json(&["exec", "@edge-*", "--exclude", "web-1", "--", "true"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(names(&report), ["web-2"]);
}

#[test]
fn a_selector_that_matches_nothing_exits_2_and_changes_nothing() {
    let h = fleet();
    for (args, needle) in [
        (vec!["deploy", "--on", "api-*"], "`api-*` matches no host"),
        (
            vec!["deploy", "web-*", "--on", "@edge-ap*"],
            "`@edge-ap*` matches no host",
        ),
        (
            vec!["deploy", "--exclude", "wbe-*"],
            "`wbe-*` matches no host",
        ),
        (
            vec!["deploy", "--on", "@web", "--exclude", "web-*"],
            "no host is left",
        ),
        (
            vec!["deploy", "--on", "web"],
            "`@web` selects the hosts with that tag",
        ),
        (vec!["deploy", "--on", "web-[1"], "invalid selector"),
        (vec!["plan", "--on", "api-*"], "`api-*` matches no host"),
        (
            vec!["exec", "--on", "api-*", "--", "true"],
            "`api-*` matches no host",
        ),
        (
            vec!["upload-keys", "--on", "api-*"],
            "`api-*` matches no host",
        ),
    ] {
        let out = h.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    for name in ["web-1", "web-2", "db-1", "mon"] {
        assert_eq!(h.fleet.generation(name), None);
        assert!(h.fleet.activations(name).is_empty());
    }
    let (_, history, _) = h.json(&["history"]);
    assert_eq!(history["deployments"], Value::Array(Vec::new()));
}
