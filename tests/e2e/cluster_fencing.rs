//! Fencing on the hosts: a coordinator superseded by a takeover cannot undo
//! on a host what its successor did. The successor records its epoch on
//! every host of the deployment (its probes, and the hosts the old owner
//! finished); whatever the old owner would still send with its older
//! epoch — starting a switch back or an activation, confirming — the host
//! refuses, naming both epochs.
//!
//! The old owner's host operations are driven here exactly as it would send
//! them (the core's builders, at its epoch): after a real takeover by a real
//! daemon, a paused owner that wakes up could send any of them.

use std::time::{Duration, Instant};

use serde_json::Value;

use nix_deploy_core::remote::{self, Activation, Before, Decision, Fence};

use crate::cluster::{Scene, report_is_what_the_hosts_run, scene, signal};
use crate::daemon::{READ_TOKEN, call, wait_finished};
use crate::helpers::Harness;

/// Run `argv` on `host` as root over the fleet's ssh config, each word
/// quoted by the core's quoting helper: (exit code, stderr).
fn run_as_root(h: &Harness, host: &str, argv: &[String]) -> (i32, String) {
    let mut words = Vec::new();
    if h.fleet.spec(host).user.is_some() {
        words.extend(["sudo", "-n", "--"].map(String::from));
    }
    words.extend(argv.iter().cloned());
    let out = std::process::Command::new("ssh")
        .arg("-F")
        .arg(h.fleet.ssh_config())
        .args([host, "--", &nix_deploy_core::shell::join(&words)])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Deployment `id` as `d` reports it now.
async fn shown(d: &crate::daemon::Daemon, id: i64) -> Value {
    let (status, deployment) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/deployments/{id}", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{deployment}\n{}", d.log());
    deployment
}

fn run_of<'a>(deployment: &'a Value, name: &str) -> Option<&'a Value> {
    deployment["hosts"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_refuses_what_a_superseded_owner_would_still_do_after_a_takeover() {
    let names = ["w1", "w2"];
    // Every part kept to the end (the database too: its server stops with it).
    let Scene {
        p,
        h,
        before,
        db: _db,
        id,
    } = scene(&names, 4).await;
    let (a, b) = (&p.a, &p.b);
    // Freeze the owner once one host is deployed and the other activating:
    // the successor finds one host finished and one to settle.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (done, busy, seen) = loop {
        let deployment = shown(a, id).await;
        let deployed = names
            .iter()
            .find(|n| run_of(&deployment, n).is_some_and(|r| r["status"] == "deployed"));
        let activating = names.iter().zip(&before).find(|(name, old)| {
            h.fleet
                .activations(name)
                .iter()
                .any(|x| Some(&x.path) != old.as_ref() && x.end.is_none())
        });
        if let (Some(done), Some((busy, _))) = (deployed, activating)
            && done != busy
        {
            break (*done, *busy, deployment);
        }
        assert!(
            Instant::now() < deadline,
            "no host deployed while the other activates: {deployment:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    signal(a, "STOP");
    let created_at = seen["created_at"].as_i64().unwrap();
    let token = run_of(&seen, busy).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let deployment = wait_finished(b, id).await;
    report_is_what_the_hosts_run(&h, &deployment, &names);
    let histories: Vec<usize> = names
        .iter()
        .map(|n| h.fleet.activation_history(n).len())
        .collect();
    // Both hosts have seen the successor's epoch: the one it settled and
    // deployed (its probes), and the one the frozen owner had finished.
    for name in names {
        let seen = h
            .fleet
            .host_dir(name)
            .join(format!("run/nix-deploy/fence/{id}-{created_at}"));
        let seen = std::fs::read_to_string(&seen)
            .unwrap_or_else(|e| panic!("{name}: {}: {e}", seen.display()));
        assert_eq!(seen.trim(), "3", "{name}'s fence");
    }

    // What the frozen owner would still send, at the epoch it held (1; the
    // successor took it at 2 and resumed it at 3).
    let stale = Fence::new(id, created_at, 1).unwrap();
    let old = |name: &str| Before {
        running: before[names.iter().position(|n| *n == name).unwrap()].clone(),
        boot_generation: Some(1),
    };
    let refused = |host: &str, argv: Vec<String>, what: &str| {
        let (code, stderr) = run_as_root(&h, host, &argv);
        assert_eq!(
            code.to_string(),
            remote::FENCED_OUT,
            "{host} did not refuse {what}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("deployment #{id} at epoch 1"))
                && stderr.contains("seen epoch 3"),
            "{host}: {stderr}"
        );
    };
    // The host it finished (which the successor did not probe): switching
    // it back, as an abort would.
    let restore = remote::restorer_argv(Activation::Switch, &old(done), "stale1", false);
    refused(
        done,
        remote::activate_argv(None, restore, "stale1", 30, &stale),
        "a switch back",
    );
    // The host it was activating (which the successor settled and
    // deployed): activating it again, confirming its activation, switching
    // it back.
    let path = run_of(&deployment, busy).unwrap()["to"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let activate =
        remote::activator_argv(&path, Activation::Switch, &old(busy), 30, "stale2", false);
    refused(
        busy,
        remote::activate_argv(Some(&path), activate, "stale2", 30, &stale),
        "an activation (the profile first)",
    );
    refused(busy, remote::confirm_argv(&token, &stale), "a confirmation");
    refused(
        busy,
        remote::decide_argv(&token, Decision::TakenBack, &stale),
        "taking its activation back",
    );
    // The host says so for whoever investigates.
    let record = h
        .fleet
        .host_dir(busy)
        .join(format!("run/nix-deploy/fence/{id}-{created_at}.refused"));
    let refusals = std::fs::read_to_string(&record).unwrap();
    assert_eq!(refusals.lines().count(), 3, "{refusals}");

    // The owner wakes: it stops, and touches no host either.
    signal(a, "CONT");
    h.until(
        60,
        "the woken daemon to stop working on the deployment",
        || a.log().contains("lost the deployment"),
    );
    let after: Vec<usize> = names
        .iter()
        .map(|n| h.fleet.activation_history(n).len())
        .collect();
    assert_eq!(after, histories, "no host was activated or switched again");
    let again = wait_finished(b, id).await;
    report_is_what_the_hosts_run(&h, &again, &names);
}
