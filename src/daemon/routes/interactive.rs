//! `POST /hooks/slack/interactive`: a click on one of our Slack buttons.
//! Checked like the slash command (v0 signature, the five-minute window, a
//! replay refused); then the clicking Slack user is the caller, checked
//! against the `[chat]` allowlists and, for a gate, the approval rules
//! (self-approval refused as everywhere):
//!
//! - Approve / Reject on a deployment waiting at a gate (the button names
//!   the gate: a click on an older gate's button never decides a newer one);
//! - Confirm / Cancel on a chat deployment waiting for its confirmation.
//!
//! A click that may not do what it asks changes nothing and is answered
//! with why (HTTP 200, so Slack shows the answer rather than an error);
//! the answer also goes to the message's `response_url`.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use nix_deploy_core::options::Request;

use super::{approvals, chat};
use crate::daemon::buttons::{self, Click, Interaction};
use crate::daemon::config::Scope;
use crate::daemon::{ApiError, AppState, Caller, slack};
use crate::store::ChatDecision;

/// What a click came to.
struct Answer {
    ok: bool,
    text: String,
    /// Replace the message the buttons were on (they are used up).
    replace: bool,
}

impl Answer {
    fn done(text: String) -> Self {
        Answer {
            ok: true,
            text,
            replace: true,
        }
    }

    fn refused(text: String) -> Self {
        Answer {
            ok: false,
            text,
            replace: false,
        }
    }
}

pub async fn interactive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = super::bytes(body)?;
    let config = super::hooks::verify_slack(&state, &headers, &body, "slack-interactive").await?;
    let interaction = buttons::parse_interaction(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed interaction: {e}")))?;
    let response_url = interaction
        .response_url
        .clone()
        .filter(|u| slack::is_allowed_response_url(u, &config.response_url_prefixes));
    let answer = match chat::chat_caller(&state, &interaction.user_id, &interaction.channel_id) {
        None => {
            state
                .audit(
                    &format!("slack:{}", interaction.user_id),
                    &origin(&interaction),
                    "auth-failed",
                    "Slack button",
                    serde_json::json!({ "click": format!("{:?}", interaction.click) }),
                )
                .await?;
            Answer::refused(format!(
                "<@{}> may not use nix-deploy here (not in the [chat] allowlists)",
                interaction.user_id
            ))
        }
        Some(caller) => match chat::needs(&caller, Scope::Deploy) {
            Some(why) => Answer::refused(why),
            None => click(&state, &interaction, &caller).await?,
        },
    };
    if let Some(url) = response_url {
        let message = if answer.replace {
            serde_json::json!({ "replace_original": true, "text": answer.text })
        } else {
            serde_json::json!({
                "response_type": "ephemeral", "replace_original": false, "text": answer.text })
        };
        let state = state.clone();
        tokio::spawn(async move { chat::post(&state, &url, message).await });
    }
    Ok(Json(serde_json::json!({ "ok": answer.ok, "text": answer.text })).into_response())
}

fn origin(interaction: &Interaction) -> String {
    format!("slack channel {}", interaction.channel_id)
}

/// Do what an allowed user's click asks.
async fn click(
    state: &AppState,
    interaction: &Interaction,
    caller: &Caller,
) -> Result<Answer, ApiError> {
    let user = &interaction.user_id;
    Ok(match interaction.click {
        Click::Approve { deployment, gate } => {
            if let Some(stale) = stale_gate(state, deployment, gate).await? {
                return Ok(Answer::refused(stale));
            }
            match approvals::approve_as(state, caller, "slack", deployment, None).await {
                Ok(gate) => Answer::done(format!(
                    "<@{user}> approved deployment #{deployment} (gate {}: {})",
                    gate.number,
                    gate.state.as_str()
                )),
                Err(e) => Answer::refused(e.to_string()),
            }
        }
        Click::Reject { deployment, gate } => {
            if let Some(stale) = stale_gate(state, deployment, gate).await? {
                return Ok(Answer::refused(stale));
            }
            let reason = format!("rejected in Slack by slack:{user}");
            match approvals::reject_as(state, caller, "slack", deployment, &reason).await {
                Ok(_) => Answer::done(format!("<@{user}> rejected deployment #{deployment}")),
                Err(e) => Answer::refused(e.to_string()),
            }
        }
        Click::Confirm { request } => {
            let answer = confirm(state, interaction, caller, request).await?;
            if !answer.ok {
                state
                    .audit(
                        &caller.identity,
                        &origin(interaction),
                        "confirm-refused",
                        &format!("chat request #{request}"),
                        serde_json::json!({ "error": answer.text }),
                    )
                    .await?;
            }
            answer
        }
        Click::Cancel { request } => {
            let decided = state
                .store()
                .decide_chat_request(request, "cancelled", crate::now_ms())
                .await?;
            let (action, answer) = match decided {
                ChatDecision::Done(_) => (
                    "cancel",
                    Answer::done(format!("<@{user}> cancelled it: nothing was deployed")),
                ),
                ChatDecision::Refused(why) => ("cancel-refused", Answer::refused(why)),
            };
            state
                .audit(
                    &caller.identity,
                    &origin(interaction),
                    action,
                    &format!("chat request #{request}"),
                    serde_json::json!({ "answer": answer.text }),
                )
                .await?;
            answer
        }
    })
}

/// Why a gate button no longer applies, if it does not: its gate is not
/// the one the deployment waits at now.
async fn stale_gate(
    state: &AppState,
    deployment: i64,
    gate: u32,
) -> Result<Option<String>, ApiError> {
    Ok(match state.store().open_gate_of(deployment).await? {
        Some(open) if open.number == gate => None,
        Some(open) => Some(format!(
            "this button is for gate {gate} of deployment #{deployment}; it waits at gate {} now (see the newer message)",
            open.number
        )),
        None => Some(format!(
            "deployment #{deployment} is not waiting at gate {gate} any more"
        )),
    })
}

/// Confirm a chat deployment: its requester, or an allowed user who may
/// touch every host, confirms; it runs within its requester's reach, as
/// planned (its hosts pinned to the plan that was shown).
async fn confirm(
    state: &AppState,
    interaction: &Interaction,
    caller: &Caller,
    id: i64,
) -> Result<Answer, ApiError> {
    let Some(pending) = state.store().chat_request(id).await? else {
        return Ok(Answer::refused(format!("no chat request #{id}")));
    };
    if pending.requester != caller.identity && caller.limit.is_some() {
        return Ok(Answer::refused(format!(
            "{} may touch only some hosts and may confirm only their own requests; {} asked for this one",
            caller.identity, pending.requester
        )));
    }
    let requester_id = pending
        .requester
        .strip_prefix("slack:")
        .unwrap_or(&pending.requester);
    let Some(requester) = chat::chat_caller(state, requester_id, &pending.channel)
        .filter(|r| r.scope.allows(Scope::Deploy))
    else {
        return Ok(Answer::refused(format!(
            "{} may not deploy any more; the request is void",
            pending.requester
        )));
    };
    let request: Request = match serde_json::from_str(&pending.request) {
        Ok(request) => request,
        Err(e) => {
            return Ok(Answer::refused(format!(
                "chat request #{id} is unreadable: {e}"
            )));
        }
    };
    let decided = match state
        .store()
        .decide_chat_request(id, "confirmed", crate::now_ms())
        .await?
    {
        ChatDecision::Done(decided) => decided,
        ChatDecision::Refused(why) => return Ok(Answer::refused(why)),
    };
    let deployment = chat::launch(
        state,
        &request,
        &requester,
        &decided.requester,
        decided.response_url.clone(),
    )
    .await?;
    state.store().chat_request_started(id, deployment).await?;
    state
        .audit(
            &caller.identity,
            &origin(interaction),
            "confirm",
            &format!("deployment #{deployment}"),
            serde_json::json!({ "chat_request": id, "requested_by": decided.requester, "hosts": request.hosts }),
        )
        .await?;
    Ok(Answer::done(format!(
        "<@{}> confirmed: deployment #{deployment} of {}",
        interaction.user_id,
        request.hosts.join(", ")
    )))
}
