//! The CLI as a client of the daemon (`--server URL`, `NIX_DEPLOY_SERVER`):
//! the same documents the daemon serves, deserialized into the same core
//! types the CLI prints, over HTTP with a bearer token read from a file; and
//! a deployment's Server-Sent Events (parsed by `eventsource-stream`) turned
//! back into [`Event`]s for the same live progress display as in-process runs.

use std::path::Path;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;

use nix_deploy_core::events::{Event, EventKind};
use nix_deploy_core::run::Deployment;

use crate::daemon::config::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {url}: {message}")]
    Connect { url: String, message: String },
    /// The daemon refused the request; `status` tells why (400 bad input,
    /// 401/403 auth, 404, 409 busy).
    #[error("{message} (HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    #[error("token file: {0}")]
    Token(String),
}

impl ClientError {
    /// Whether this is the caller's fault (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, ClientError::Api { status, .. } if (400..500).contains(status))
            || matches!(self, ClientError::Token(_))
    }
}

/// The daemon's error document.
#[derive(serde::Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

pub struct Client {
    base: String,
    token: Option<Secret>,
    http: reqwest::Client,
}

/// How long one API call may take (a plan builds; a status may probe).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

impl Client {
    pub fn new(base: &str, token_file: Option<&Path>) -> Result<Self, ClientError> {
        let token = match token_file {
            Some(path) => {
                Some(Secret::from_file(path).map_err(|e| ClientError::Token(e.to_string()))?)
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(String::from_utf8_lossy(token.expose()));
        }
        request
    }

    fn connect_error(&self, e: reqwest::Error) -> ClientError {
        ClientError::Connect {
            url: self.base.clone(),
            message: e.to_string(),
        }
    }

    /// The daemon's refusal as an error.
    async fn refusal(response: reqwest::Response) -> ClientError {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => ClientError::Api {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
            },
            Err(_) => ClientError::Api {
                status: status.as_u16(),
                code: String::new(),
                message: format!("{status}: {text}"),
            },
        }
    }

    async fn answer<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, ClientError> {
        if !response.status().is_success() {
            return Err(Self::refusal(response).await);
        }
        let text = response
            .text()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        serde_json::from_str(&text)
            .map_err(|e| ClientError::Protocol(format!("not the expected document: {e}")))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self
            .request(reqwest::Method::GET, path)
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.connect_error(e))?;
        Self::answer(response).await
    }

    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let response = self
            .request(reqwest::Method::GET, path)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| self.connect_error(e))?;
        if response.status() != StatusCode::OK {
            return Err(Self::refusal(response).await);
        }
        response
            .text()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let response = self
            .request(reqwest::Method::POST, path)
            .timeout(CALL_TIMEOUT)
            .json(body)
            .send()
            .await
            .map_err(|e| self.connect_error(e))?;
        Self::answer(response).await
    }

    /// Follow `/deployments/{id}/events` until the deployment finishes,
    /// sending each event to `sink`. Reconnects with `Last-Event-ID` (with
    /// backoff) when the stream drops.
    pub async fn follow(&self, id: i64, sink: UnboundedSender<Event>) -> Result<(), ClientError> {
        let last = std::sync::atomic::AtomicI64::new(0);
        let attempt = || async {
            match self.stream_events(id, &last, &sink).await? {
                true => Ok(()),
                // The stream ended without the end of the deployment: is it over?
                false => {
                    let deployment: Deployment =
                        self.get(&format!("/api/v1/deployments/{id}")).await?;
                    if !deployment.status.is_active() {
                        Ok(())
                    } else {
                        Err(ClientError::Protocol(
                            "the event stream keeps dropping".into(),
                        ))
                    }
                }
            }
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(500))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(5),
            )
            .when(|e: &ClientError| !e.is_bad_input())
            .await
    }

    /// One connection to the event stream: true once the deployment finished.
    async fn stream_events(
        &self,
        id: i64,
        last: &std::sync::atomic::AtomicI64,
        sink: &UnboundedSender<Event>,
    ) -> Result<bool, ClientError> {
        let mut request = self.request(
            reqwest::Method::GET,
            &format!("/api/v1/deployments/{id}/events"),
        );
        let after = last.load(std::sync::atomic::Ordering::Relaxed);
        if after > 0 {
            request = request.header("Last-Event-ID", after.to_string());
        }
        let response = request.send().await.map_err(|e| self.connect_error(e))?;
        if !response.status().is_success() {
            return Err(Self::refusal(response).await);
        }
        let mut stream = response.bytes_stream().eventsource();
        while let Some(message) = stream.next().await {
            // A dropped connection ends this attempt; the caller reconnects.
            let Ok(message) = message else {
                return Ok(false);
            };
            let event: Event = serde_json::from_str(&message.data)
                .map_err(|e| ClientError::Protocol(format!("bad event: {e}")))?;
            last.store(event.id, std::sync::atomic::Ordering::Relaxed);
            let finished = matches!(event.kind, EventKind::DeploymentFinished { .. });
            let _ = sink.send(event);
            if finished {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
