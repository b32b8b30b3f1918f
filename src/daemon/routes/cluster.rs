//! `GET /api/v1/cluster`: the coordinators sharing this history, their last
//! heartbeats, the leader, and who holds which deployment at which epoch.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;

use nix_deploy_core::cluster::ClusterReport;

use crate::daemon::auth::authorize;
use crate::daemon::config::Scope;
use crate::daemon::{ApiError, AppState};

pub async fn cluster(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<ClusterReport>, ApiError> {
    authorize(&headers, &state.tokens, Scope::Read)?;
    Ok(Json(state.store().cluster().await?))
}
