//! The CLI as a client of the daemon (`--server URL`, `NIX_DEPLOY_SERVER`):
//! the same commands, sent over HTTP with a bearer token read from a file,
//! and a deployment's Server-Sent Events turned back into [`Event`]s for the
//! same live progress display as in-process runs.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::Secret;
use crate::events::Event;

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

pub struct Client {
    base: String,
    token: Option<Secret>,
    http: reqwest::Client,
}

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

    async fn answer(response: reqwest::Response) -> Result<serde_json::Value, ClientError> {
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if status.is_success() {
            return serde_json::from_str(&text)
                .map_err(|e| ClientError::Protocol(format!("not JSON: {e}")));
        }
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        Err(ClientError::Api {
            status: status.as_u16(),
            code: body["error"]["code"].as_str().unwrap_or("").to_string(),
            message: body["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{status}: {text}")),
        })
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        let response = self
            .request(reqwest::Method::GET, path)
            .timeout(Duration::from_secs(600))
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
            return Self::answer(response).await.map(|v| v.to_string());
        }
        response
            .text()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        let response = self
            .request(reqwest::Method::POST, path)
            .timeout(Duration::from_secs(600))
            .json(body)
            .send()
            .await
            .map_err(|e| self.connect_error(e))?;
        Self::answer(response).await
    }

    /// Follow `/deployments/{id}/events` until the deployment finishes,
    /// sending each event to `sink`. Reconnects with `Last-Event-ID` if the
    /// stream drops.
    pub async fn follow(&self, id: i64, sink: UnboundedSender<Event>) -> Result<(), ClientError> {
        let mut last: i64 = 0;
        let mut failures = 0;
        loop {
            let mut request = self.request(
                reqwest::Method::GET,
                &format!("/api/v1/deployments/{id}/events"),
            );
            if last > 0 {
                request = request.header("Last-Event-ID", last.to_string());
            }
            let mut response = match request.send().await {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => return Self::answer(r).await.map(|_| ()),
                Err(e) => {
                    failures += 1;
                    if failures > 5 {
                        return Err(self.connect_error(e));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut buffer = String::new();
            let mut data = String::new();
            loop {
                let chunk = match response.chunk().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(_) => break,
                };
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(newline) = buffer.find('\n') {
                    let line = buffer[..newline].trim_end_matches('\r').to_string();
                    buffer.drain(..=newline);
                    if let Some(rest) = line.strip_prefix("data:") {
                        data.push_str(rest.trim_start());
                    } else if line.is_empty() && !data.is_empty() {
                        let event: Event = serde_json::from_str(&data)
                            .map_err(|e| ClientError::Protocol(format!("bad event: {e}")))?;
                        data.clear();
                        last = event.id;
                        let finished = matches!(
                            event.kind,
                            crate::events::EventKind::DeploymentFinished { .. }
                        );
                        let _ = sink.send(event);
                        if finished {
                            return Ok(());
                        }
                    }
                }
            }
            // The stream ended without the end of the deployment: is it over?
            let deployment = self.get(&format!("/api/v1/deployments/{id}")).await?;
            if deployment["status"] != "running" {
                return Ok(());
            }
            failures += 1;
            if failures > 5 {
                return Err(ClientError::Protocol(
                    "the event stream keeps dropping".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
