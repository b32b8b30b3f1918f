//! The watch at its edges, for real: a newer commit makes hosts behind and
//! pull mode deploys it (never an older one); the example alerting rules
//! pass `promtool` with the metrics the daemon exports; a hung host, one
//! answering garbage and a flake that stops evaluating are reported as such
//! while the rest is watched on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix_deploy_testkit::HostSpec;

use crate::daemon::{client_metrics, start_daemon_args, stop_daemon};
use crate::helpers::{Harness, binary, git};
use crate::watch::{WATCH, deployments, host, in_sync, kinds, triggered, until, until_fleet};

/// Run `cmd` to its end; it must succeed. Its stdout.
fn succeeds(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `git` with the commit's time set, so that each commit is newer than the
/// one before (Nix's `lastModified` counts seconds).
fn commit_at(dir: &Path, message: &str, unix: i64) {
    let date = format!("{unix} +0000");
    succeeds(
        Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
            .args(["commit", "-q", "-a", "-m", message])
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date)
            .current_dir(dir),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_commit_makes_hosts_behind_and_pull_mode_deploys_it_never_an_older_one() {
    let mut h = Harness::start(vec![HostSpec::new("p1")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let v1 = h.fleet.current_system("p1").unwrap();
    let dir = h.fleet.dir().join("flake");
    git(&dir, &["init", "-q", "-b", "main"]);
    git(&dir, &["add", "-A"]);
    commit_at(&dir, "v1", 1_700_000_000);
    let flake = format!("git+file://{}", dir.display());
    let tracking = format!("{WATCH}flake = \"{flake}\"\n");
    let d = start_daemon_args(&h, "", &tracking, &[]);
    until_fleet(&d, "p1 in sync", |f| in_sync(f, "p1")).await;

    // A newer commit: p1 is behind, and only reported.
    h.fleet.update("p1", |s| s.bump()).unwrap();
    commit_at(&dir, "v2", 1_700_000_100);
    let v2 = h.fleet.toplevel("p1").unwrap();
    let behind = until_fleet(&d, "p1 behind", |f| kinds(f, "p1") == ["behind"]).await;
    assert_eq!(host(&behind, "p1")["desired"], v2.as_str());
    assert_eq!(host(&behind, "p1")["running"], v1.as_str());
    assert!(deployments(&d).await.iter().all(|d| d["trigger"] == "cli"));
    // In process: what the daemon stored (it watches: it leads), and
    // (--live) a probe now.
    let (code, stored, _) = h.json(&["status"]);
    assert_eq!(code, 0);
    assert_eq!(stored["fleet"]["watching"], true);
    assert!(stored["fleet"]["watched_by"].is_string(), "{stored:#}");
    assert_eq!(kinds(&stored["fleet"], "p1"), ["behind"]);
    let (code, live, _) = h.json(&["status", "--live"]);
    assert_eq!(code, 0);
    assert_eq!(kinds(&live["fleet"], "p1"), ["behind"], "{live:#}");
    assert_eq!(host(&live["fleet"], "p1")["desired"], v2.as_str());
    assert!(
        host(&live["fleet"], "p1")["last_seen"].as_i64()
            > host(&behind, "p1")["last_seen"].as_i64()
    );
    stop_daemon(d);

    // Pull mode follows the branch: its head is deployed.
    let pulling = format!("{tracking}branch = \"main\"\npoll-interval = \"1s\"\n");
    let d = start_daemon_args(&h, "", &pulling, &[]);
    until("p1 on v2", || {
        h.fleet.current_system("p1").as_deref() == Some(v2.as_str())
    })
    .await;
    let head = git(&dir, &["rev-parse", "HEAD"]);
    let pulled = deployments(&d).await;
    assert_eq!(pulled[0]["trigger"], "pull", "{pulled:#?}");
    assert_eq!(pulled[0]["requested_by"], "watch:main");
    assert!(pulled[0]["flake"].as_str().unwrap().contains(&head));
    until_fleet(&d, "p1 in sync on v2", |f| in_sync(f, "p1")).await;

    // The branch moves again: deployed again.
    h.fleet.update("p1", |s| s.bump()).unwrap();
    commit_at(&dir, "v3", 1_700_000_200);
    let v3 = h.fleet.toplevel("p1").unwrap();
    until("p1 on v3", || {
        h.fleet.current_system("p1").as_deref() == Some(v3.as_str())
    })
    .await;

    // Moved back to an older commit: never deployed over the newer one.
    git(&dir, &["reset", "-q", "--hard", "HEAD~1"]);
    let refused = until_fleet(&d, "the older commit refused", |f| {
        f["branch"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not newer"))
    })
    .await;
    assert_eq!(refused["branch"]["branch"], "main");
    assert_eq!(h.fleet.current_system("p1"), Some(v3.clone()));
    assert_eq!(triggered(&d, "pull").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_example_alert_rules_pass_promtool_with_metrics_the_daemon_exports() {
    let h = Harness::start(vec![HostSpec::new("x1").service("nginx")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let d = start_daemon_args(&h, "", WATCH, &[]);
    until_fleet(&d, "x1 checked", |f| host(f, "x1")["healthy"] == true).await;
    let metrics = client_metrics(&d).await;
    let exported: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for file in ["nix/alerts.yml", "nix/alerts.test.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut used = 0;
        for (at, _) in text.match_indices("nix_deploy_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used += 1;
            assert!(
                exported.contains(name.as_str()),
                "{file} uses {name}, which the daemon does not export:\n{metrics}"
            );
        }
        assert!(used > 5, "{file} uses nix-deploy's metrics");
    }
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts.test.yml"],
    ] {
        succeeds(
            Command::new("promtool")
                .args(&args)
                .current_dir(root.join("nix")),
        );
    }
    drop(d);

    // Every watch interval, count and timeout is bounded: exit 2, naming it.
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[watch]\ninterval = 0", "watch.interval"),
        ("[watch]\nconcurrency = 100000", "watch.concurrency"),
        ("[watch]\nbranch = \"main\"", "watch.branch"),
        (
            "[notifications]\nemail-to = [\"ops@example.org\"]",
            "[smtp]",
        ),
    ] {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, text).unwrap();
        let out = Command::new(binary())
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(key), "{text}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_host_garbage_and_a_broken_flake_are_reported_and_the_rest_is_watched_on() {
    let h = Harness::start(vec![
        HostSpec::new("r1"),
        HostSpec::new("r2"),
        HostSpec::new("r3"),
    ]);
    assert_eq!(h.deploy(&[]).0, 0);
    let d = start_daemon_args(
        &h,
        "",
        WATCH,
        &["--connect-timeout", "2", "--command-timeout", "3"],
    );
    until_fleet(&d, "every host in sync", |f| {
        ["r1", "r2", "r3"].iter().all(|n| in_sync(f, n))
    })
    .await;

    // r1 hangs (every process of it stopped); r2 answers garbage.
    h.fleet.freeze_host("r1").unwrap();
    h.fleet
        .ssh("r2", "ln -sfn /tmp /run/current-system")
        .unwrap();
    let broken = until_fleet(&d, "r1 and r2 unreachable", |f| {
        kinds(f, "r1").contains(&"unreachable".to_string())
            && kinds(f, "r2").contains(&"unreachable".to_string())
    })
    .await;
    assert!(
        host(&broken, "r2")["error"]
            .as_str()
            .unwrap()
            .contains("not a store path"),
        "{broken:#}"
    );
    // r3 is watched on meanwhile.
    let seen = host(&broken, "r3")["last_seen"].as_i64().unwrap();
    until_fleet(&d, "r3 seen again", |f| {
        host(f, "r3")["last_seen"].as_i64().unwrap_or(0) > seen && in_sync(f, "r3")
    })
    .await;

    // The flake stops evaluating: nobody is in sync, and the error is said.
    let flake = h.fleet.dir().join("flake/flake.nix");
    let good = std::fs::read_to_string(&flake).unwrap();
    std::fs::write(&flake, format!("{good}\nthis is not nix")).unwrap();
    let unknown = until_fleet(&d, "desired unknown", |f| {
        kinds(f, "r3") == ["desired-unknown"]
    })
    .await;
    assert!(unknown["evaluation_error"].is_string(), "{unknown:#}");
    assert!(host(&unknown, "r3")["desired_error"].is_string());
    assert!(host(&unknown, "r3")["desired"].is_null());
    assert!(
        client_metrics(&d)
            .await
            .contains("nix_deploy_fleet_evaluates 0")
    );

    // Everything mended: back in sync.
    std::fs::write(&flake, good).unwrap();
    h.fleet.thaw_host("r1").unwrap();
    h.fleet
        .ssh(
            "r2",
            "ln -sfn \"$(readlink -f /nix/var/nix/profiles/system)\" /run/current-system",
        )
        .unwrap();
    until_fleet(&d, "every host in sync again", |f| {
        ["r1", "r2", "r3"].iter().all(|n| in_sync(f, n))
    })
    .await;
}
