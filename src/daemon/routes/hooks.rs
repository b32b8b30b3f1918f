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

use nix_deploy_core::grammar::{self, ChatVerb};

use super::approvals;
use crate::daemon::config::{self, Scope};
use crate::daemon::slack::{self, SlashCommand};
use crate::daemon::{ApiError, AppState, Caller, github};
use crate::engine::{DeployRequest, PushSource};
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
    let verb = match grammar::parse_chat(&command.text) {
        Ok(verb) => verb,
        Err(e) => return Ok(ephemeral(format!("{e}\n{}", usage()))),
    };
    if let ChatVerb::Help = verb {
        return Ok(ephemeral(usage()));
    }
    // Who may do what: the [chat] allowlists (nobody unlisted).
    let Some(caller) = chat_caller(&state, &command) else {
        state
            .audit(
                &format!("slack:{}", command.user_id),
                &format!("slack channel {}", command.channel_id),
                "auth-failed",
                "chat command",
                serde_json::json!({ "text": command.text }),
            )
            .await?;
        return Ok(ephemeral(format!(
            "<@{}> may not use /nix-deploy here (not in the [chat] allowlists)",
            command.user_id
        )));
    };
    let origin = format!("slack channel {}", command.channel_id);
    // The answer when the caller's scope is too small.
    let needs = |scope: Scope| -> Option<Response> {
        if caller.scope.allows(scope) {
            None
        } else {
            Some(ephemeral(format!(
                "this needs the {scope:?} scope; you have {:?}",
                caller.scope
            )))
        }
    };
    match verb {
        ChatVerb::Help => Ok(ephemeral(usage())),
        ChatVerb::Status | ChatVerb::History { .. } | ChatVerb::Show { .. } => {
            if let Some(r) = needs(Scope::Read) {
                return Ok(r);
            }
            chat_read(&state, verb).await
        }
        ChatVerb::Approve { id, comment } => {
            if let Some(r) = needs(Scope::Deploy) {
                return Ok(r);
            }
            Ok(
                match approvals::approve_as(&state, &caller, "slack", id, comment.as_deref()).await
                {
                    Ok(gate) => in_channel(format!(
                        "<@{}> approved deployment #{id} (gate {}: {})",
                        command.user_id,
                        gate.number,
                        gate.state.as_str()
                    )),
                    Err(e) => ephemeral(e.to_string()),
                },
            )
        }
        ChatVerb::Reject { id, reason } => {
            if let Some(r) = needs(Scope::Deploy) {
                return Ok(r);
            }
            Ok(
                match approvals::reject_as(&state, &caller, "slack", id, &reason).await {
                    Ok(_) => in_channel(format!(
                        "<@{}> rejected deployment #{id}: {reason}",
                        command.user_id
                    )),
                    Err(e) => ephemeral(e.to_string()),
                },
            )
        }
        ChatVerb::Cancel { id } => {
            if let Some(r) = needs(Scope::Deploy) {
                return Ok(r);
            }
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
            state
                .audit(
                    &caller.identity,
                    &origin,
                    "cancel",
                    &format!("deployment #{id}"),
                    serde_json::Value::Null,
                )
                .await?;
            if !state.cancel(id, &caller.identity).await? {
                return Ok(ephemeral(format!("Deployment #{id} is not running.")));
            }
            Ok(in_channel(format!(
                "Cancelling deployment #{id}: no new hosts will start; running hosts finish or roll back."
            )))
        }
        ChatVerb::Plan { .. } | ChatVerb::Rollback { .. } => Ok(ephemeral(
            "`plan` and `rollback` are not offered in chat yet: use the CLI or the API".into(),
        )),
        ChatVerb::Deploy(args) => {
            if let Some(r) = needs(Scope::Deploy) {
                return Ok(r);
            }
            let chat = match args.request() {
                Ok(r) => r,
                Err(e) => return Ok(ephemeral(e.to_string())),
            };
            if chat.override_window.is_some() && !caller.scope.allows(Scope::Admin) {
                return Ok(ephemeral(
                    "overriding maintenance windows needs the admin scope".into(),
                ));
            }
            state
                .audit(
                    &caller.identity,
                    &origin,
                    "deploy",
                    "chat request",
                    serde_json::json!({ "request": &chat }),
                )
                .await?;
            slack_deploy(
                state.clone(),
                config.response_url_prefixes.clone(),
                command,
                chat,
                caller,
            )
            .await
        }
    }
}

fn in_channel(text: String) -> Response {
    Json(serde_json::json!({ "response_type": "in_channel", "text": text })).into_response()
}

/// The chat user's grant (and the channel's, when channels are listed):
/// the lower scope, and both reaches.
fn chat_caller(state: &AppState, command: &SlashCommand) -> Option<Caller> {
    let chat = &state.config.chat;
    let user = chat.users.iter().find(|g| g.id == command.user_id)?;
    let mut scope = user.scope;
    let mut filters = vec![config::hosts("chat.users.hosts", &user.hosts).ok()?];
    if !chat.channels.is_empty() {
        let channel = chat.channels.iter().find(|g| g.id == command.channel_id)?;
        scope = scope.min(channel.scope);
        filters.push(config::hosts("chat.channels.hosts", &channel.hosts).ok()?);
    }
    filters.retain(|f| !f.is_everything());
    Some(Caller {
        identity: format!("slack:{}", command.user_id),
        scope,
        limit: (!filters.is_empty()).then(|| crate::engine::Limit {
            who: format!("Slack user {}", command.user_id),
            hosts: filters,
        }),
    })
}

/// `status`, `history`, `show`: answered at once.
async fn chat_read(state: &AppState, verb: ChatVerb) -> Result<Response, ApiError> {
    let text = match verb {
        ChatVerb::History { limit } => {
            let mut text = String::from("*Recent deployments*\n");
            for d in state.store().deployments(limit).await? {
                text.push_str(&format!(
                    "• #{} {} — {} by {}\n",
                    d.id, d.status, d.strategy, d.requested_by
                ));
            }
            text
        }
        ChatVerb::Show { id } => {
            let mut deployment = state.deployment(id).await?;
            deployment.events = Some(state.store().events(id, 0).await?);
            crate::daemon::report::markdown(&deployment)
        }
        _ => {
            let mut text = String::from("*Fleet status*\n");
            for h in state.store().host_states().await? {
                text.push_str(&format!(
                    "• {} — generation {} — last: {}\n",
                    h.name,
                    h.generation.map(|g| g.to_string()).unwrap_or("-".into()),
                    h.last_status.as_deref().unwrap_or("-")
                ));
            }
            text
        }
    };
    Ok(ephemeral(text))
}

fn usage() -> String {
    format!("```{}```", grammar::chat_help())
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
    caller: Caller,
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
        requested_by: caller.identity.clone(),
        source: None,
    };
    let http = state.http.clone();
    let done_url = response_url.clone();
    let id = state
        .launch_queued(state.engine_for(&caller), request, move |result| {
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
        source: Some(PushSource {
            kind: "github".into(),
            branch: config.branch.clone(),
            commit: push.after.clone(),
        }),
    };
    // Answered within GitHub's ten seconds, whatever the hosts do.
    let id = state
        .launch_queued(state.engine_with_flake(&pinned), request, |_| {})
        .await?;
    Ok(super::deployments::accepted(id, "queued"))
}
