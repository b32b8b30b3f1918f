//! `/api/v1/deployments`: create (202 with the id), list, show, cancel,
//! resume, Markdown report, and the live event stream (SSE).

use std::convert::Infallible;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio_stream::wrappers::ReceiverStream;

use nix_deploy_core::events::{Event, EventKind};
use nix_deploy_core::options::Request;
use nix_deploy_core::reports::{Accepted, CancelAnswer, DeploymentList};
use nix_deploy_core::run::Deployment;

use super::parse_body;
use crate::daemon::auth::Caller;
use crate::daemon::config::Scope;
use crate::daemon::{ApiError, AppState, Job};
use crate::engine::DeployRequest;

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = state.authorize(&headers, Scope::Deploy).await?;
    let request: Request = parse_body(&super::bytes(body)?)?;
    let (id, status) = start(&state, &request, "api", &caller).await?;
    Ok(accepted(id, status))
}

/// Start (or, with `wait`, queue) the deployment a request asks for, as
/// `caller` through `via` (`api`, `web`), audited: its id and `running` or
/// `queued`. The API and the web dashboard both start deployments here.
pub(crate) async fn start(
    state: &AppState,
    request: &Request,
    via: &str,
    caller: &Caller,
) -> Result<(i64, &'static str), ApiError> {
    request
        .check_for_deploy()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let options = state.resolve(request)?;
    if let Some(reason) = &request.override_window {
        if !caller.scope.allows(Scope::Admin) {
            return Err(ApiError::Forbidden(format!(
                "{} may not override maintenance windows: that needs the admin scope",
                caller.identity
            )));
        }
        state
            .audit(
                &caller.identity,
                via,
                "override-window",
                "deployment request",
                serde_json::json!({ "reason": reason, "request": request }),
            )
            .await?;
    }
    let engine = state.engine_at(request.revision.as_deref(), caller)?;
    let deploy = DeployRequest {
        selection: request.selection(),
        wait: request.wait,
        options,
        trigger: via.into(),
        requested_by: caller.requested_by(),
        source: None,
    };
    // Waiting for busy hosts: recorded now and answered at once (`queued`);
    // otherwise validated first, so bad input and busy hosts answer 400/409.
    let (id, status) = if request.wait {
        (state.launch_queued(engine, deploy, |_| {}).await?, "queued")
    } else {
        let launched = state.launch(engine, Job::Deploy(deploy), |_| {}).await;
        if let Err(e) = &launched {
            state
                .audit(
                    &caller.identity,
                    via,
                    "deploy-refused",
                    "deployment request",
                    serde_json::json!({ "request": request, "error": e.to_string() }),
                )
                .await?;
        }
        (launched?, "running")
    };
    state
        .audit(
            &caller.identity,
            via,
            "deploy",
            &format!("deployment #{id}"),
            serde_json::json!({ "request": request }),
        )
        .await?;
    Ok((id, status))
}

/// `202 Accepted` with where to find the deployment and its events.
pub(crate) fn accepted(id: i64, status: &str) -> Response {
    (
        StatusCode::ACCEPTED,
        [(
            axum::http::header::LOCATION,
            format!("/api/v1/deployments/{id}"),
        )],
        Json(Accepted::new(id, status)),
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<i64>,
}

pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Result<Json<DeploymentList>, ApiError> {
    let caller = state.authorize(&headers, Scope::Read).await?;
    let limit = query.limit.unwrap_or(20).clamp(1, 1000);
    let deployments = state.store().deployments(limit).await?;
    Ok(Json(DeploymentList {
        deployments: deployments.into_iter().map(|d| caller.visible(d)).collect(),
    }))
}

pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Deployment>, ApiError> {
    let caller = state.authorize(&headers, Scope::Read).await?;
    let id = super::parse_id(&id)?;
    Ok(Json(caller.visible(state.deployment(id).await?)))
}

pub async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<CancelAnswer>, ApiError> {
    let caller = state.authorize(&headers, Scope::Deploy).await?;
    let id = super::parse_id(&id)?;
    Ok(Json(cancel_deployment(&state, id, "api", &caller).await?))
}

/// Ask a running or queued deployment to stop starting hosts (409 when it
/// is neither). The API and the web dashboard both cancel here.
pub(crate) async fn cancel_deployment(
    state: &AppState,
    id: i64,
    via: &str,
    caller: &Caller,
) -> Result<CancelAnswer, ApiError> {
    let deployment = state.deployment(id).await?;
    let cancellable = deployment.status.is_active();
    let reach = super::approvals::check_reach(caller, &deployment);
    state
        .audit(
            &caller.identity,
            via,
            if reach.is_ok() {
                "cancel"
            } else {
                "cancel-refused"
            },
            &format!("deployment #{id}"),
            serde_json::Value::Null,
        )
        .await?;
    reach?;
    if !cancellable || !state.cancel(id, &caller.requested_by()).await? {
        return Err(ApiError::Conflict(format!(
            "deployment #{id} is {}, not running",
            deployment.status
        )));
    }
    Ok(CancelAnswer {
        id,
        cancel_requested: true,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeBody {
    #[serde(default)]
    wait: bool,
}

pub async fn resume(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = state.authorize(&headers, Scope::Deploy).await?;
    let id = super::parse_id(&id)?;
    let body: ResumeBody = parse_body(&super::bytes(body)?)?;
    let deployment = state.deployment(id).await?;
    let engine = state.engine_with_flake_for(&deployment.flake, &caller);
    let reach = super::approvals::check_reach(&caller, &deployment);
    state
        .audit(
            &caller.identity,
            "api",
            if reach.is_ok() {
                "resume"
            } else {
                "resume-refused"
            },
            &format!("deployment #{id}"),
            serde_json::Value::Null,
        )
        .await?;
    reach?;
    let id = state
        .launch(
            engine,
            Job::Resume {
                id: Some(id),
                wait: body.wait,
            },
            |_| {},
        )
        .await?;
    Ok(accepted(id, "running"))
}

pub async fn report(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = state.authorize(&headers, Scope::Read).await?;
    let id = super::parse_id(&id)?;
    let mut deployment = caller.visible(state.deployment(id).await?);
    deployment.events = Some(state.store().events(id, 0).await?);
    let markdown = crate::daemon::report::markdown(&deployment);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/markdown; charset=utf-8",
        )],
        markdown,
    )
        .into_response())
}

fn sse_event(event: &Event) -> SseEvent {
    SseEvent::default()
        .id(event.id.to_string())
        .event(event.kind.name())
        .data(serde_json::to_string(event).unwrap_or_default())
}

/// Replays what happened so far (after `Last-Event-ID`, if given), then
/// streams new events until the deployment finishes, from the history:
/// every daemon streams every deployment, whichever coordinator runs it
/// (see `daemon::feed`).
pub async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state.authorize(&headers, Scope::Read).await?;
    let id = super::parse_id(&id)?;
    event_stream(&state, id, last_event_id(&headers).unwrap_or(0), sse_event).await
}

/// The `Last-Event-ID` a reconnecting client sends.
pub(crate) fn last_event_id(headers: &HeaderMap) -> Option<i64> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A deployment's events after `after` as Server-Sent Events, each written
/// by `encode`: what the history has, then live until the deployment ends,
/// whichever coordinator runs it. The API's stream and the web dashboard's
/// both come from here.
pub(crate) async fn event_stream(
    state: &AppState,
    id: i64,
    after: i64,
    encode: fn(&Event) -> SseEvent,
) -> Result<Response, ApiError> {
    state.deployment(id).await?;
    // Subscribe before the first read, so nothing falls between the two.
    let mut wakes = state.feed().subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let store = state.store().clone();
    tokio::spawn(async move {
        let mut last = after;
        loop {
            let new = match store.events(id, last).await {
                Ok(new) => new,
                // The database is away for a moment (a restart): the stream
                // waits for it, and loses nothing.
                Err(e) if e.is_transient() => {
                    tracing::warn!(cause = %e, "reading events; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(cause = %e, "reading events");
                    return;
                }
            };
            for event in &new {
                last = event.id;
                let done = matches!(event.kind, EventKind::DeploymentFinished { .. });
                if tx.send(Ok(encode(event))).await.is_err() || done {
                    return;
                }
            }
            if !wakes.wait(id).await && new.is_empty() {
                // Quiet: ended without its final event (an error path)?
                if let Ok(Some(status)) = store.deployment_status(id).await
                    && !status.is_active()
                {
                    if let Ok(rest) = store.events(id, last).await {
                        for event in &rest {
                            let _ = tx.send(Ok(encode(event))).await;
                        }
                    }
                    return;
                }
            }
        }
    });
    let stream: ReceiverStream<Result<SseEvent, Infallible>> = ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
