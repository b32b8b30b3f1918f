//! Incoming hooks: the Slack `/nix-deploy` slash command and GitHub pushes.
//! Both verify their signatures before reading anything else; a forged,
//! stale or malformed request changes nothing.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use nix_deploy_core::fleet::Selection;

use nix_deploy_core::grammar::{self, ChatVerb};

use super::approvals;
use super::chat::{self, chat_caller, ephemeral, in_channel};
use crate::daemon::config::{self, Scope};
use crate::daemon::slack;
use crate::daemon::{ApiError, AppState, github};
use crate::engine::{DeployRequest, PushSource};
use crate::store::BranchHead;

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn now_unix() -> i64 {
    crate::now_ms() / 1000
}

/// Check a request from Slack (the slash command, or a click on one of our
/// buttons): its v0 signature, its timestamp within five minutes, and that
/// it was not received before (a replay is refused, 409). A forged or stale
/// one is recorded as a failed authentication (401). Returns the `[slack]`
/// configuration.
pub(crate) async fn verify_slack<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    body: &[u8],
    source: &str,
) -> Result<&'a config::SlackConfig, ApiError> {
    let (Some(config), Some(secret)) = (&state.config.slack, &state.slack_secret) else {
        return Err(ApiError::NotFound(
            "the Slack command is not configured".into(),
        ));
    };
    let timestamp = header(headers, "x-slack-request-timestamp").unwrap_or("");
    let signature = header(headers, "x-slack-signature").unwrap_or("");
    if let Err(e) = slack::verify_signature(secret.expose(), timestamp, body, signature, now_unix())
    {
        state
            .audit(
                "unknown",
                source,
                "auth-failed",
                "Slack request",
                serde_json::json!({ "error": e.to_string() }),
            )
            .await?;
        return Err(ApiError::Unauthorized(format!("Slack signature: {e}")));
    }
    // A signed request is good for the replay window; within it, only once.
    let window_ms = 2 * slack::REPLAY_WINDOW_SECS * 1000;
    if !state
        .store()
        .remember_delivery(source, &format!("{timestamp}:{signature}"), window_ms)
        .await?
    {
        return Err(ApiError::Conflict(
            "this signed Slack request was already received (replay refused)".into(),
        ));
    }
    Ok(config)
}

pub async fn slack(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = super::bytes(body)?;
    let config = verify_slack(&state, &headers, &body, "slack").await?;
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
    let Some(caller) = chat_caller(&state, &command.user_id, &command.channel_id) else {
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
    let needs = |scope: Scope| chat::needs(&caller, scope).map(ephemeral);
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
            if let Err(e) = approvals::check_reach(&caller, &state.deployment(id).await?) {
                return Ok(ephemeral(e.to_string()));
            }
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
            chat::deploy(
                state.clone(),
                &config.response_url_prefixes,
                command,
                chat,
                caller,
            )
            .await
        }
    }
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
