//! Promotion between environments, for real: production gets what staging
//! runs, fetched from the staging hosts, never the flake's (whose production
//! systems cannot even be evaluated, and whose staging is a generation
//! ahead); a target that was down gets exactly the pinned system on
//! `resume`; an unhealthy staging host refuses it (in process, through the
//! daemon and its API), a token limited to staging may not promote to
//! production, and the in-process CLI's actions are in the audit trail.

use serde_json::{Value, json};

use nix_deploy_testkit::HostSpec;

use crate::daemon::{DEPLOY_TOKEN, call, start_daemon_with};
use crate::helpers::{Harness, host};
use crate::ops2::STAGING_TOKEN;

/// A host tagged `tag` paired with its counterparts by `key`.
fn keyed(name: &str, tag: &str, key: &str) -> HostSpec {
    let mut spec = HostSpec::new(name).tags(&[tag]);
    spec.deployment_extra = Some(format!("promotionKey = \"{key}\";"));
    spec
}

/// Make the flake's systems of `hosts` throw when evaluated (their
/// deployment metadata still evaluates).
fn break_systems(h: &Harness, hosts: &[&str]) {
    let path = h.fleet.dir().join("flake").join("flake.nix");
    let mut text = std::fs::read_to_string(&path).unwrap();
    for name in hosts {
        let from =
            format!("system.build.toplevel = mkToplevel {{\n              name = \"{name}\";");
        let to = format!(
            "system.build.toplevel = throw \"{name}'s system must not be evaluated\" {{\n              name = \"{name}\";"
        );
        assert!(text.contains(&from), "{name} not found in the flake");
        text = text.replace(&from, &to);
    }
    std::fs::write(&path, text).unwrap();
}

/// Whether the coordinator's store has `path`.
fn valid_here(h: &Harness, path: &str) -> bool {
    h.fleet
        .command("nix-store")
        .args(["--check-validity", path])
        .output()
        .unwrap()
        .status
        .success()
}

/// Take `paths` out of the coordinator's store (and the GC roots nix-deploy
/// kept for `hosts`): only the hosts have them now.
fn forget_here(h: &Harness, hosts: &[&str], paths: &[&str]) {
    for name in hosts {
        let roots = h.state_dir().join("gcroots").join(name);
        if roots.exists() {
            std::fs::remove_dir_all(roots).unwrap();
        }
    }
    for path in paths {
        let out = h
            .fleet
            .command("nix-store")
            .args(["--delete", path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!valid_here(h, path), "{path} is still here");
    }
}

fn deployments(h: &Harness) -> usize {
    let (_, history, _) = h.json(&["history"]);
    history["deployments"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread")]
async fn promote_deploys_what_staging_runs_never_the_flake_and_refuses_an_unhealthy_source() {
    let mut h = Harness::start(vec![
        keyed("stg-web", "staging", "web").service("app"),
        keyed("stg-db", "staging", "db"),
        keyed("prd-web", "prod", "web"),
        keyed("prd-db", "prod", "db"),
    ]);
    let (code, _, stderr) = h.deploy(&["--on", "@staging"]);
    assert_eq!(code, 0, "{stderr}");
    let web = h.fleet.current_system("stg-web").unwrap();
    let db = h.fleet.current_system("stg-db").unwrap();
    // The in-process CLI records what it does in the audit trail.
    let out = h.run(&["exec", "--on", "@staging", "--", "true"]);
    assert_eq!(out.status.code(), Some(0));
    let out = h.run(&["cancel", "1"]);
    assert_eq!(out.status.code(), Some(2), "nothing runs");

    // The flake moves on (staging a generation ahead, production's systems
    // cannot even be evaluated), and the coordinator no longer has what
    // staging runs: promotion takes it from the staging hosts.
    for name in ["stg-web", "stg-db"] {
        h.fleet.update(name, |s| s.version = 2).unwrap();
    }
    break_systems(&h, &["prd-web", "prd-db"]);
    forget_here(&h, &["stg-web", "stg-db"], &[&web, &db]);

    // prd-db is down: the rest is promoted, and `resume` later gives it
    // exactly what was pinned, whatever the flake says by then.
    h.fleet.stop_host("prd-db").unwrap();
    let (code, report, stderr) = h.json(&[
        "promote",
        "--from",
        "@staging",
        "--to",
        "@prod",
        "--max-failures",
        "1",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(host(&report, "prd-db")["status"], "unreachable");
    assert_eq!(h.fleet.current_system("prd-web"), Some(web.clone()));
    assert_eq!(
        h.fleet.generation("stg-web"),
        Some(1),
        "the sources are only read"
    );
    assert!(valid_here(&h, &web), "fetched from stg-web");
    h.fleet.start_host("prd-db").unwrap();
    let id = report["id"].as_i64().unwrap().to_string();
    let (code, report, stderr) = h.json(&["resume", &id]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(h.fleet.current_system("prd-db"), Some(db.clone()));
    assert_eq!(report["strategy"], "promote", "{report:#}");
    let pairs = &report["pinned"]["promotion"]["pairs"];
    assert_eq!(
        pairs
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (
                p["target"].as_str().unwrap(),
                p["source"].as_str().unwrap(),
                p["system"].as_str().unwrap()
            ))
            .collect::<Vec<_>>(),
        [
            ("prd-db", "stg-db", db.as_str()),
            ("prd-web", "stg-web", web.as_str())
        ]
    );
    assert_eq!(report["pinned"]["hosts"]["prd-web"], json!(web));
    for target in ["prd-web", "prd-db"] {
        let steps: Vec<&str> = host(&report, target)["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["step"].as_str().unwrap())
            .collect();
        assert!(
            steps.contains(&"fetch") && !steps.contains(&"build"),
            "{target}: {steps:?}"
        );
    }

    // A staging host that is unhealthy now: refused, nothing changes.
    h.fleet
        .ssh("stg-web", "echo failed > /run/units/app.service")
        .unwrap();
    let before = deployments(&h);
    let staging = h.state_dir().join("staging.token");
    std::fs::write(&staging, STAGING_TOKEN).unwrap();
    let d = start_daemon_with(
        &h,
        "",
        &format!(
            "[[tokens]]\nname = \"staging\"\nfile = \"{}\"\nscope = \"deploy\"\nhosts = [\"@staging\"]\n",
            staging.display()
        ),
    );
    let body = json!({ "from": ["@staging"], "to": ["@prod"] });
    let promote = format!("{}/api/v1/promote", d.url);
    let (code, answer) = call(
        reqwest::Method::POST,
        &promote,
        Some(STAGING_TOKEN),
        Some(body.clone()),
    )
    .await;
    assert_eq!(code, 403, "production is out of its reach: {answer}");
    let (code, answer) = call(
        reqwest::Method::POST,
        &promote,
        Some(DEPLOY_TOKEN),
        Some(body),
    )
    .await;
    assert_eq!(code, 409, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("source stg-web is unhealthy"), "{message}");
    let token = d.token_file("deploy.token");
    let out = tokio::task::block_in_place(|| {
        h.run(&[
            "--server",
            &d.url,
            "--token-file",
            token.to_str().unwrap(),
            "promote",
            "--from",
            "@staging",
            "--to",
            "@prod",
        ])
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unhealthy"), "{stderr}");
    assert_eq!(deployments(&h), before, "nothing recorded");
    assert_eq!(h.fleet.generation("prd-web"), Some(1));
    drop(d);

    let out = h.run(&["--json", "audit"]);
    let trail = String::from_utf8_lossy(&out.stdout);
    let entries: Vec<Value> = trail
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let did = |actor: &str, action: &str| {
        entries
            .iter()
            .any(|e| e["actor"] == actor && e["action"] == action)
    };
    for (actor, action) in [
        ("user:root", "deploy"),
        ("user:root", "exec"),
        ("user:root", "cancel"),
        ("user:root", "promote"),
        ("user:root", "resume"),
        ("token:ci", "promote-refused"),
        ("token:staging", "promote-refused"),
    ] {
        assert!(did(actor, action), "{actor} {action} missing from {trail}");
    }
}
