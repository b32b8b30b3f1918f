//! The chat and push hooks through a real daemon: Slack's slash command
//! (signatures, deadlines) and GitHub's push hook (signatures, the revision
//! pushed, queue order).

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use nix_deploy_testkit::HostSpec;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::daemon::*;
use crate::helpers::{Harness, git};

#[tokio::test(flavor = "multi_thread")]
async fn the_slack_command_verifies_signatures_and_deploys() {
    let responses = receiver();
    let h = Harness::start(vec![HostSpec::new("p620"), HostSpec::new("razer")]);
    let d = start_daemon(&h, "");
    let body = format!(
        "command=%2Fnix-deploy&text=deploy+p620+razer+--strategy%3Dcanary+--canary-soak%3D1s&user_id=U1&user_name=alice&channel_id=C1&response_url={}",
        form_urlencoded::byte_serialize(responses.url.as_bytes()).collect::<String>()
    );
    let post = |timestamp: i64, signature: String, body: String| {
        client()
            .post(format!("{}/hooks/slack", d.url))
            .header("x-slack-request-timestamp", timestamp.to_string())
            .header("x-slack-signature", signature)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // Forged and stale requests are refused and change nothing.
    let forged = post(now, "v0=deadbeef".into(), body.clone()).await.unwrap();
    assert_eq!(forged.status().as_u16(), 401);
    let stale = post(now - 600, slack_signature(now - 600, &body), body.clone())
        .await
        .unwrap();
    assert_eq!(stale.status().as_u16(), 401);
    assert_eq!(h.fleet.generation("p620"), None);

    let ok = post(now, slack_signature(now, &body), body.clone())
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let answer: Value = ok.json().await.unwrap();
    let id = answer["deployment_id"].as_i64().expect("deployment id");
    // The same signed request again (a replay within the window): refused.
    let replayed = post(now, slack_signature(now, &body), body.clone())
        .await
        .unwrap();
    assert_eq!(replayed.status().as_u16(), 409);
    let deployment = wait_finished(&d, id).await;
    assert_eq!(deployment["status"], "succeeded", "{deployment:#}");
    assert_eq!(deployment["strategy"], "canary");
    assert_eq!(deployment["requested_by"], "slack:U1");
    // Progress and the summary were posted to the response_url.
    let deadline = Instant::now() + Duration::from_secs(10);
    while responses.bodies.lock().unwrap().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bodies = responses.bodies.lock().unwrap().clone();
    assert!(bodies.len() >= 3 && bodies.len() <= 5, "{bodies:?}");
    // The plan first, naming the hosts; the summary last.
    assert!(
        bodies[0].contains("p620") && bodies[0].contains("razer"),
        "{bodies:?}"
    );
    assert!(bodies.last().unwrap().contains("succeeded"), "{bodies:?}");
    // One deployment only, whatever was replayed.
    let (_, list) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/deployments", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(list["deployments"].as_array().unwrap().len(), 1);

    // A bad argument gets an answer, not a deployment.
    let bad = "command=%2Fnix-deploy&text=--strategy%3Dyolo&user_id=U1&user_name=alice".to_string();
    let answer: Value = post(now, slack_signature(now, &bad), bad)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["response_type"], "ephemeral");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_push_to_main_deploys_that_revision() {
    let mut h = Harness::start(vec![HostSpec::new("g1")]);
    // The fleet flake in a git repository; the daemon pins it to pushed commits.
    let flake_dir = h.fleet.dir().join("flake");
    git(&flake_dir, &["init", "-q", "-b", "main"]);
    git(&flake_dir, &["add", "-A"]);
    git(&flake_dir, &["commit", "-q", "-m", "one"]);
    let first = git(&flake_dir, &["rev-parse", "HEAD"]);
    let first_path = h.fleet.toplevel("g1").unwrap();
    h.fleet.update("g1", |s| s.bump()).unwrap();
    git(&flake_dir, &["commit", "-q", "-a", "-m", "two"]);
    let flake = format!("git+file://{}", flake_dir.display());
    let d = start_daemon(&h, &format!("flake = \"{flake}\""));
    let push = |git_ref: &str, after: &str, at: &str| {
        json!({
            "ref": git_ref, "before": "0".repeat(40), "after": after, "deleted": false,
            "repository": { "full_name": "me/fleet" }, "pusher": { "name": "bob" },
            "head_commit": { "message": "change", "timestamp": at }
        })
        .to_string()
    };
    let deliveries = std::sync::atomic::AtomicU32::new(0);
    let send_as = |body: String, signature: String, event: &str, delivery: String| {
        client()
            .post(format!("{}/hooks/github", d.url))
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", signature)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let send = |body: String, signature: String, event: &str| {
        let n = deliveries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        send_as(body, signature, event, format!("delivery-{n}"))
    };
    let sign = |body: &str| {
        let mut mac = Hmac::<Sha256>::new_from_slice(GITHUB_SECRET.as_bytes()).unwrap();
        mac.update(body.as_bytes());
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let body = push("refs/heads/main", &first, "2026-01-02T10:00:00+01:00");
    let forged = send(body.clone(), "sha256=00".into(), "push")
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);
    let other = push("refs/heads/feature", &first, "2026-01-02T10:00:00+01:00");
    let ignored = send(other.clone(), sign(&other), "push").await.unwrap();
    assert_eq!(ignored.status().as_u16(), 202);
    let ignored: Value = ignored.json().await.unwrap();
    assert!(ignored["ignored"].is_string());

    // The push of the *first* commit deploys the first commit, not the tip;
    // answered at once (GitHub gives a hook ten seconds), whatever the hosts
    // do: the answer says `queued`, recorded before anything ran.
    let accepted = send_as(body.clone(), sign(&body), "push", "the-push".into())
        .await
        .unwrap();
    assert_eq!(accepted.status().as_u16(), 202);
    let accepted: Value = accepted.json().await.unwrap();
    assert_eq!(accepted["status"], "queued");
    let id = accepted["id"].as_i64().unwrap();
    let deployment = wait_finished(&d, id).await;
    assert_eq!(deployment["status"], "succeeded", "{deployment:#}");
    assert_eq!(deployment["requested_by"], "github:bob");
    assert!(deployment["flake"].as_str().unwrap().contains(&first));
    assert_eq!(h.fleet.current_system("g1"), Some(first_path.clone()));

    // The captured delivery, sent again: refused, nothing deployed.
    let replayed = send_as(body.clone(), sign(&body), "push", "the-push".into())
        .await
        .unwrap();
    assert_eq!(replayed.status().as_u16(), 409);
    // A newer push deploys; then an older one (a new delivery of an old
    // push) never downgrades the fleet.
    let tip = git(&flake_dir, &["rev-parse", "HEAD"]);
    let newer = push("refs/heads/main", &tip, "2026-01-02T11:00:00+01:00");
    let accepted: Value = send(newer.clone(), sign(&newer), "push")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let deployment = wait_finished(&d, accepted["id"].as_i64().unwrap()).await;
    assert_eq!(deployment["status"], "succeeded", "{deployment:#}");
    let tip_path = h.fleet.current_system("g1").unwrap();
    assert_ne!(tip_path, first_path);
    let older = send(body.clone(), sign(&body), "push").await.unwrap();
    assert_eq!(older.status().as_u16(), 409);
    assert_eq!(h.fleet.current_system("g1"), Some(tip_path));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_slack_command_answers_within_its_deadline_whatever_the_hosts_do() {
    let responses = receiver();
    let h = Harness::start(vec![HostSpec::new("f1"), HostSpec::new("f2")]);
    let d = start_daemon(&h, "");
    h.fleet.freeze_host("f1").unwrap();
    let body = format!(
        "command=%2Fnix-deploy&text=deploy+f1+f2&user_id=U1&user_name=alice&channel_id=C1&response_url={}",
        form_urlencoded::byte_serialize(responses.url.as_bytes()).collect::<String>()
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let answer = client()
        .post(format!("{}/hooks/slack", d.url))
        .header("x-slack-request-timestamp", now.to_string())
        .header("x-slack-signature", slack_signature(now, &body))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    // Slack wants an answer within three seconds: it comes before the
    // deployment can end (f1 is frozen: it is still queued or running).
    assert_eq!(answer.status().as_u16(), 200);
    let answer: Value = answer.json().await.unwrap();
    let id = answer["deployment_id"].as_i64().unwrap();
    let (_, shown) = call(
        reqwest::Method::GET,
        &format!("{}/api/v1/deployments/{id}", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert!(
        matches!(shown["status"].as_str(), Some("queued" | "running")),
        "{shown:#}"
    );
    let deployment = wait_finished(&d, id).await;
    h.fleet.thaw_host("f1").unwrap();
    assert_ne!(deployment["status"], "running");
    let bodies = responses.bodies.lock().unwrap().clone();
    assert!(!bodies.is_empty() && bodies.len() <= 5, "{bodies:?}");
}

/// Issue 18's fault 3: pushes queued behind a running deployment start in
/// the order they came, and a newer push of the branch supersedes the older
/// ones still queued: the fleet ends on the newest commit, and no older one
/// is ever deployed after it.
#[tokio::test(flavor = "multi_thread")]
async fn queued_pushes_deploy_the_newest_and_never_an_older_one_after_it() {
    let mut h = Harness::start(vec![HostSpec::new("q1")]);
    let flake_dir = h.fleet.dir().join("flake");
    git(&flake_dir, &["init", "-q", "-b", "main"]);
    // Commits 1 to 4, each a new system for q1 that takes a while to activate.
    let mut commits = Vec::new();
    for n in 0..4 {
        h.fleet
            .update("q1", |s| {
                s.bump();
                s.activation_delay_ms = 1500;
            })
            .unwrap();
        git(&flake_dir, &["add", "-A"]);
        git(&flake_dir, &["commit", "-q", "-m", &format!("commit {n}")]);
        commits.push((
            git(&flake_dir, &["rev-parse", "HEAD"]),
            h.fleet.toplevel("q1").unwrap(),
        ));
    }
    let flake = format!("git+file://{}", flake_dir.display());
    let d = start_daemon(&h, &format!("flake = \"{flake}\""));
    let sign = |body: &str| {
        let mut mac = Hmac::<Sha256>::new_from_slice(GITHUB_SECRET.as_bytes()).unwrap();
        mac.update(body.as_bytes());
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let push = async |n: usize| -> i64 {
        let body = json!({
            "ref": "refs/heads/main", "before": "0".repeat(40), "after": commits[n].0,
            "deleted": false, "repository": { "full_name": "me/fleet" },
            "pusher": { "name": "bob" },
            "head_commit": { "message": "change", "timestamp": format!("2026-01-02T10:0{n}:00+01:00") }
        })
        .to_string();
        let answer = client()
            .post(format!("{}/hooks/github", d.url))
            .header("x-github-event", "push")
            .header("x-github-delivery", format!("delivery-{n}"))
            .header("x-hub-signature-256", sign(&body))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 202);
        let answer: Value = answer.json().await.unwrap();
        answer["id"].as_i64().unwrap()
    };
    let first = push(0).await;
    // The first push's deployment holds the host while the others arrive.
    let deadline = Instant::now() + Duration::from_secs(60);
    while h.fleet.activations("q1").is_empty() {
        assert!(Instant::now() < deadline, "the first push never activated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut later = Vec::new();
    for n in 1..4 {
        later.push(push(n).await);
    }
    let first = wait_finished(&d, first).await;
    assert_eq!(first["status"], "succeeded", "{first:#}");
    let mut finished = Vec::new();
    for id in &later {
        finished.push(wait_finished(&d, *id).await);
    }
    // The two in between never start; the newest deploys.
    assert_eq!(finished[0]["status"], "superseded", "{:#}", finished[0]);
    assert_eq!(finished[1]["status"], "superseded", "{:#}", finished[1]);
    assert_eq!(finished[2]["status"], "succeeded", "{:#}", finished[2]);
    assert_eq!(h.fleet.current_system("q1"), Some(commits[3].1.clone()));
    let activated: Vec<String> = h
        .fleet
        .activations("q1")
        .into_iter()
        .map(|a| a.path)
        .collect();
    assert!(
        !activated.contains(&commits[1].1) && !activated.contains(&commits[2].1),
        "an older push was deployed: {activated:?}"
    );
}
