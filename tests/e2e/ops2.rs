//! Operating the fleet with other people, continued, for real: a daemon
//! whose schedule starts a deployment that waits for its window and then
//! for approval (notified once each, approved with a signed Slack button;
//! forged and replayed clicks refused), a schedule that missed three runs
//! while the daemon was down running once, and chat deployments confirmed
//! or cancelled by button. Promotion is in `promotion.rs`.

use std::time::{Duration, Instant};

use nix_deploy_testkit::HostSpec;
use serde_json::{Value, json};

use crate::daemon::{
    Daemon, READ_TOKEN, Receiver, call, client, receiver, slack_signature, start_daemon_confirming,
    start_daemon_in, wait_finished,
};
use crate::helpers::Harness;

pub(crate) const STAGING_TOKEN: &str = "staging-token-9876543210";

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A cron pattern (seconds first, UTC) that fires at each of `times` (Unix
/// seconds); times across a minute or hour boundary make it fire a few more
/// times, a minute or an hour later.
fn cron_at_each(times: &[u64]) -> String {
    let field = |part: fn(u64) -> u64| {
        let mut values: Vec<u64> = times.iter().map(|t| part(*t)).collect();
        values.sort();
        values.dedup();
        values
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "{} {} {} * * *",
        field(|t| t % 60),
        field(|t| (t / 60) % 60),
        field(|t| (t / 3600) % 24)
    )
}

/// A click on one of our buttons, as Slack posts it.
fn click(user: &str, action: &str, value: &str, response_url: &str) -> String {
    let payload = json!({
        "type": "block_actions",
        "user": { "id": user, "username": "someone" },
        "channel": { "id": "C1" },
        "response_url": response_url,
        "actions": [{ "action_id": action, "value": value, "type": "button" }],
    });
    format!(
        "payload={}",
        form_urlencoded::byte_serialize(payload.to_string().as_bytes()).collect::<String>()
    )
}

/// POST `body` to the daemon's `path` signed as Slack does at `at` (or
/// with `signature`); the status and the JSON answer.
async fn slack_post(
    d: &Daemon,
    path: &str,
    body: &str,
    at: i64,
    signature: Option<&str>,
) -> (u16, Value) {
    let response = client()
        .post(format!("{}{path}", d.url))
        .header("x-slack-request-timestamp", at.to_string())
        .header(
            "x-slack-signature",
            signature.map_or_else(|| slack_signature(at, body), str::to_string),
        )
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `user` clicks the button `action` (with `value`) at `at`; the answer
/// goes to `responses` too.
async fn press(
    d: &Daemon,
    user: &str,
    action: &str,
    value: &str,
    responses: &Receiver,
    at: i64,
) -> (u16, Value) {
    let body = click(user, action, value, &responses.url);
    slack_post(d, "/hooks/slack/interactive", &body, at, None).await
}

/// The first body `r` received that `wanted` accepts (waits up to 90 s).
async fn received(r: &Receiver, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let bodies = r.bodies.lock().unwrap().clone();
        if let Some(found) = bodies
            .iter()
            .filter_map(|b| serde_json::from_str::<Value>(b).ok())
            .find(|v| wanted(v))
        {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "never received {what}: {bodies:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the button `action` in a message with blocks.
fn button(message: &Value, action: &str) -> String {
    message["blocks"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|b| b["elements"].as_array().into_iter().flatten())
        .find(|e| e["action_id"] == action)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no {action} button in {message:#}"))
        .to_string()
}

async fn get(d: &Daemon, path: &str) -> Value {
    let (code, body) = call(
        reqwest::Method::GET,
        &format!("{}{path}", d.url),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    body
}

fn slack_deployments(list: &Value) -> usize {
    list["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["trigger"] == "slack")
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_waits_for_its_window_and_a_slack_button_approves_it_and_chat_confirms() {
    let slack_hook = receiver();
    let json_hook = receiver();
    let responses = receiver();
    let h = Harness::start(vec![
        HostSpec::new("sch1").tags(&["prod"]),
        HostSpec::new("cf1"),
        HostSpec::new("cf2"),
        HostSpec::new("mis1"),
    ]);
    // An hourly schedule whose last run was three hours ago: the daemon was
    // down for three of its occurrences. It runs once at start, not three
    // times.
    let now = now_secs();
    let minute = (now / 60 + 30) % 60;
    {
        let store = nix_deploy::store::Store::open(h.state_dir()).await.unwrap();
        store
            .schedule_baseline("hourly", ((now - 3 * 3600 - 1) * 1000) as i64)
            .await
            .unwrap();
        store.close().await;
    }
    let staging = h.state_dir().join("staging.token");
    std::fs::write(&staging, STAGING_TOKEN).unwrap();
    // A deny window on sch1 that opened a second ago and closes 19 s from
    // now; the schedule fires 6, 9 and 12 s from now.
    let t0 = now_secs();
    let closes = t0 + 19;
    let d = start_daemon_confirming(
        &h,
        h.state_dir(),
        "",
        &format!(
            r#"
[[tokens]]
name = "staging"
file = "{staging}"
scope = "deploy"
hosts = ["@staging"]

[[chat.users]]
id = "U2"
scope = "deploy"

[[window]]
name = "freeze"
kind = "deny"
schedule = "{window}"
duration = "20s"
hosts = ["sch1"]

[[approval]]
name = "production"
hosts = ["@prod"]
approvers = ["slack:U2"]
timeout = "10m"

[[schedule]]
name = "soon"
cron = "{cron}"
request = {{ hosts = ["sch1"] }}

[[schedule]]
name = "hourly"
cron = "0 {minute} * * * *"
request = {{ hosts = ["mis1"] }}

[notifications]
slack-webhooks = ["{slack}"]
json-webhooks = ["{json}"]
"#,
            staging = staging.display(),
            window = cron_at_each(&[t0 - 1]),
            cron = cron_at_each(&[t0 + 6, t0 + 9, t0 + 12]),
            slack = slack_hook.url,
            json = json_hook.url,
        ),
        1,
    );

    // The schedule's deployment: recorded with its trigger, waiting for the
    // window, which shows when it opens.
    let mut id = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let waiting = loop {
        let list = get(&d, "/api/v1/deployments").await;
        if let Some(found) = list["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["requested_by"] == "schedule:soon")
        {
            id = found["id"].as_i64().unwrap();
            if found["status"] == "waiting-for-window" {
                break found.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no scheduled deployment waiting for its window (#{id})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(waiting["trigger"], "schedule");
    assert_eq!(waiting["waiting"]["hosts"], json!(["sch1"]));
    assert_eq!(waiting["waiting"]["opens_at"], json!(closes * 1000));
    let windows = get(&d, "/api/v1/windows").await;
    assert_eq!(windows["windows"][0]["open"], true, "{windows:#}");
    assert_eq!(windows["windows"][0]["closes_at"], json!(closes * 1000));
    assert_eq!(
        windows["windows"][0]["next_opening"],
        json!((t0 - 1 + 86_400) * 1000)
    );
    let told = received(&json_hook, "the window notice", |v| {
        v["event"] == "deployment.waiting_for_window" && v["deployment_id"] == id
    })
    .await;
    assert_eq!(told["opens_at"], json!(closes * 1000));
    // A token limited to staging may neither cancel nor resume it.
    for verb in ["cancel", "resume"] {
        let (code, body) = call(
            reqwest::Method::POST,
            &format!("{}/api/v1/deployments/{id}/{verb}", d.url),
            Some(STAGING_TOKEN),
            Some(json!({})),
        )
        .await;
        assert_eq!(code, 403, "{verb}: {body}");
    }

    // Then it waits for approval, and Slack gets the gate with its buttons.
    let gate = received(&slack_hook, "the gate with buttons", |v| {
        v["text"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("#{id} awaits approval")))
    })
    .await;
    let value = button(&gate, "approve");
    assert_eq!(value, format!("{id}:1"));
    assert_eq!(button(&gate, "reject"), value);
    assert!(
        gate["blocks"][0]["text"]["text"]
            .as_str()
            .unwrap()
            .contains("sch1"),
        "what an approver sees: {gate:#}"
    );
    received(&json_hook, "the approval notice", |v| {
        v["event"] == "deployment.awaiting_approval" && v["deployment_id"] == id
    })
    .await;
    let activated = h.fleet.activations("sch1");
    assert!(activated.is_empty(), "nothing ran before approval");
    assert!(now_secs() >= closes, "it waited for the window to close");

    let interactive = "/hooks/slack/interactive";
    let at = now_secs() as i64;
    // A forged click: 401, nothing changes.
    let approve_u2 = click("U2", "approve", &value, &responses.url);
    let (code, _) = slack_post(&d, interactive, &approve_u2, at, Some("v0=00ff")).await;
    assert_eq!(code, 401);
    // U1 may deploy but is no approver: refused.
    let (code, answer) = press(&d, "U1", "approve", &value, &responses, at).await;
    assert_eq!(code, 200);
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(
        answer["text"].as_str().unwrap().contains("not an approver"),
        "{answer}"
    );
    let shown = get(&d, &format!("/api/v1/deployments/{id}")).await;
    assert_eq!(shown["status"], "awaiting-approval");
    assert_eq!(shown["gates"][0]["approvals"], json!([]));
    // U2 approves with the button: the deployment goes on.
    let (code, answer) = slack_post(&d, interactive, &approve_u2, at, None).await;
    assert_eq!(code, 200);
    assert_eq!(answer["ok"], true, "{answer}");
    // The same signed click again: a replay, 409.
    let (code, _) = slack_post(&d, interactive, &approve_u2, at, None).await;
    assert_eq!(code, 409);
    let done = wait_finished(&d, id).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["gates"][0]["approvals"][0]["by"], "slack:U2");
    assert_eq!(done["gates"][0]["approvals"][0]["via"], "slack");
    assert_eq!(h.fleet.generation("sch1"), Some(1));
    // Once each, and one scheduled deployment: the occurrences while it ran
    // were passed over.
    let bodies = json_hook.bodies.lock().unwrap().clone();
    let told = |event: &str| {
        bodies
            .iter()
            .filter(|b| b.contains(event) && b.contains(&format!("\"deployment_id\":{id}")))
            .count()
    };
    assert_eq!(told("deployment.waiting_for_window"), 1, "{bodies:#?}");
    assert_eq!(told("deployment.awaiting_approval"), 1, "{bodies:#?}");
    let list = get(&d, "/api/v1/deployments").await;
    let scheduled: Vec<&Value> = list["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["requested_by"] == "schedule:soon")
        .collect();
    assert_eq!(scheduled.len(), 1, "{list:#}");
    let schedules = get(&d, "/api/v1/schedules").await;
    assert_eq!(schedules["schedules"][0]["last_deployment_id"], id);
    let caught_up: Vec<&Value> = list["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["requested_by"] == "schedule:hourly")
        .collect();
    assert_eq!(caught_up.len(), 1, "one run for three missed: {list:#}");
    let caught_up = caught_up[0]["id"].as_i64().unwrap();
    let done = wait_finished(&d, caught_up).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(h.fleet.generation("mis1"), Some(1));
    assert_eq!(schedules["schedules"][1]["name"], "hourly");
    assert!(
        schedules["schedules"][1]["next_run"].as_i64().unwrap() > (now_secs() * 1000) as i64,
        "{schedules:#}"
    );
    let (_, shown, _) = tokio::task::block_in_place(|| h.json(&["show", &caught_up.to_string()]));
    assert!(
        shown["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"]
                .as_str()
                .is_some_and(|m| m.contains("started by schedule `hourly`")
                    && m.contains("2 earlier occurrence(s) missed"))),
        "{shown:#}"
    );

    // A chat deployment of two hosts (more than confirm-above = 1): its plan
    // comes with Confirm and Cancel; Cancel deploys nothing.
    let slash = "command=%2Fnix-deploy&text=deploy+cf1+cf2&user_id=U1&user_name=alice&channel_id=C1&response_url="
        .to_string()
        + &form_urlencoded::byte_serialize(responses.url.as_bytes()).collect::<String>();
    let ask = |n: usize| {
        let responses = &responses;
        async move {
            let mut found = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(90);
            while found.len() < n {
                found = responses
                    .bodies
                    .lock()
                    .unwrap()
                    .iter()
                    .filter_map(|b| serde_json::from_str::<Value>(b).ok())
                    .filter(|v| v["blocks"][1]["block_id"] == "confirm")
                    .collect();
                assert!(Instant::now() < deadline, "no plan to confirm");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            found.pop().unwrap()
        }
    };
    let (code, answer) = slack_post(&d, "/hooks/slack", &slash, at, None).await;
    assert_eq!(code, 200, "{answer}");
    assert!(answer.get("deployment_id").is_none(), "{answer}");
    let plan = ask(1).await;
    assert!(plan["text"].as_str().unwrap().contains("cf1"), "{plan:#}");
    let request = button(&plan, "cancel");
    let (_, answer) = press(&d, "U1", "cancel", &request, &responses, at).await;
    assert_eq!(answer["ok"], true, "{answer}");
    let (_, answer) = press(&d, "U1", "confirm", &request, &responses, at).await;
    assert_eq!(answer["ok"], false, "cancelled already: {answer}");
    assert_eq!(slack_deployments(&get(&d, "/api/v1/deployments").await), 0);
    assert_eq!(h.fleet.generation("cf1"), None);

    // Asked again and confirmed: deployed.
    let at = at + 1;
    let (code, _) = slack_post(&d, "/hooks/slack", &slash, at, None).await;
    assert_eq!(code, 200);
    let plan = ask(2).await;
    let request = button(&plan, "confirm");
    let (_, answer) = press(&d, "U1", "confirm", &request, &responses, at).await;
    assert_eq!(answer["ok"], true, "{answer}");
    let list = get(&d, "/api/v1/deployments").await;
    assert_eq!(slack_deployments(&list), 1, "{list:#}");
    let confirmed = list["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["trigger"] == "slack")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let done = wait_finished(&d, confirmed).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["requested_by"], "slack:U1");
    assert_eq!(h.fleet.generation("cf1"), Some(1));
    assert_eq!(h.fleet.generation("cf2"), Some(1));
}

/// Two daemons on one PostgreSQL share a `[[schedule]]`: only the elected
/// leader starts its deployments (the follower never even claims an
/// occurrence), one for each occurrence.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_of_two_daemons_starts_scheduled_deployments() {
    let h = Harness::start(vec![HostSpec::new("lead1")]);
    let db = nix_deploy_testkit::Postgres::database().unwrap();
    let states = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let t0 = now_secs();
    let occurrences = [t0 + 6, t0 + 16];
    let top = format!("database = \"{}\"", db.url);
    let extra = format!(
        r#"
[cluster]
heartbeat = "1s"
lease-ttl = "15s"

[[schedule]]
name = "twice"
cron = "{}"
request = {{ hosts = ["lead1"] }}
"#,
        cron_at_each(&occurrences)
    );
    let a = start_daemon_in(&h, states[0].path(), &top, &extra);
    let b = start_daemon_in(&h, states[1].path(), &top, &extra);
    let cluster = get(&b, "/api/v1/cluster").await;
    let leader = cluster["coordinators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["leader"] == true)
        .unwrap_or_else(|| panic!("no leader: {cluster:#}"))["pid"]
        .as_i64()
        .unwrap();
    let pids = [a.child.id() as i64, b.child.id() as i64];
    assert!(pids.contains(&leader), "{leader} is neither of {pids:?}");
    // Both occurrences start a deployment, each held by the leader.
    let deadline = Instant::now() + Duration::from_secs(90);
    let scheduled = loop {
        let list = get(&a, "/api/v1/deployments").await;
        let scheduled: Vec<Value> = list["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["requested_by"] == "schedule:twice")
            .cloned()
            .collect();
        if scheduled.len() >= occurrences.len() {
            break scheduled;
        }
        assert!(
            Instant::now() < deadline,
            "not every occurrence started a deployment: {scheduled:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for deployment in &scheduled {
        assert_eq!(deployment["trigger"], "schedule");
        assert_eq!(
            deployment["pid"], leader,
            "a scheduled deployment was started by the follower: {deployment:#}"
        );
        let id = deployment["id"].as_i64().unwrap();
        assert_eq!(wait_finished(&a, id).await["status"], "succeeded");
    }
}
