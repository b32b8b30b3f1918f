//! Unit tests of [`super`].

use super::*;

#[test]
fn webhook_urls_never_reach_a_message() {
    assert_eq!(
        redacted("https://hooks.slack.com/services/T000/B000/XXXX"),
        "https://hooks.slack.com/…"
    );
    assert_eq!(
        redacted("http://user:pw@example.org:8080/x?t=1"),
        "http://example.org:8080/…"
    );
    assert_eq!(redacted("nonsense"), "(a webhook URL)");
    let e = NotifyError::Failed {
        url: "https://hooks.slack.com/services/T000/B000/XXXX".into(),
        message: "HTTP 500".into(),
        attempts: 2,
    };
    assert!(!e.to_string().contains("XXXX"), "{e}");
}
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a receiver got: the request's head and body.
type Received = Arc<Mutex<Vec<(String, String)>>>;

/// A real HTTP receiver on loopback that fails the first `fail_first`
/// requests with 500, and records every request.
async fn receiver(fail_first: usize) -> (String, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        let mut served = 0usize;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 65536];
            let mut read = 0;
            // Read until the body (Content-Length) is complete.
            loop {
                let n = stream.read(&mut buf[read..]).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                read += n;
                let text = String::from_utf8_lossy(&buf[..read]).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        seen.lock()
                            .unwrap()
                            .push((head.to_string(), body.to_string()));
                        break;
                    }
                }
            }
            served += 1;
            let status = if served <= fail_first {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = stream
                .write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    (url, bodies)
}

fn notice() -> Notice {
    Notice::Finished {
        id: 7,
        status: "succeeded".into(),
    }
}

#[tokio::test]
async fn delivers_to_slack_and_json_webhooks() {
    let (slack, slack_bodies) = receiver(0).await;
    let (json, json_bodies) = receiver(0).await;
    let notifier = Notifier::new(
        NotifyConfig {
            slack_webhooks: vec![slack],
            json_webhooks: vec![json],
            ..NotifyConfig::default()
        },
        None,
        None,
    );
    let results = notifier.send_and_wait(notice()).await;
    assert!(results.iter().all(Result::is_ok));
    let slack: serde_json::Value =
        serde_json::from_str(&slack_bodies.lock().unwrap()[0].1).unwrap();
    assert_eq!(slack["text"], "✅ Deployment #7 succeeded");
    let json: serde_json::Value = serde_json::from_str(&json_bodies.lock().unwrap()[0].1).unwrap();
    assert_eq!(json["event"], "deployment.finished");
    assert_eq!(json["deployment_id"], 7);
}

#[tokio::test]
async fn json_webhooks_are_signed_as_github_signs_its_own() {
    let (url, requests) = receiver(0).await;
    let notifier = Notifier::new(
        NotifyConfig {
            json_webhooks: vec![url],
            ..NotifyConfig::default()
        },
        Some(Secret::new("hook-secret")),
        None,
    );
    let alert = Alert {
        id: 3,
        created_at: 1_000,
        kind: nix_deploy_core::drift::AlertKind::Unhealthy,
        host: Some("web1".into()),
        drift: Vec::new(),
        detail: Some("service nginx (failed)".into()),
    };
    let results = notifier.send_and_wait(Notice::Alert(alert)).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let (head, body) = requests.lock().unwrap()[0].clone();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {name} in {head}"))
    };
    assert_eq!(
        header(SIGNATURE_HEADER),
        signature(b"hook-secret", body.as_bytes())
    );
    // The receiver's check, as for GitHub's hook: the same code verifies.
    crate::daemon::github::verify_signature(
        b"hook-secret",
        body.as_bytes(),
        &header(SIGNATURE_HEADER),
    )
    .unwrap();
    assert_eq!(header(EVENT_HEADER), "host.unhealthy");
    assert_eq!(header(DELIVERY_HEADER), "alert-1000-3");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["event"], "host.unhealthy");
    assert_eq!(json["host"], "web1");
    assert_eq!(json["alert"]["detail"], "service nginx (failed)");
    assert_eq!(json["text"], "🩺 web1 is unhealthy: service nginx (failed)");
}

#[tokio::test]
async fn retries_with_backoff_until_delivered() {
    let (url, bodies) = receiver(2).await;
    let notifier = Notifier::new(
        NotifyConfig {
            json_webhooks: vec![url],
            retries: 3,
            ..NotifyConfig::default()
        },
        None,
        None,
    );
    let results = notifier.send_and_wait(notice()).await;
    assert!(results[0].is_ok(), "{results:?}");
    assert_eq!(
        bodies.lock().unwrap().len(),
        3,
        "two failures, then delivered"
    );

    let (url, _) = receiver(usize::MAX).await;
    let notifier = Notifier::new(
        NotifyConfig {
            json_webhooks: vec![url],
            retries: 1,
            ..NotifyConfig::default()
        },
        None,
        None,
    );
    let results = notifier.send_and_wait(notice()).await;
    assert!(
        results[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("2 attempt")
    );
}

#[tokio::test]
async fn send_never_blocks_the_caller() {
    // A receiver that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let notifier = Notifier::new(
        NotifyConfig {
            slack_webhooks: vec![url],
            timeout: Duration::from_secs(30),
            ..NotifyConfig::default()
        },
        None,
        None,
    );
    let started = std::time::Instant::now();
    notifier.send(notice());
    assert!(started.elapsed() < std::time::Duration::from_millis(50));
    drop(listener);
}

#[test]
fn a_wait_is_told_once_with_what_it_waits_for() {
    let window = |opens_at| Notice::WaitingForWindow {
        id: 4,
        hosts: vec!["p1".into()],
        reason: "deny window `freeze` is open".into(),
        opens_at,
    };
    let mut waits = Waits::default();
    assert!(waits.is_news(&window(Some(1_000))));
    assert!(!waits.is_news(&window(Some(1_000))), "the same wait again");
    assert!(
        waits.is_news(&window(Some(9_000))),
        "a later opening is news"
    );
    let json = window(Some(1_000)).json_payload();
    assert_eq!(json["event"], "deployment.waiting_for_window");
    assert_eq!(json["opens_at"], 1_000);
    let gate = Notice::AwaitingApproval(Box::new(GateNotice {
        id: 4,
        gate: 1,
        kind: GateKind::Approval,
        title: "approval rule production".into(),
        hosts: vec!["p1".into()],
        missing: "1 more from slack:U2 (production)".into(),
        deadline: None,
        summary: "p1: a → b".into(),
    }));
    let slack = gate.slack_payload();
    assert_eq!(slack["blocks"][1]["elements"][0]["value"], "4:1");
    assert!(slack["text"].as_str().unwrap().contains("awaits approval"));
}

#[test]
fn maps_events_to_notices() {
    let event = |kind| Event {
        id: 1,
        deployment_id: 3,
        at: 0,
        host: Some("web1".into()),
        kind,
    };
    assert_eq!(
        notice_from_event(&event(EventKind::HostFinished {
            status: HostStatus::RolledBack,
            from: Default::default(),
            to: Default::default(),
            duration_ms: 1,
            error: Some("activate failed\nmore".into()),
            after: None,
        })),
        Some(Notice::HostRolledBack {
            id: 3,
            host: "web1".into(),
            error: Some("activate failed\nmore".into())
        })
    );
    assert_eq!(
        notice_from_event(&event(EventKind::HostFinished {
            status: HostStatus::Deployed,
            from: Default::default(),
            to: Default::default(),
            duration_ms: 1,
            error: None,
            after: None,
        })),
        None
    );
    assert!(
        notice_from_event(&event(EventKind::Log {
            message: "x".into()
        }))
        .is_none()
    );
    let text = Notice::HostRolledBack {
        id: 3,
        host: "web1".into(),
        error: Some("boom\nmore".into()),
    }
    .text();
    assert_eq!(text, "↩️ Deployment #3: web1 was rolled back: boom");
}
