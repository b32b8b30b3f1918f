//! Fleet-level endpoints: status, plan, a host's rollback and health check,
//! and metrics.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use nix_deploy_core::fleet::Selection;
use nix_deploy_core::options::Request;
use nix_deploy_core::reports::{HostHealth, PlanReport, StatusReport};
use nix_deploy_core::shell;

use super::parse_body;
use crate::daemon::auth::Caller;
use crate::daemon::config::Scope;
use crate::daemon::{ApiError, AppState, Job};
use crate::engine::RollbackRequest;

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
) -> Result<Json<StatusReport>, ApiError> {
    // A live status probes every host: more than reading the history.
    let scope = if query.live {
        Scope::Deploy
    } else {
        Scope::Read
    };
    state.authorize(&headers, scope).await?;
    let live = if query.live {
        Some(
            state
                .engine()
                .plan(&Selection::default(), &state.default_options(), false)
                .await?,
        )
    } else {
        None
    };
    Ok(Json(StatusReport {
        hosts: state.store().host_states().await?,
        running_deployments: state.store().running_deployments().await?,
        live,
        fleet: Some(state.fleet_view().await?),
    }))
}

/// The plan for a request (`summaries: false` skips building).
pub async fn plan(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<PlanReport>, ApiError> {
    // A plan evaluates, builds and probes: not for read-only tokens.
    let caller = state.authorize(&headers, Scope::Deploy).await?;
    let request: Request = parse_body(&super::bytes(body)?)?;
    Ok(Json(plan_report(&state, &request, &caller).await?))
}

/// The plan for a request, with the daemon's defaults for what it leaves
/// out. The API and the web dashboard both plan here.
pub(crate) async fn plan_report(
    state: &AppState,
    request: &Request,
    caller: &Caller,
) -> Result<PlanReport, ApiError> {
    request
        .check_for_plan()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let options = state.resolve(request)?;
    // `revision`: the flake pinned to that commit (a plan with it shows what
    // a deployment with it deploys).
    let engine = state.engine_at(request.revision.as_deref(), caller)?;
    let report = engine
        .plan(
            &request.selection(),
            &options,
            request.summaries.unwrap_or(true),
        )
        .await?;
    Ok(report)
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
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = state.authorize(&headers, Scope::Deploy).await?;
    let body: RollbackBody = parse_body(&super::bytes(body)?)?;
    let id = start_rollback(&state, host, body.to_generation, "api", &caller).await?;
    Ok(super::deployments::accepted(id, "running"))
}

/// Roll a host back (to its previous generation, or `to_generation`) in the
/// background, as `caller` through `via`, audited: the run's id. The API and
/// the web dashboard both roll back here.
pub(crate) async fn start_rollback(
    state: &AppState,
    host: String,
    to_generation: Option<u32>,
    via: &str,
    caller: &Caller,
) -> Result<i64, ApiError> {
    if !shell::is_valid_host_name(&host) {
        return Err(ApiError::BadRequest(format!(
            "`{host}` is not a valid host name"
        )));
    }
    let host_name = host.clone();
    let job = Job::Rollback(RollbackRequest {
        host,
        to_generation,
        options: state.default_options(),
        trigger: via.into(),
        requested_by: caller.requested_by(),
    });
    state
        .audit(
            &caller.identity,
            via,
            "rollback",
            &host_name,
            serde_json::json!({ "to_generation": to_generation }),
        )
        .await?;
    state.launch(state.engine_for(caller), job, |_| {}).await
}

pub async fn health(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(host): Path<String>,
) -> Result<Json<HostHealth>, ApiError> {
    // Health checks run commands on the host.
    let caller = state.authorize(&headers, Scope::Deploy).await?;
    if !shell::is_valid_host_name(&host) {
        return Err(ApiError::BadRequest(format!(
            "`{host}` is not a valid host name"
        )));
    }
    let health = state
        .engine_for(&caller)
        .check_health(&host, Duration::from_secs(10))
        .await?;
    Ok(Json(health))
}

pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let fleet = state.fleet_view().await?;
    let text = crate::daemon::metrics::render(state.store(), state.node(), Some(&fleet)).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
