//! The coordinator's HTTP client (health checks, later notifications): one
//! place that knows reqwest, with a timeout on every request.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("request failed: {0}")]
    Request(String),
    #[error("no answer within {}s", .0.as_secs())]
    Timeout(Duration),
}

/// Read at most this much of a body.
const MAX_BODY: usize = 1 << 20;

/// GET `url`; returns the status and (the start of) the body.
pub async fn get(url: &str, timeout: Duration) -> Result<(u16, String), HttpError> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| HttpError::Request(e.to_string()))?;
    let response = client.get(url).send().await.map_err(|e| {
        if e.is_timeout() {
            HttpError::Timeout(timeout)
        } else {
            HttpError::Request(error_chain(&e))
        }
    })?;
    let status = response.status().as_u16();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| HttpError::Request(error_chain(&e)))?;
    let body = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_BODY)]).into_owned();
    Ok((status, body))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
