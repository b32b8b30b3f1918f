//! Outgoing notifications on deployment start, finish, failure and rollback:
//! Slack-compatible incoming webhooks (`{"text": …}`) and generic JSON
//! webhooks. Sending never blocks a deployment: each notice goes out on its
//! own task, retried with exponential backoff, with a timeout per request.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::Deserialize;

use nix_deploy_core::events::{Event, EventKind, HostStatus};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NotifyConfig {
    #[serde(default)]
    pub slack_webhooks: Vec<String>,
    #[serde(default)]
    pub json_webhooks: Vec<String>,
    /// Files each holding a Slack webhook URL (a webhook URL is a secret:
    /// whoever has it may post); relative: systemd credentials. Read at
    /// start into `slack_webhooks`.
    #[serde(default)]
    pub slack_webhook_files: Vec<std::path::PathBuf>,
    /// The same for JSON webhooks.
    #[serde(default)]
    pub json_webhook_files: Vec<std::path::PathBuf>,
    /// Attempts after the first.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Per request: a number of seconds or e.g. `"10s"`.
    #[serde(
        default = "default_timeout",
        alias = "timeout-secs",
        with = "nix_deploy_core::duration::human"
    )]
    pub timeout: Duration,
}

fn default_retries() -> u32 {
    3
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            slack_webhooks: Vec::new(),
            json_webhooks: Vec::new(),
            slack_webhook_files: Vec::new(),
            json_webhook_files: Vec::new(),
            retries: default_retries(),
            timeout: default_timeout(),
        }
    }
}

impl NotifyConfig {
    /// Read the URL files (`*-webhook-files`) into the URL lists; `read`
    /// reads one secret file, given its config key.
    pub fn read_url_files<E>(
        &mut self,
        read: impl Fn(&str, &std::path::Path) -> Result<String, E>,
    ) -> Result<(), E> {
        for file in &self.slack_webhook_files {
            self.slack_webhooks
                .push(read("notifications.slack-webhook-files", file)?);
        }
        for file in &self.json_webhook_files {
            self.json_webhooks
                .push(read("notifications.json-webhook-files", file)?);
        }
        Ok(())
    }
}

/// A webhook URL as logs may show it: scheme and host only (the path of a
/// Slack webhook is its secret).
pub fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let host = host.rsplit('@').next().unwrap_or(host);
            format!("{scheme}://{host}/…")
        }
        None => "(a webhook URL)".to_string(),
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    Started {
        id: i64,
        hosts: Vec<String>,
        strategy: String,
    },
    Finished {
        id: i64,
        status: String,
    },
    HostRolledBack {
        id: i64,
        host: String,
        error: Option<String>,
    },
    HostFailed {
        id: i64,
        host: String,
        status: String,
        error: Option<String>,
    },
}

/// The events worth telling people about.
pub fn notice_from_event(event: &Event) -> Option<Notice> {
    let id = event.deployment_id;
    match &event.kind {
        EventKind::DeploymentStarted { hosts, strategy } => Some(Notice::Started {
            id,
            hosts: hosts.clone(),
            strategy: strategy.clone(),
        }),
        EventKind::DeploymentFinished { status } => Some(Notice::Finished {
            id,
            status: status.to_string(),
        }),
        EventKind::HostFinished { status, error, .. } => {
            let host = event.host.clone().unwrap_or_default();
            match status {
                HostStatus::RolledBack => Some(Notice::HostRolledBack {
                    id,
                    host,
                    error: error.clone(),
                }),
                HostStatus::Failed | HostStatus::RollbackFailed | HostStatus::Unhealthy => {
                    Some(Notice::HostFailed {
                        id,
                        host,
                        status: status.to_string(),
                        error: error.clone(),
                    })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn first_line(text: &Option<String>) -> String {
    text.as_deref()
        .and_then(|t| t.lines().next())
        .unwrap_or("")
        .to_string()
}

impl Notice {
    pub fn event_name(&self) -> &'static str {
        match self {
            Notice::Started { .. } => "deployment.started",
            Notice::Finished { .. } => "deployment.finished",
            Notice::HostRolledBack { .. } => "host.rolled_back",
            Notice::HostFailed { .. } => "host.failed",
        }
    }

    pub fn text(&self) -> String {
        match self {
            Notice::Started {
                id,
                hosts,
                strategy,
            } => format!(
                "🚀 Deployment #{id} started: {} host(s) ({}), strategy {strategy}",
                hosts.len(),
                hosts.join(", ")
            ),
            Notice::Finished { id, status } => {
                let icon = if status == "succeeded" { "✅" } else { "❌" };
                format!("{icon} Deployment #{id} {status}")
            }
            Notice::HostRolledBack { id, host, error } => {
                format!(
                    "↩️ Deployment #{id}: {host} was rolled back: {}",
                    first_line(error)
                )
            }
            Notice::HostFailed {
                id,
                host,
                status,
                error,
            } => {
                format!(
                    "❌ Deployment #{id}: {host} {status}: {}",
                    first_line(error)
                )
            }
        }
    }

    pub fn slack_payload(&self) -> serde_json::Value {
        serde_json::json!({ "text": self.text() })
    }

    pub fn json_payload(&self) -> serde_json::Value {
        let mut body = match self {
            Notice::Started {
                id,
                hosts,
                strategy,
            } => serde_json::json!({
                "deployment_id": id, "hosts": hosts, "strategy": strategy }),
            Notice::Finished { id, status } => serde_json::json!({
                "deployment_id": id, "status": status }),
            Notice::HostRolledBack { id, host, error } => serde_json::json!({
                "deployment_id": id, "host": host, "error": error }),
            Notice::HostFailed {
                id,
                host,
                status,
                error,
            } => serde_json::json!({
                "deployment_id": id, "host": host, "status": status, "error": error }),
        };
        body["event"] = serde_json::json!(self.event_name());
        body["text"] = serde_json::json!(self.text());
        body
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("{}: {message} (after {attempts} attempt(s))", redacted(url))]
    Failed {
        url: String,
        message: String,
        attempts: u32,
    },
}

#[derive(Clone)]
pub struct Notifier {
    config: NotifyConfig,
    client: reqwest::Client,
    /// Every notice on its way: shutdown waits for them.
    sending: tokio_util::task::TaskTracker,
}

impl Notifier {
    pub fn new(config: NotifyConfig) -> Self {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .unwrap_or_default();
        Notifier {
            config,
            client,
            sending: tokio_util::task::TaskTracker::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.config.slack_webhooks.is_empty() && self.config.json_webhooks.is_empty()
    }

    /// Send in the background; returns at once.
    pub fn send(&self, notice: Notice) {
        if self.is_empty() {
            return;
        }
        let this = self.clone();
        self.sending.spawn(async move {
            for result in this.send_and_wait(notice).await {
                if let Err(e) = result {
                    tracing::warn!(cause = %e, "notification not delivered");
                }
            }
        });
    }

    /// Wait (at most `within`) for the notices still on their way: at
    /// shutdown, nothing queued is dropped silently.
    pub async fn flush(&self, within: Duration) {
        self.sending.close();
        if tokio::time::timeout(within, self.sending.wait())
            .await
            .is_err()
        {
            tracing::warn!("notifications still undelivered at shutdown");
        }
    }

    /// Send to every target and wait for the outcome (tests, shutdown).
    pub async fn send_and_wait(&self, notice: Notice) -> Vec<Result<(), NotifyError>> {
        let mut sends = Vec::new();
        for url in &self.config.slack_webhooks {
            sends.push(self.post(url.clone(), notice.slack_payload()));
        }
        for url in &self.config.json_webhooks {
            sends.push(self.post(url.clone(), notice.json_payload()));
        }
        futures::future::join_all(sends).await
    }

    /// POST one notice, retried with exponential backoff (`backon`).
    async fn post(&self, url: String, body: serde_json::Value) -> Result<(), NotifyError> {
        let attempts = self.config.retries + 1;
        let attempt = || async {
            match self.client.post(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                // reqwest's message names the URL: a secret.
                Err(e) => Err(e.without_url().to_string()),
            }
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(250))
                    .with_max_delay(Duration::from_secs(30))
                    .with_max_times(self.config.retries as usize),
            )
            .await
            .map_err(|message| NotifyError::Failed {
                url: url.clone(),
                message,
                attempts,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_never_reach_a_message() {
        assert_eq!(
            redacted("https://hooks.slack.com/services/T000/B000/XXXX"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(
            redacted("http://user:pw@example.org:8080/x?t=1"),
            "http://example.org:8080/…"
        );
        assert_eq!(redacted("nonsense"), "(a webhook URL)");
        let e = NotifyError::Failed {
            url: "https://hooks.slack.com/services/T000/B000/XXXX".into(),
            message: "HTTP 500".into(),
            attempts: 2,
        };
        assert!(!e.to_string().contains("XXXX"), "{e}");
    }
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A real HTTP receiver on loopback that fails the first `fail_first`
    /// requests with 500, and records every body.
    async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        tokio::spawn(async move {
            let mut served = 0usize;
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 65536];
                let mut read = 0;
                // Read until the body (Content-Length) is complete.
                loop {
                    let n = stream.read(&mut buf[read..]).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    read += n;
                    let text = String::from_utf8_lossy(&buf[..read]).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            seen.lock().unwrap().push(body.to_string());
                            break;
                        }
                    }
                }
                served += 1;
                let status = if served <= fail_first {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let _ = stream
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        (url, bodies)
    }

    fn notice() -> Notice {
        Notice::Finished {
            id: 7,
            status: "succeeded".into(),
        }
    }

    #[tokio::test]
    async fn delivers_to_slack_and_json_webhooks() {
        let (slack, slack_bodies) = receiver(0).await;
        let (json, json_bodies) = receiver(0).await;
        let notifier = Notifier::new(NotifyConfig {
            slack_webhooks: vec![slack],
            json_webhooks: vec![json],
            ..NotifyConfig::default()
        });
        let results = notifier.send_and_wait(notice()).await;
        assert!(results.iter().all(Result::is_ok));
        let slack: serde_json::Value =
            serde_json::from_str(&slack_bodies.lock().unwrap()[0]).unwrap();
        assert_eq!(slack["text"], "✅ Deployment #7 succeeded");
        let json: serde_json::Value =
            serde_json::from_str(&json_bodies.lock().unwrap()[0]).unwrap();
        assert_eq!(json["event"], "deployment.finished");
        assert_eq!(json["deployment_id"], 7);
    }

    #[tokio::test]
    async fn retries_with_backoff_until_delivered() {
        let (url, bodies) = receiver(2).await;
        let notifier = Notifier::new(NotifyConfig {
            json_webhooks: vec![url],
            retries: 3,
            ..NotifyConfig::default()
        });
        let results = notifier.send_and_wait(notice()).await;
        assert!(results[0].is_ok(), "{results:?}");
        assert_eq!(
            bodies.lock().unwrap().len(),
            3,
            "two failures, then delivered"
        );

        let (url, _) = receiver(usize::MAX).await;
        let notifier = Notifier::new(NotifyConfig {
            json_webhooks: vec![url],
            retries: 1,
            ..NotifyConfig::default()
        });
        let results = notifier.send_and_wait(notice()).await;
        assert!(
            results[0]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("2 attempt")
        );
    }

    #[tokio::test]
    async fn send_never_blocks_the_caller() {
        // A receiver that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let notifier = Notifier::new(NotifyConfig {
            slack_webhooks: vec![url],
            timeout: Duration::from_secs(30),
            ..NotifyConfig::default()
        });
        let started = std::time::Instant::now();
        notifier.send(notice());
        assert!(started.elapsed() < std::time::Duration::from_millis(50));
        drop(listener);
    }

    #[test]
    fn maps_events_to_notices() {
        let event = |kind| Event {
            id: 1,
            deployment_id: 3,
            at: 0,
            host: Some("web1".into()),
            kind,
        };
        assert_eq!(
            notice_from_event(&event(EventKind::HostFinished {
                status: HostStatus::RolledBack,
                from: Default::default(),
                to: Default::default(),
                duration_ms: 1,
                error: Some("activate failed\nmore".into()),
                after: None,
            })),
            Some(Notice::HostRolledBack {
                id: 3,
                host: "web1".into(),
                error: Some("activate failed\nmore".into())
            })
        );
        assert_eq!(
            notice_from_event(&event(EventKind::HostFinished {
                status: HostStatus::Deployed,
                from: Default::default(),
                to: Default::default(),
                duration_ms: 1,
                error: None,
                after: None,
            })),
            None
        );
        assert!(
            notice_from_event(&event(EventKind::Log {
                message: "x".into()
            }))
            .is_none()
        );
        let text = Notice::HostRolledBack {
            id: 3,
            host: "web1".into(),
            error: Some("boom\nmore".into()),
        }
        .text();
        assert_eq!(text, "↩️ Deployment #3: web1 was rolled back: boom");
    }
}
