//! Incoming hooks: the Slack `/nix-deploy` slash command and GitHub pushes.
//! Both verify their signatures before reading anything else; a forged,
//! stale or malformed request changes nothing.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use nix_deploy_core::events::{DeploymentStatus, EventKind};
use nix_deploy_core::fleet::Selection;
use nix_deploy_core::options::Request;

use crate::daemon::slack::{self, ChatRequest, SlashCommand};
use crate::daemon::{ApiError, AppState, Job, github};
use crate::engine::DeployRequest;

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
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let (Some(config), Some(secret)) = (&state.config.slack, &state.slack_secret) else {
        return Err(ApiError::NotFound(
            "the Slack command is not configured".into(),
        ));
    };
    let timestamp = header(&headers, "x-slack-request-timestamp").unwrap_or("");
    let signature = header(&headers, "x-slack-signature").unwrap_or("");
    slack::verify_signature(secret.expose(), timestamp, &body, signature, now_unix())
        .map_err(|e| ApiError::Unauthorized(format!("Slack signature: {e}")))?;
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
                    .find(|d| d.status == DeploymentStatus::Running)
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
    let selection = chat.selection();
    // The plan first (no builds, so it answers quickly), then the deployment.
    let plan = match state.engine().plan(&selection, &options, false).await {
        Ok(plan) => plan,
        Err(e) if e.is_bad_input() => return Ok(ephemeral(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    let response_url = command
        .response_url
        .clone()
        .filter(|u| slack::is_allowed_response_url(u, &prefixes));
    let job = Job::Deploy(DeployRequest {
        selection,
        wait: false,
        options,
        trigger: "slack".into(),
        requested_by: who,
    });
    let http = state.http.clone();
    let done_url = response_url.clone();
    let launched = state
        .launch(state.engine(), job, move |result| {
            let Some(url) = done_url else { return };
            let body = match result {
                Ok(deployment) => slack::summary_message(&deployment),
                Err(e) => serde_json::json!({ "response_type": "in_channel", "text": format!("Deployment failed to run: {e}") }),
            };
            tokio::spawn(async move {
                if let Err(e) = http.post(&url).json(&body).send().await {
                    tracing::warn!(cause = %e, "posting the deployment summary to Slack");
                }
            });
        })
        .await;
    let id = match launched {
        Ok(id) => id,
        Err(ApiError::Conflict(message)) | Err(ApiError::BadRequest(message)) => {
            return Ok(ephemeral(message));
        }
        Err(e) => return Err(e),
    };
    // Progress: one line per host as it finishes.
    if let (Some(url), Some(mut live)) = (response_url, state.subscribe(id)) {
        let http = state.http.clone();
        tokio::spawn(async move {
            while let Ok(event) = live.recv().await {
                if let EventKind::HostFinished { status, .. } = &event.kind {
                    let text = format!("#{id} {}: {status}", event.host.as_deref().unwrap_or("-"));
                    let _ = http
                        .post(&url)
                        .json(&serde_json::json!({ "response_type": "in_channel", "text": text }))
                        .send()
                        .await;
                }
                if matches!(event.kind, EventKind::DeploymentFinished { .. }) {
                    break;
                }
            }
        });
    }
    let mut message = slack::plan_message(&plan);
    if let Some(text) = message
        .get_mut("text")
        .and_then(|t| t.as_str().map(str::to_string))
    {
        message["text"] = serde_json::Value::String(format!("Deployment #{id} started.\n{text}"));
    }
    message["deployment_id"] = serde_json::json!(id);
    Ok(Json(message).into_response())
}

pub async fn github(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let (Some(config), Some(secret)) = (&state.config.github, &state.github_secret) else {
        return Err(ApiError::NotFound(
            "the GitHub hook is not configured".into(),
        ));
    };
    let signature = header(&headers, "x-hub-signature-256").unwrap_or("");
    github::verify_signature(secret.expose(), &body, signature)
        .map_err(|e| ApiError::Unauthorized(format!("GitHub signature: {e}")))?;
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
    let job = Job::Deploy(DeployRequest {
        selection: Selection::default(),
        wait: true,
        options: state.default_options(),
        trigger: "github".into(),
        requested_by: format!("github:{}", push.pusher),
    });
    let id = state
        .launch(state.engine_with_flake(&pinned), job, |_| {})
        .await?;
    Ok(super::deployments::accepted(id))
}
