//! Real faults: a new generation that cuts off SSH (magic rollback), a frozen
//! host, failing HTTP checks against a real local server, hosts unhealthy
//! before we start. Each test asserts the hosts' real state.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use nix_deploy_testkit::HostSpec;

use crate::helpers::{Harness, host, status};

#[test]
fn a_generation_that_cuts_off_ssh_is_reverted_by_the_hosts_watchdog() {
    let mut h = Harness::start(vec![HostSpec::new("edge"), HostSpec::new("other")]);
    assert_eq!(h.deploy(&[]).0, 0);
    let old = h.fleet.current_system("edge").unwrap();
    // The new generation's activation kills the host's sshd: no new SSH
    // connection can be made, so the new system is never confirmed.
    h.fleet
        .update("edge", |s| {
            s.bump();
            s.kill_sshd = true;
        })
        .unwrap();
    let (code, report, stderr) = h.deploy(&["edge", "--confirm-timeout", "3"]);
    assert_eq!(code, 1, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "edge"), "rolled-back", "{report:#}");
    let error = host(&report, "edge")["error"].as_str().unwrap();
    assert!(error.contains("confirm"), "{error}");
    assert!(error.contains("watchdog reverted"), "{error}");
    // Back on the old system and generation, by itself.
    assert_eq!(h.fleet.current_system("edge"), Some(old));
    assert_eq!(h.fleet.generation("edge"), Some(1));
    // The watchdog really ran the old generation's activation on the host.
    let activations = h.fleet.activations("edge");
    assert_eq!(activations.len(), 3, "first, new, revert: {activations:?}");
}

#[test]
fn a_confirmed_deployment_disarms_the_watchdog() {
    let mut h = Harness::start(vec![HostSpec::new("calm")]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet.update("calm", |s| s.bump()).unwrap();
    let new = h.fleet.toplevel("calm").unwrap();
    let (code, _, stderr) = h.deploy(&["--confirm-timeout", "2"]);
    assert_eq!(code, 0, "{stderr}");
    // Every watchdog decided (each writes its result as it ends), and
    // decided to keep the new system: none is left to revert it.
    let results = wait_for_results(&h, "calm");
    assert!(results.lines().all(|l| l == "confirmed"), "{results}");
    assert_eq!(h.fleet.current_system("calm"), Some(new));
    assert_eq!(h.fleet.generation("calm"), Some(2));
}

#[test]
fn a_frozen_host_fails_within_the_timeouts_and_the_others_deploy() {
    let h = Harness::start(vec![
        HostSpec::new("ice"),
        HostSpec::new("ok1"),
        HostSpec::new("ok2"),
    ]);
    h.fleet.freeze_host("ice").unwrap();
    let (code, report, stderr) = h.deploy(&["--continue-on-failure"]);
    h.fleet.thaw_host("ice").unwrap();
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(status(&report, "ice"), "unreachable", "{report:#}");
    assert!(
        host(&report, "ice")["error"]
            .as_str()
            .unwrap()
            .contains("ice")
    );
    assert_eq!(status(&report, "ok1"), "deployed");
    assert_eq!(status(&report, "ok2"), "deployed");
    // It failed because it did not answer in time (not, say, refused).
    let error = host(&report, "ice")["error"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(
        error.contains("timed out") || error.contains("timeout"),
        "{error}"
    );
    assert_eq!(h.fleet.generation("ice"), None);
}

#[test]
fn a_host_frozen_during_activation_fails_within_the_timeouts() {
    let mut h = Harness::start(vec![HostSpec::new("slow"), HostSpec::new("fine")]);
    assert_eq!(h.deploy(&[]).0, 0);
    h.fleet
        .update("slow", |s| {
            s.bump();
            s.activation_delay_ms = 1500;
        })
        .unwrap();
    h.fleet.update("fine", |s| s.bump()).unwrap();
    let out = std::thread::scope(|scope| {
        let deploy = scope.spawn(|| {
            h.deploy(&[
                "--continue-on-failure",
                "--activation-timeout",
                "8",
                "--command-timeout",
                "4",
            ])
        });
        // Freeze the host while its activation sleeps.
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.fleet.activations("slow").len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        h.fleet.freeze_host("slow").unwrap();
        deploy.join().unwrap()
    });
    h.fleet.thaw_host("slow").unwrap();
    let (code, report, stderr) = out;
    assert_eq!(code, 1, "{stderr}");
    let slow = status(&report, "slow");
    assert!(slow == "failed" || slow == "rollback-failed", "{report:#}");
    assert!(
        host(&report, "slow")["error"]
            .as_str()
            .unwrap()
            .contains("slow")
    );
    assert_eq!(status(&report, "fine"), "deployed");
    // Stopped by a timeout, not by the host coming back.
    let error = host(&report, "slow")["error"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(
        error.contains("timed out") || error.contains("timeout"),
        "{error}"
    );
}

/// The results of `host`'s watchdogs, once every one of them wrote its own.
fn wait_for_results(h: &Harness, host: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let armed = h
            .fleet
            .ssh(host, "ls /run/nix-deploy/ | grep -c '\\.pid$' || true")
            .unwrap();
        let results = h
            .fleet
            .ssh(host, "cat /run/nix-deploy/*.result 2>/dev/null || true")
            .unwrap();
        let armed: usize = armed.trim().parse().unwrap_or(0);
        if armed > 0 && results.lines().count() >= armed {
            return results;
        }
        assert!(
            Instant::now() < deadline,
            "watchdogs of {host} never decided: {results}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A tiny real HTTP server on loopback whose status code the test controls.
fn http_server() -> (String, Arc<AtomicU16>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/-/healthy", listener.local_addr().unwrap());
    let code = Arc::new(AtomicU16::new(200));
    let served = code.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let status = served.load(Ordering::SeqCst);
            let body = if status == 200 {
                "Prometheus is Healthy."
            } else {
                "down"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, code)
}

#[test]
fn a_failing_http_check_rolls_back_and_a_passing_one_deploys() {
    let (url, code) = http_server();
    let check = format!(r#"{{ http = "{url}"; status = 200; body = "Healthy"; period = 1; }}"#);
    let mut h = Harness::start(vec![HostSpec::new("mon").health_check(&check)]);
    let (c, report, stderr) = h.deploy(&[]);
    assert_eq!(c, 0, "{report:#}\n{stderr}");
    let old = h.fleet.current_system("mon").unwrap();

    // The new generation "breaks" the endpoint.
    h.fleet.update("mon", |s| s.bump()).unwrap();
    code.store(503, Ordering::SeqCst);
    // The endpoint is down before we start too: pre-flight says so, --force goes on.
    let (c, report, _) = h.deploy(&[]);
    assert_eq!(c, 1);
    assert_eq!(status(&report, "mon"), "unhealthy", "{report:#}");
    assert!(
        host(&report, "mon")["error"]
            .as_str()
            .unwrap()
            .contains("before deployment")
    );
    assert_eq!(
        h.fleet.generation("mon"),
        Some(1),
        "an unhealthy host is not touched"
    );

    let (c, report, _) = h.deploy(&["--force", "--health-timeout", "3"]);
    assert_eq!(c, 1);
    assert_eq!(
        status(&report, "mon"),
        "rollback-failed",
        "the old system is not healthy either: {report:#}"
    );

    code.store(200, Ordering::SeqCst);
    let (c, report, stderr) = h.deploy(&["--health-timeout", "5"]);
    assert_eq!(c, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "mon"), "deployed");
    assert_ne!(h.fleet.current_system("mon"), Some(old));
    // Each attempt's result is in the history.
    let id = report["id"].as_i64().unwrap().to_string();
    let (_, shown, _) = h.json(&["show", &id]);
    let health = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "health-checked")
        .expect("health results recorded");
    assert_eq!(health["results"][0]["ok"], true);
    assert!(
        !health["results"][0]["history"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn pre_flight_refuses_a_host_without_enough_free_space() {
    let h = Harness::start(vec![HostSpec::new("full")]);
    let (code, report, _) = h.deploy(&["--min-free-space", "999999999"]);
    assert_eq!(code, 1);
    assert_eq!(status(&report, "full"), "failed");
    assert!(
        host(&report, "full")["error"]
            .as_str()
            .unwrap()
            .contains("free")
    );
    assert_eq!(h.fleet.generation("full"), None);
}

#[test]
fn skip_validation_skips_health_checks_but_not_the_current_system_check() {
    let mut h = Harness::start(vec![
        HostSpec::new("em")
            .failing_service("api")
            .health_check(r#"{ service = "api"; }"#),
    ]);
    // The service never comes up: a normal deployment fails validation...
    let (code, report, _) = h.deploy(&["--health-timeout", "2"]);
    assert_eq!(code, 1);
    assert_eq!(
        status(&report, "em"),
        "failed",
        "first deployment, nothing to roll back to"
    );
    // ...an emergency deployment goes through.
    h.fleet.update("em", |s| s.bump()).unwrap();
    let (code, report, stderr) = h.deploy(&["--skip-validation"]);
    assert_eq!(code, 0, "{report:#}\n{stderr}");
    assert_eq!(status(&report, "em"), "deployed");
}
