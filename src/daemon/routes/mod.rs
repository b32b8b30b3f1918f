//! The endpoints, one file per group: the cluster, deployments (and their event streams),
//! the fleet (status, plan, a host's rollback and health, metrics), commands
//! and keys on many hosts (exec, upload-keys), promotion between
//! environments, the chat and push hooks, and the watched fleet (its
//! document and event stream).

pub mod approvals;
pub mod chat;
pub mod cluster;
pub mod deployments;
pub mod exec;
pub mod fleet;
pub mod hooks;
pub mod interactive;
pub mod promote;
pub mod watch;

use super::ApiError;

/// A JSON body (an empty one is the type's default). Errors name the field:
/// `malformed JSON body: canary_soak: ...`.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ApiError::BadRequest(if path == "." {
            format!("malformed JSON body: {inner}")
        } else {
            format!("malformed JSON body: {path}: {inner}")
        })
    })
}

/// A deployment id from the path, parsed after the caller was authorized (a
/// malformed id is a 400 only for someone allowed to ask).
pub(crate) fn parse_id(text: &str) -> Result<i64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::BadRequest(format!("`{text}` is not a deployment id")))
}

/// A request body, or the JSON error for one that is too large or broken.
pub(crate) fn bytes(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(e.body_text())
        } else {
            ApiError::BadRequest(e.body_text())
        }
    })
}
