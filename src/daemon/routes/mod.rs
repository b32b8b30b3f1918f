//! The endpoints, one file per group: deployments (and their event streams),
//! the fleet (status, plan, a host's rollback and health, metrics), commands
//! and keys on many hosts (exec, upload-keys), and the chat and push hooks.

pub mod deployments;
pub mod exec;
pub mod fleet;
pub mod hooks;

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
