//! Incoming hooks: the Slack `/nix-deploy` slash command and GitHub pushes.
//! Both verify their signatures before reading anything else; a forged,
//! stale or malformed request changes nothing.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use nix_deploy_core::events::EventKind;
use nix_deploy_core::fleet::Selection;
use nix_deploy_core::options::Request;
use nix_deploy_core::reports::PlanReport;

use crate::daemon::slack::{self, ChatRequest, SlashCommand};
use crate::daemon::{ApiError, AppState, github};
use crate::engine::DeployRequest;
use crate::store::BranchHead;

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn now_unix() -> i64 {
    crate::now_ms() / 1000
}

fn ephemeral(text: String) -> Response {
    Json(serde_json::json!({ "response_type": "ephemeral", "text": text })).into_response()
}

pub async fn slack(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = super::bytes(body)?;
    let (Some(config), Some(secret)) = (&state.config.slack, &state.slack_secret) else {
        return Err(ApiError::NotFound(
            "the Slack command is not configured".into(),
        ));
    };
    let timestamp = header(&headers, "x-slack-request-timestamp").unwrap_or("");
    let signature = header(&headers, "x-slack-signature").unwrap_or("");
    slack::verify_signature(secret.expose(), timestamp, &body, signature, now_unix())
        .map_err(|e| ApiError::Unauthorized(format!("Slack signature: {e}")))?;
    // A signed request is good for the replay window; within it, only once.
    let window_ms = 2 * slack::REPLAY_WINDOW_SECS * 1000;
    if !state
        .store()
        .remember_delivery("slack", &format!("{timestamp}:{signature}"), window_ms)
        .await?
    {
        return Err(ApiError::Conflict(
            "this signed Slack request was already received (replay refused)".into(),
        ));
    }
    let command = slack::parse_form(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed slash command: {e}")))?;
    let request = match slack::parse_text(&command.text) {
        Ok(r) => r,
        Err(e) => return Ok(ephemeral(format!("{e}\n{}", usage()))),
    };
    let who = format!("slack:{}", command.user_name);
    match request {
        ChatRequest::Help => Ok(ephemeral(usage())),
        ChatRequest::Status => {
            let hosts = state.store().host_states().await?;
            let mut text = String::from("*Fleet status*\n");
            for h in hosts {
                text.push_str(&format!(
                    "• {} — generation {} — last: {}\n",
                    h.name,
                    h.generation.map(|g| g.to_string()).unwrap_or("-".into()),
                    h.last_status.as_deref().unwrap_or("-")
                ));
            }
            Ok(ephemeral(text))
        }
        ChatRequest::Cancel { id } => {
            let id = match id {
                Some(id) => Some(id),
                None => state
                    .store()
                    .deployments(20)
                    .await?
                    .into_iter()
                    .find(|d| d.status.is_active())
                    .map(|d| d.id),
            };
            let Some(id) = id else {
                return Ok(ephemeral("No deployment is running.".into()));
            };
            if !state.cancel(id, &who).await? {
                return Ok(ephemeral(format!("Deployment #{id} is not running.")));
            }
            Ok(Json(serde_json::json!({
                "response_type": "in_channel",
                "text": format!("Cancelling deployment #{id}: no new hosts will start; running hosts finish or roll back."),
            }))
            .into_response())
        }
        ChatRequest::Deploy(chat) => {
            slack_deploy(
                state.clone(),
                config.response_url_prefixes.clone(),
                command,
                *chat,
                who,
            )
            .await
        }
    }
}

fn usage() -> String {
    "Usage: `/nix-deploy [HOST|GLOB|@TAG|@TAG-GLOB ...] [--on=SEL] [--exclude=SEL] [--goal=switch|boot|test|dry-activate] [--strategy=smart|parallel|rolling|sequential|canary|blue-green] [--parallel] [--sequential] [--canary=HOST] [--canary-soak=5m] [--batch-size=N|N%] [--max-failures=N|N%] [--health-timeout=2m] [--confirm-timeout=30s] [--activation-timeout=10m] [--force]`, `/nix-deploy status`, `/nix-deploy cancel [ID]`".into()
}

/// How many messages one command may post to its `response_url` (Slack
/// allows five): the plan, progress, and the summary.
const SLACK_POSTS: usize = 5;

/// The deployment is recorded at once and answered within Slack's three
/// seconds, whatever the hosts do; the plan, progress and the summary follow
/// on `response_url`.
async fn slack_deploy(
    state: AppState,
    prefixes: Vec<String>,
    command: SlashCommand,
    chat: Request,
    who: String,
) -> Result<Response, ApiError> {
    let options = match state.resolve(&chat) {
        Ok(o) => o,
        Err(e) => return Ok(ephemeral(e.to_string())),
    };
    let response_url = command
        .response_url
        .clone()
        .filter(|u| slack::is_allowed_response_url(u, &prefixes));
    let request = DeployRequest {
        selection: chat.selection(),
        wait: true,
        options,
        trigger: "slack".into(),
        requested_by: who,
    };
    let http = state.http.clone();
    let done_url = response_url.clone();
    let id = state
        .launch_queued(state.engine(), request, move |result| {
            let Some(url) = done_url else { return };
            let body = match result {
                Ok(deployment) => slack::summary_message(&deployment),
                Err(e) => serde_json::json!({
                    "response_type": "in_channel",
                    "text": format!("Deployment failed to run: {e}"),
                }),
            };
            tokio::spawn(async move {
                if let Err(e) = http.post(&url).json(&body).send().await {
                    tracing::warn!(cause = %e, "posting the deployment summary to Slack");
                }
            });
        })
        .await?;
    if let (Some(url), Some(live)) = (response_url, state.subscribe(id)) {
        tokio::spawn(slack_progress(state.clone(), url, id, live));
    }
    Ok(Json(serde_json::json!({
        "response_type": "in_channel",
        "text": format!(
            "Deployment #{id} requested by {}: planning; the plan and progress follow here.",
            command.user_name
        ),
        "deployment_id": id,
    }))
    .into_response())
}

/// The plan once it is made, then a line as each phase completes, within
/// [`SLACK_POSTS`] (the summary, posted when the deployment ends, is the last).
async fn slack_progress(
    state: AppState,
    url: String,
    id: i64,
    mut live: tokio::sync::broadcast::Receiver<nix_deploy_core::events::Event>,
) {
    let post = |text: serde_json::Value| {
        let http = state.http.clone();
        let url = url.clone();
        async move {
            let _ = http.post(&url).json(&text).send().await;
        }
    };
    let mut posts = 0;
    let mut phases: Vec<Vec<String>> = Vec::new();
    let mut finished: Vec<String> = Vec::new();
    while let Ok(event) = live.recv().await {
        match &event.kind {
            EventKind::Planned {
                phases: planned, ..
            } => {
                phases = planned.clone();
                if let Ok(Some(deployment)) = state.store().deployment(id).await
                    && let Some(plan) = deployment.plan
                {
                    let report = PlanReport::new(&deployment.flake, plan.hosts.len(), plan);
                    let mut message = slack::plan_message(&report);
                    message["text"] = serde_json::Value::String(format!(
                        "Deployment #{id}: {}",
                        message["text"].as_str().unwrap_or_default()
                    ));
                    post(message).await;
                    posts += 1;
                }
            }
            EventKind::HostFinished { .. } => {
                finished.extend(event.host.clone());
                // Keep one post for the summary.
                if posts + 1 >= SLACK_POSTS {
                    continue;
                }
                if let Some(index) = phases
                    .iter()
                    .position(|p| !p.is_empty() && p.iter().all(|h| finished.contains(h)))
                {
                    let done = phases.remove(index);
                    post(serde_json::json!({
                        "response_type": "in_channel",
                        "text": format!("#{id}: {} finished", done.join(", ")),
                    }))
                    .await;
                    posts += 1;
                }
            }
            EventKind::DeploymentFinished { .. } => break,
            _ => {}
        }
    }
}

pub async fn github(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = super::bytes(body)?;
    let (Some(config), Some(secret)) = (&state.config.github, &state.github_secret) else {
        return Err(ApiError::NotFound(
            "the GitHub hook is not configured".into(),
        ));
    };
    let signature = header(&headers, "x-hub-signature-256").unwrap_or("");
    github::verify_signature(secret.expose(), &body, signature)
        .map_err(|e| ApiError::Unauthorized(format!("GitHub signature: {e}")))?;
    // Every delivery is acted on once: a captured one re-sent is refused.
    let delivery = header(&headers, "x-github-delivery")
        .filter(|d| !d.is_empty() && d.len() <= 128)
        .ok_or_else(|| ApiError::BadRequest("missing X-GitHub-Delivery header".into()))?;
    const KEEP_DELIVERIES_MS: i64 = 30 * 24 * 3600 * 1000;
    if !state
        .store()
        .remember_delivery("github", delivery, KEEP_DELIVERIES_MS)
        .await?
    {
        return Err(ApiError::Conflict(format!(
            "delivery {delivery} was already received (replay refused)"
        )));
    }
    let event = header(&headers, "x-github-event").unwrap_or("");
    match event {
        "ping" => {
            return Ok(Json(serde_json::json!({ "ok": true, "event": "ping" })).into_response());
        }
        "push" => {}
        other => {
            return Ok((
                StatusCode::ACCEPTED,
                Json(serde_json::json!({ "ignored": format!("event `{other}` is not handled") })),
            )
                .into_response());
        }
    }
    let push = github::parse_push(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed push event: {e}")))?;
    let branch = github::branch(&push.git_ref);
    if push.deleted || branch != Some(config.branch.as_str()) {
        return Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({
                "ignored": format!("push to {} is not a push to {}", push.git_ref, config.branch)
            })),
        )
            .into_response());
    }
    let flake = config
        .flake
        .clone()
        .unwrap_or_else(|| state.config.flake.clone());
    let pinned = github::flake_at_revision(&flake, &push.after)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    // Never an older push over a newer one: a push deploys only if its head
    // commit is newer than the last one deployed from this branch.
    let head = BranchHead {
        commit: push.after.clone(),
        committed_at: push
            .head_commit_at
            .ok_or_else(|| ApiError::BadRequest("the push has no head commit timestamp".into()))?,
    };
    if !state
        .store()
        .advance_branch_head(&config.branch, &head)
        .await?
    {
        let last = state.store().branch_head(&config.branch).await?;
        return Err(ApiError::Conflict(format!(
            "push of {} is not newer than what was last deployed from {}{}",
            push.after,
            config.branch,
            last.map(|l| format!(" ({})", l.commit)).unwrap_or_default()
        )));
    }
    let request = DeployRequest {
        selection: Selection::default(),
        wait: true,
        options: state.default_options(),
        trigger: "github".into(),
        requested_by: format!("github:{}", push.pusher),
    };
    // Answered within GitHub's ten seconds, whatever the hosts do.
    let id = state
        .launch_queued(state.engine_with_flake(&pinned), request, |_| {})
        .await?;
    Ok(super::deployments::accepted(id, "queued"))
}
