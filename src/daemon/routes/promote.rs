//! `POST /api/v1/promote`: deploy to the target hosts exactly what their
//! source hosts run (deploy scope; a token limited to some hosts may only
//! promote to targets within its reach). Refused with 409 when the pairing
//! or a source host is not right, nothing recorded but the refusal in the
//! audit trail.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use nix_deploy_core::promote::PromoteRequest;

use super::parse_body;
use crate::daemon::config::Scope;
use crate::daemon::{ApiError, AppState, Job};
use crate::engine::PromoteJob;

pub async fn promote(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = state.authorize(&headers, Scope::Deploy).await?;
    let request: PromoteRequest = parse_body(&super::bytes(body)?)?;
    request
        .check()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let options = state.resolve(&request.options)?;
    if request.options.override_window.is_some() && !caller.scope.allows(Scope::Admin) {
        return Err(ApiError::Forbidden(format!(
            "{} may not override maintenance windows: that needs the admin scope",
            caller.identity
        )));
    }
    let job = PromoteJob {
        request: request.clone(),
        options,
        trigger: "api".into(),
        requested_by: caller.requested_by(),
    };
    let launched = state
        .launch(
            state.engine_for(&caller),
            Job::Promote(Box::new(job)),
            |_| {},
        )
        .await;
    let (action, target, detail) = match &launched {
        Ok(id) => (
            "promote",
            format!("deployment #{id}"),
            serde_json::json!({ "request": &request }),
        ),
        Err(e) => (
            "promote-refused",
            "promotion request".to_string(),
            serde_json::json!({ "request": &request, "error": e.to_string() }),
        ),
    };
    state
        .audit(&caller.identity, "api", action, &target, detail)
        .await?;
    Ok(super::deployments::accepted(launched?, "running"))
}
