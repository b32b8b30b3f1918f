//! The chat command's deployments: who may do what from Slack (the `[chat]`
//! allowlists), deployments recorded at once and followed on Slack's
//! `response_url` (the plan, progress, a gate's buttons, the summary), and
//! the confirmation a deployment touching more than `chat.confirm-above`
//! hosts needs: its plan is posted with Confirm and Cancel buttons, kept as
//! a pending chat request with its hosts pinned to that plan, and deployed
//! only when someone allowed confirms it (see `interactive`).

use axum::Json;
use axum::response::{IntoResponse, Response};

use nix_deploy_core::events::{Event, EventKind};
use nix_deploy_core::options::Request;
use nix_deploy_core::reports::PlanReport;

use crate::daemon::buttons;
use crate::daemon::config::{self, Scope};
use crate::daemon::notify;
use crate::daemon::slack::{self, SlashCommand};
use crate::daemon::{ApiError, AppState, Caller};
use crate::engine::DeployRequest;
use crate::store::NewChatRequest;

/// How long a plan waits for its Confirm button.
pub(crate) const CONFIRM_WITHIN_MS: i64 = 15 * 60 * 1000;

/// How many messages one deployment may post to its `response_url` (Slack
/// allows five): the plan, progress, a gate, and the summary.
const SLACK_POSTS: usize = 5;

pub(crate) fn ephemeral(text: String) -> Response {
    Json(serde_json::json!({ "response_type": "ephemeral", "text": text })).into_response()
}

pub(crate) fn in_channel(text: String) -> Response {
    Json(serde_json::json!({ "response_type": "in_channel", "text": text })).into_response()
}

/// The Slack user's grant (and the channel's, when channels are listed):
/// the lower scope, and both reaches. Nobody unlisted.
pub(crate) fn chat_caller(state: &AppState, user_id: &str, channel_id: &str) -> Option<Caller> {
    let chat = &state.config.chat;
    let user = chat.users.iter().find(|g| g.id == user_id)?;
    let mut scope = user.scope;
    let mut filters = vec![config::hosts("chat.users.hosts", &user.hosts).ok()?];
    if !chat.channels.is_empty() {
        let channel = chat.channels.iter().find(|g| g.id == channel_id)?;
        scope = scope.min(channel.scope);
        filters.push(config::hosts("chat.channels.hosts", &channel.hosts).ok()?);
    }
    filters.retain(|f| !f.is_everything());
    Some(Caller {
        identity: format!("slack:{user_id}"),
        scope,
        limit: (!filters.is_empty()).then(|| crate::engine::Limit {
            who: format!("Slack user {user_id}"),
            hosts: filters,
        }),
    })
}

/// Whether `chat` visibly touches at most `limit` hosts: only host names,
/// no globs, tags or `--all`, and no more than `limit` of them. Anything
/// else is planned first, and confirmed when it touches more.
fn surely_within(chat: &Request, limit: usize) -> bool {
    let literal = |s: &String| {
        !s.starts_with('@') && !s.contains(',') && !s.chars().any(|c| "*?[".contains(c))
    };
    !chat.all
        && chat.on.is_empty()
        && !chat.hosts.is_empty()
        && chat.hosts.iter().all(literal)
        && chat.hosts.len() <= limit
}

/// A `/nix-deploy deploy …`: answered within Slack's three seconds. A
/// deployment that touches at most `chat.confirm-above` hosts is recorded
/// at once; a larger one (or one whose size only a plan can tell) is
/// planned in the background, then deployed or, when it touches more,
/// posted with Confirm and Cancel buttons.
pub(crate) async fn deploy(
    state: AppState,
    prefixes: &[String],
    command: SlashCommand,
    chat: Request,
    caller: Caller,
) -> Result<Response, ApiError> {
    if let Err(e) = state.resolve(&chat) {
        return Ok(ephemeral(e.to_string()));
    }
    let response_url = command
        .response_url
        .clone()
        .filter(|u| slack::is_allowed_response_url(u, prefixes));
    let limit = state.config.chat.confirm_above;
    if surely_within(&chat, limit) {
        let id = launch(&state, &chat, &caller, &caller.identity, response_url).await?;
        return Ok(Json(serde_json::json!({
            "response_type": "in_channel",
            "text": format!(
                "Deployment #{id} requested by {}: planning; the plan and progress follow here.",
                command.user_name
            ),
            "deployment_id": id,
        }))
        .into_response());
    }
    let Some(url) = response_url else {
        return Ok(ephemeral(format!(
            "this may touch more than {limit} host(s), so its plan needs a confirmation, but Slack gave no response_url to post it to"
        )));
    };
    let channel = command.channel_id.clone();
    let background = state.clone();
    state.tasks.spawn(async move {
        plan_then_ask(background, chat, caller, channel, url).await;
    });
    Ok(in_channel(format!(
        "Planning for {}: a deployment touching more than {limit} host(s) is posted here with its plan, to confirm.",
        command.user_name
    )))
}

/// Plan `chat` (nothing changes), then deploy it at once when it touches at
/// most `chat.confirm-above` hosts, or keep it and post its plan with
/// Confirm and Cancel buttons. Either way its hosts are pinned to the plan.
async fn plan_then_ask(
    state: AppState,
    chat: Request,
    caller: Caller,
    channel: String,
    url: String,
) {
    let limit = state.config.chat.confirm_above;
    let outcome = async {
        let options = state.resolve(&chat)?;
        let report = state
            .engine_for(&caller)
            .plan(&chat.selection(), &options, false)
            .await?;
        let mut pinned = chat.clone();
        pinned.hosts = report.to_deploy.clone();
        pinned.on.clear();
        pinned.exclude.clear();
        pinned.all = false;
        if report.to_deploy.is_empty() {
            let mut message = slack::plan_message(&report);
            message["text"] = format!(
                "Nothing to deploy: {}",
                message["text"].as_str().unwrap_or_default()
            )
            .into();
            return Ok::<_, ApiError>(message);
        }
        if report.to_deploy.len() <= limit {
            let id = launch(
                &state,
                &pinned,
                &caller,
                &caller.identity,
                Some(url.clone()),
            )
            .await?;
            return Ok(serde_json::json!({
                "response_type": "in_channel",
                "text": format!("Deployment #{id}: {} host(s), started.", report.to_deploy.len()),
            }));
        }
        let request = serde_json::to_string(&pinned)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("keeping a chat request: {e}")))?;
        let now = crate::now_ms();
        let id = state
            .store()
            .create_chat_request(&NewChatRequest {
                created_at: now,
                expires_at: now + CONFIRM_WITHIN_MS,
                requester: &caller.identity,
                channel: &channel,
                request: &request,
                response_url: Some(&url),
            })
            .await?;
        state
            .audit(
                &caller.identity,
                &format!("slack channel {channel}"),
                "confirm-asked",
                &format!("chat request #{id}"),
                serde_json::json!({ "hosts": &report.to_deploy }),
            )
            .await?;
        Ok(buttons::confirm_message(
            id,
            &slack::plan_message(&report),
            report.to_deploy.len(),
        ))
    }
    .await;
    let message = outcome.unwrap_or_else(|e| {
        serde_json::json!({ "response_type": "ephemeral", "text": format!("Cannot plan that deployment: {e}") })
    });
    post(&state, &url, message).await;
}

/// POST a message to a Slack `response_url` (already checked against the
/// allowed prefixes); a failure is logged, never an error.
pub(crate) async fn post(state: &AppState, url: &str, message: serde_json::Value) {
    if let Err(e) = state.http.post(url).json(&message).send().await {
        tracing::warn!(cause = %e, "posting to Slack's response_url");
    }
}

/// Record a chat deployment at once (its hosts as `chat` names them,
/// within `caller`'s reach) for `requested_by`, run it, and follow it on
/// `response_url`: the plan, progress, a gate's buttons, the summary.
pub(crate) async fn launch(
    state: &AppState,
    chat: &Request,
    caller: &Caller,
    requested_by: &str,
    response_url: Option<String>,
) -> Result<i64, ApiError> {
    let request = DeployRequest {
        selection: chat.selection(),
        wait: true,
        options: state.resolve(chat)?,
        trigger: "slack".into(),
        requested_by: requested_by.to_string(),
        source: None,
    };
    let http = state.http.clone();
    let done_url = response_url.clone();
    let id = state
        .launch_queued(state.engine_for(caller), request, move |result| {
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
        tokio::spawn(progress(state.clone(), url, id, live));
    }
    Ok(id)
}

/// The plan once it is made, a gate's buttons when it stops at one, then a
/// line as each phase completes, within [`SLACK_POSTS`] (the summary,
/// posted when the deployment ends, is the last).
async fn progress(
    state: AppState,
    url: String,
    id: i64,
    mut live: tokio::sync::broadcast::Receiver<Event>,
) {
    let mut posts = 0;
    let mut phases: Vec<Vec<String>> = Vec::new();
    let mut finished: Vec<String> = Vec::new();
    while let Ok(event) = live.recv().await {
        // Keep one post for the summary.
        if posts + 1 >= SLACK_POSTS {
            if matches!(event.kind, EventKind::DeploymentFinished { .. }) {
                break;
            }
            continue;
        }
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
                    post(&state, &url, message).await;
                    posts += 1;
                }
            }
            EventKind::GateOpened { .. } => {
                if let Some(notice) = notify::notice_from_event(&event) {
                    let notice = state.with_gate_summary(notice).await;
                    let mut message = notice.slack_payload();
                    message["response_type"] = "in_channel".into();
                    post(&state, &url, message).await;
                    posts += 1;
                }
            }
            EventKind::HostFinished { .. } => {
                finished.extend(event.host.clone());
                if let Some(index) = phases
                    .iter()
                    .position(|p| !p.is_empty() && p.iter().all(|h| finished.contains(h)))
                {
                    let done = phases.remove(index);
                    post(
                        &state,
                        &url,
                        serde_json::json!({
                            "response_type": "in_channel",
                            "text": format!("#{id}: {} finished", done.join(", ")),
                        }),
                    )
                    .await;
                    posts += 1;
                }
            }
            EventKind::DeploymentFinished { .. } => break,
            _ => {}
        }
    }
}

/// The answer when a caller's scope is too small for what they ask.
pub(crate) fn needs(caller: &Caller, scope: Scope) -> Option<String> {
    (!caller.scope.allows(scope)).then(|| {
        format!(
            "this needs the {scope:?} scope; you have {:?}",
            caller.scope
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(hosts: &[&str], on: &[&str]) -> Request {
        Request {
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            on: on.iter().map(|s| s.to_string()).collect(),
            ..Request::default()
        }
    }

    #[test]
    fn only_a_few_named_hosts_skip_the_plan() {
        assert!(surely_within(&request(&["p620"], &[]), 1));
        assert!(!surely_within(&request(&["p620", "razer"], &[]), 1));
        assert!(surely_within(&request(&["p620", "razer"], &[]), 2));
        assert!(!surely_within(&request(&["web-*"], &[]), 5), "a glob");
        assert!(!surely_within(&request(&["@web"], &[]), 5), "a tag");
        assert!(!surely_within(&request(&["a,b"], &[]), 5), "a list");
        assert!(!surely_within(&request(&[], &["@web"]), 5));
        assert!(!surely_within(&request(&[], &[]), 5), "everything");
    }
}
