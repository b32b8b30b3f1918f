//! Fleet-level endpoints: status, plan, a host's rollback and health check,
//! and metrics.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::authorize;
use super::{ApiError, AppState, Job};
use crate::config::Scope;
use crate::inventory::Selection;
use crate::plan::OptionsInput;

#[derive(Deserialize)]
pub struct StatusQuery {
    /// Probe every host now and compare with the flake (slower).
    #[serde(default)]
    live: bool,
}

/// Every host: what it runs, its generation, its last deployment; with
/// `?live=true`, also CHANGED/UNCHANGED against the flake right now.
pub async fn status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<StatusQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&headers, &state.tokens, Scope::Read)?;
    let hosts = state.store().host_states().await?;
    let running = state.store().running_deployments().await?;
    let mut doc = serde_json::json!({ "hosts": hosts, "running_deployments": running });
    if query.live {
        let report = state
            .engine()
            .plan(&Selection::default(), &state.default_options(), false)
            .await?;
        doc["live"] = serde_json::to_value(&report).map_err(anyhow::Error::from)?;
    }
    Ok(Json(doc))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    on: Vec<String>,
    #[serde(default)]
    all: bool,
    /// Build changed toplevels to compare closures (change summaries).
    #[serde(default = "yes")]
    summaries: bool,
    #[serde(flatten)]
    options: OptionsInput,
}

fn yes() -> bool {
    true
}

pub async fn plan(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&headers, &state.tokens, Scope::Read)?;
    let body: PlanBody = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_str("{}").map_err(anyhow::Error::from)?
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))?
    };
    let options = body
        .options
        .resolve(&state.default_options())
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let selection = Selection {
        names: body.hosts,
        tags: body.on,
        all: body.all,
    };
    let report = state
        .engine()
        .plan(&selection, &options, body.summaries)
        .await?;
    Ok(Json(
        serde_json::to_value(&report).map_err(anyhow::Error::from)?,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    to_generation: Option<u32>,
}

pub async fn rollback(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(host): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let caller = authorize(&headers, &state.tokens, Scope::Deploy)?;
    if !crate::shell::is_valid_host_name(&host) {
        return Err(ApiError::BadRequest(format!(
            "`{host}` is not a valid host name"
        )));
    }
    let body: RollbackBody = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))?
    };
    let job = Job::Rollback {
        host,
        to_generation: body.to_generation,
        requested_by: caller.requested_by(),
    };
    let id = state.launch(state.engine(), job, |_| {}).await?;
    Ok(super::deployments::accepted(id))
}

pub async fn health(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(host): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    authorize(&headers, &state.tokens, Scope::Read)?;
    if !crate::shell::is_valid_host_name(&host) {
        return Err(ApiError::BadRequest(format!(
            "`{host}` is not a valid host name"
        )));
    }
    let health = state
        .engine()
        .check_health(&host, Duration::from_secs(10))
        .await?;
    Ok(Json(
        serde_json::to_value(&health).map_err(anyhow::Error::from)?,
    ))
}

pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = crate::metrics::render(state.store()).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
