//! `POST /api/v1/exec` (scope `admin`): a command on many hosts, and
//! `POST /api/v1/upload-keys` (scope `deploy`): the keys of the selected
//! hosts again. Both answer `202` with the run's id; the run is followed
//! like a deployment (`/api/v1/deployments/{id}` and its `/events`).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use nix_deploy_core::exec::ExecRequest;
use nix_deploy_core::keys::KeysRequest;

use super::parse_body;
use crate::daemon::config::Scope;
use crate::daemon::{ApiError, AppState, Job};
use crate::engine::{ExecJob, UploadKeysRequest};

pub async fn exec(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    // Who asks comes first: a body too large is the caller's business only.
    let caller = state.authorize(&headers, Scope::Admin).await?;
    let request: ExecRequest = parse_body(&super::bytes(body)?)?;
    let spec = request
        .resolve()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let job = Job::Exec(ExecJob {
        selection: request.selection(),
        spec,
        trigger: "api".into(),
        requested_by: caller.requested_by(),
    });
    state
        .audit(
            &caller.identity,
            "api",
            "exec",
            "hosts",
            serde_json::to_value(&request).unwrap_or_default(),
        )
        .await?;
    let id = state.launch(state.engine_for(&caller), job, |_| {}).await?;
    Ok(super::deployments::accepted(id, "running"))
}

pub async fn upload_keys(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = state.authorize(&headers, Scope::Deploy).await?;
    let request: KeysRequest = parse_body(&super::bytes(body)?)?;
    let parallel_limit = request
        .resolve()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let job = Job::UploadKeys(UploadKeysRequest {
        selection: request.selection(),
        parallel_limit,
        trigger: "api".into(),
        requested_by: caller.requested_by(),
    });
    state
        .audit(
            &caller.identity,
            "api",
            "upload-keys",
            "hosts",
            serde_json::to_value(&request).unwrap_or_default(),
        )
        .await?;
    let id = state.launch(state.engine_for(&caller), job, |_| {}).await?;
    Ok(super::deployments::accepted(id, "running"))
}
