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

use nix_deploy_core::events::{DeploymentStatus, Event, EventKind};
use nix_deploy_core::options::Request;
use nix_deploy_core::reports::{Accepted, CancelAnswer, DeploymentList};
use nix_deploy_core::run::Deployment;

use super::parse_body;
use crate::daemon::auth::authorize;
use crate::daemon::config::Scope;
use crate::daemon::{ApiError, AppState, Job};
use crate::engine::DeployRequest;

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = authorize(&headers, &state.tokens, Scope::Deploy)?;
    let request: Request = parse_body(&super::bytes(body)?)?;
    let (id, status) = start(&state, &request, "api", caller.requested_by()).await?;
    Ok(accepted(id, status))
}

/// Start (or, with `wait`, queue) the deployment a request asks for: its id
/// and `running` or `queued`. The API and the web dashboard both start
/// deployments here.
pub(crate) async fn start(
    state: &AppState,
    request: &Request,
    trigger: &str,
    requested_by: String,
) -> Result<(i64, &'static str), ApiError> {
    request
        .check_for_deploy()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let options = state.resolve(request)?;
    let engine = match &request.revision {
        Some(rev) => {
            let pinned = crate::daemon::github::flake_at_revision(&state.config.flake, rev)
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            state.engine_with_flake(&pinned)
        }
        None => state.engine(),
    };
    let deploy = DeployRequest {
        selection: request.selection(),
        wait: request.wait,
        options,
        trigger: trigger.into(),
        requested_by,
    };
    // Waiting for busy hosts: recorded now and answered at once (`queued`);
    // otherwise validated first, so bad input and busy hosts answer 400/409.
    if request.wait {
        let id = state.launch_queued(engine, deploy, |_| {}).await?;
        return Ok((id, "queued"));
    }
    let id = state.launch(engine, Job::Deploy(deploy), |_| {}).await?;
    Ok((id, "running"))
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
    authorize(&headers, &state.tokens, Scope::Read)?;
    let limit = query.limit.unwrap_or(20).clamp(1, 1000);
    Ok(Json(DeploymentList {
        deployments: state.store().deployments(limit).await?,
    }))
}

pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Deployment>, ApiError> {
    authorize(&headers, &state.tokens, Scope::Read)?;
    let id = super::parse_id(&id)?;
    Ok(Json(state.deployment(id).await?))
}

pub async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<CancelAnswer>, ApiError> {
    let caller = authorize(&headers, &state.tokens, Scope::Deploy)?;
    let id = super::parse_id(&id)?;
    Ok(Json(
        cancel_deployment(&state, id, &caller.requested_by()).await?,
    ))
}

/// Ask a running or queued deployment to stop starting hosts (409 when it
/// is neither). The API and the web dashboard both cancel here.
pub(crate) async fn cancel_deployment(
    state: &AppState,
    id: i64,
    by: &str,
) -> Result<CancelAnswer, ApiError> {
    let deployment = state.deployment(id).await?;
    let cancellable = matches!(
        deployment.status,
        DeploymentStatus::Running | DeploymentStatus::Queued
    );
    if !cancellable || !state.cancel(id, by).await? {
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
    authorize(&headers, &state.tokens, Scope::Deploy)?;
    let id = super::parse_id(&id)?;
    let body: ResumeBody = parse_body(&super::bytes(body)?)?;
    let deployment = state.deployment(id).await?;
    let engine = state.engine_with_flake(&deployment.flake);
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
    authorize(&headers, &state.tokens, Scope::Read)?;
    let id = super::parse_id(&id)?;
    let mut deployment = state.deployment(id).await?;
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
/// streams live events until the deployment finishes.
pub async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&headers, &state.tokens, Scope::Read)?;
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
/// by `encode`: what the store has, then live until the deployment ends. The
/// API's stream and the web dashboard's both come from here.
pub(crate) async fn event_stream(
    state: &AppState,
    id: i64,
    after: i64,
    encode: fn(&Event) -> SseEvent,
) -> Result<Response, ApiError> {
    let deployment = state.deployment(id).await?;
    // Subscribe before replaying, so nothing falls between the two.
    let mut live = state.subscribe(id);
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let store = state.store().clone();
    let running = matches!(
        deployment.status,
        DeploymentStatus::Running | DeploymentStatus::Queued
    );
    tokio::spawn(async move {
        let mut last = after;
        let mut finished = false;
        let send = |event: &Event| tx.send(Ok(encode(event)));
        match store.events(id, last).await {
            Ok(replay) => {
                for event in &replay {
                    last = event.id;
                    finished |= matches!(event.kind, EventKind::DeploymentFinished { .. });
                    if send(event).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::error!(cause = %e, "replaying events");
                return;
            }
        }
        if finished && live.is_none() {
            return;
        }
        if let Some(live) = live.as_mut() {
            loop {
                match live.recv().await {
                    Ok(event) => {
                        if event.id <= last {
                            continue;
                        }
                        last = event.id;
                        let done = matches!(event.kind, EventKind::DeploymentFinished { .. });
                        if send(&event).await.is_err() || done {
                            return;
                        }
                    }
                    // Fell behind: catch up from the store, which has everything.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if let Ok(missed) = store.events(id, last).await {
                            for event in &missed {
                                last = event.id;
                                if send(event).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        } else if running {
            // Run by another process (a CLI): follow the store until it ends
            // (a coordinator that died is marked interrupted by the daemon's
            // reconciler, which ends its stream too).
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let Ok(new) = store.events(id, last).await else {
                    return;
                };
                for event in &new {
                    last = event.id;
                    let done = matches!(event.kind, EventKind::DeploymentFinished { .. });
                    if send(event).await.is_err() || done {
                        return;
                    }
                }
                if new.is_empty()
                    && let Ok(Some(now)) = store.deployment(id).await
                    && !matches!(
                        now.status,
                        DeploymentStatus::Running | DeploymentStatus::Queued
                    )
                {
                    break;
                }
            }
        }
        // The broadcast closed: send whatever the store has beyond `last`.
        if let Ok(rest) = store.events(id, last).await {
            for event in &rest {
                let _ = send(event).await;
            }
        }
    });
    let stream: ReceiverStream<Result<SseEvent, Infallible>> = ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
