//! Outgoing notifications on deployment start, finish, failure and
//! rollback, when a deployment waits (for approval, with Approve and Reject
//! buttons in Slack; for a maintenance window, with its next opening), and
//! the watch's alerts: Slack-compatible incoming webhooks (`{"text": …}`),
//! generic JSON webhooks (signed, as GitHub signs its own:
//! `X-Nix-Deploy-Signature-256: sha256=<HMAC-SHA256 of the body>`, with the
//! event's name and a stable delivery id in headers) and e-mail. Sending
//! never blocks a deployment: each notice goes out on its own task, retried
//! with exponential backoff, with a timeout per request.

use std::path::PathBuf;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use nix_deploy_core::approval::GateKind;
use nix_deploy_core::events::{Event, EventKind, HostStatus};
use nix_deploy_core::render;
use nix_deploy_core::watch::Alert;

use super::config::Secret;
use super::mail::{MailError, Mailer};

/// The header carrying a JSON webhook's signature.
pub const SIGNATURE_HEADER: &str = "X-Nix-Deploy-Signature-256";
/// The header naming the notice (`host.unhealthy`, `deployment.finished`, …).
pub const EVENT_HEADER: &str = "X-Nix-Deploy-Event";
/// The header with the notice's stable id: the same notice sent again (after
/// a restart) has the same one, for receivers to deduplicate.
pub const DELIVERY_HEADER: &str = "X-Nix-Deploy-Delivery";

/// `sha256=<hex>` of HMAC-SHA256(`secret`, `body`).
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NotifyConfig {
    #[serde(default)]
    pub slack_webhooks: Vec<String>,
    #[serde(default)]
    pub json_webhooks: Vec<String>,
    /// File with the secret JSON webhooks are signed with (HMAC-SHA256).
    pub webhook_secret_file: Option<PathBuf>,
    /// Who gets e-mail (through `[smtp]`).
    #[serde(default)]
    pub email_to: Vec<String>,
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
            webhook_secret_file: None,
            email_to: Vec::new(),
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
    /// The watch saw a host (or the fleet) change.
    Alert(Alert),
    /// Stopped at a gate: approvers (or a promotion) are needed.
    AwaitingApproval(Box<GateNotice>),
    /// Waits for a maintenance window to open.
    WaitingForWindow {
        id: i64,
        hosts: Vec<String>,
        reason: String,
        opens_at: Option<i64>,
    },
}

/// A gate a deployment stopped at, as people are told about it.
#[derive(Clone, Debug, PartialEq)]
pub struct GateNotice {
    pub id: i64,
    pub gate: u32,
    pub kind: GateKind,
    pub title: String,
    pub hosts: Vec<String>,
    /// Who still has to say yes.
    pub missing: String,
    pub deadline: Option<i64>,
    /// What each held host would run (what an approver sees).
    pub summary: String,
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
        EventKind::GateOpened {
            gate,
            gate_kind,
            title,
            hosts,
            missing,
            deadline,
        } => Some(Notice::AwaitingApproval(Box::new(GateNotice {
            id,
            gate: *gate,
            kind: *gate_kind,
            title: title.clone(),
            hosts: hosts.clone(),
            missing: missing.clone(),
            deadline: *deadline,
            summary: String::new(),
        }))),
        EventKind::WaitingForWindow {
            hosts,
            reason,
            until,
        } => Some(Notice::WaitingForWindow {
            id,
            hosts: hosts.clone(),
            reason: reason.clone(),
            opens_at: *until,
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
            Notice::Alert(alert) => alert.kind.event_name(),
            Notice::AwaitingApproval(_) => "deployment.awaiting_approval",
            Notice::WaitingForWindow { .. } => "deployment.waiting_for_window",
        }
    }

    /// The same for every attempt and every restart: receivers deduplicate
    /// by it.
    pub fn delivery_id(&self) -> String {
        match self {
            Notice::Started { id, .. } | Notice::Finished { id, .. } => {
                format!("deployment-{id}-{}", self.event_name())
            }
            Notice::HostRolledBack { id, host, .. } | Notice::HostFailed { id, host, .. } => {
                format!("deployment-{id}-{}-{host}", self.event_name())
            }
            Notice::Alert(alert) => alert.delivery_id(),
            Notice::AwaitingApproval(gate) => {
                format!(
                    "deployment-{}-{}-gate-{}",
                    gate.id,
                    self.event_name(),
                    gate.gate
                )
            }
            Notice::WaitingForWindow { id, .. } => {
                format!("deployment-{id}-{}", self.event_name())
            }
        }
    }

    /// Whether it goes out by e-mail too (a deployment's start does not).
    fn mailed(&self) -> bool {
        !matches!(self, Notice::Started { .. })
    }

    /// The e-mail's subject: the text without its icon.
    fn subject(&self) -> String {
        match self {
            Notice::Alert(alert) => alert.summary(),
            _ => self
                .text()
                .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string(),
        }
    }

    /// The e-mail's body: the subject, then what people need to act.
    fn mail_body(&self) -> String {
        let mut body = self.subject();
        body.push('\n');
        if let Notice::Alert(alert) = self
            && let Some(detail) = &alert.detail
        {
            body.push('\n');
            body.push_str(detail);
            body.push('\n');
        }
        body
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
            Notice::Alert(alert) => match &alert.detail {
                Some(detail) => format!("{}: {}", alert.text(), first_line(&Some(detail.clone()))),
                None => alert.text(),
            },
            Notice::AwaitingApproval(gate) => match gate.kind {
                GateKind::Pause => format!(
                    "⏸️ Deployment #{} is paused ({}): {} wait for a promotion (approve it to go on)",
                    gate.id,
                    gate.title,
                    gate.hosts.join(", ")
                ),
                GateKind::Approval => format!(
                    "✋ Deployment #{} awaits approval ({}): {}; still needed: {}{}",
                    gate.id,
                    gate.title,
                    gate.hosts.join(", "),
                    gate.missing,
                    gate.deadline
                        .map(|d| format!("; cancelled if not approved by {}", render::timestamp(d)))
                        .unwrap_or_default()
                ),
            },
            Notice::WaitingForWindow {
                id,
                hosts,
                reason,
                opens_at,
            } => format!(
                "⏳ Deployment #{id} waits for a maintenance window: {} ({reason}); next opening {}",
                hosts.join(", "),
                opens_at.map_or("none within 400 days".into(), render::timestamp)
            ),
        }
    }

    pub fn slack_payload(&self) -> serde_json::Value {
        match self {
            Notice::AwaitingApproval(gate) => super::buttons::gate_message(gate, &self.text()),
            _ => serde_json::json!({ "text": self.text() }),
        }
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
            Notice::Alert(alert) => serde_json::json!({ "alert": alert, "host": alert.host }),
            Notice::AwaitingApproval(gate) => serde_json::json!({
                "deployment_id": gate.id, "gate": gate.gate, "gate_kind": gate.kind,
                "title": gate.title, "hosts": gate.hosts, "missing": gate.missing,
                "deadline": gate.deadline, "summary": gate.summary }),
            Notice::WaitingForWindow {
                id,
                hosts,
                reason,
                opens_at,
            } => serde_json::json!({
                "deployment_id": id, "hosts": hosts, "reason": reason, "opens_at": opens_at }),
        };
        body["event"] = serde_json::json!(self.event_name());
        body["delivery"] = serde_json::json!(self.delivery_id());
        body["text"] = serde_json::json!(self.text());
        body
    }
}

/// What one deployment's watchers were told while it waited: each wait is
/// notified once (a window wait again only when it waits for something
/// else: other hosts, another opening).
#[derive(Debug, Default)]
pub struct Waits {
    window: Option<(Vec<String>, Option<i64>)>,
}

impl Waits {
    /// Whether `notice` is news.
    pub fn is_news(&mut self, notice: &Notice) -> bool {
        match notice {
            Notice::WaitingForWindow {
                hosts, opens_at, ..
            } => {
                let wait = Some((hosts.clone(), *opens_at));
                if self.window == wait {
                    return false;
                }
                self.window = wait;
                true
            }
            _ => true,
        }
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
    #[error("{0}")]
    Mail(#[from] MailError),
}

#[derive(Clone)]
pub struct Notifier {
    config: NotifyConfig,
    /// Signs JSON webhooks.
    secret: Option<Secret>,
    mailer: Option<Mailer>,
    client: reqwest::Client,
    /// Every notice on its way: shutdown waits for them.
    sending: tokio_util::task::TaskTracker,
}

impl Notifier {
    pub fn new(config: NotifyConfig, secret: Option<Secret>, mailer: Option<Mailer>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .unwrap_or_default();
        Notifier {
            config,
            secret,
            mailer,
            client,
            sending: tokio_util::task::TaskTracker::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.config.slack_webhooks.is_empty()
            && self.config.json_webhooks.is_empty()
            && self.mailer.is_none()
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

    /// Send to every target and wait for the outcome (the watch's alerts,
    /// tests, shutdown).
    pub async fn send_and_wait(&self, notice: Notice) -> Vec<Result<(), NotifyError>> {
        let mut sends = Vec::new();
        for url in &self.config.slack_webhooks {
            sends.push(futures::future::Either::Left(self.post(
                url.clone(),
                &notice,
                notice.slack_payload(),
                false,
            )));
        }
        for url in &self.config.json_webhooks {
            sends.push(futures::future::Either::Left(self.post(
                url.clone(),
                &notice,
                notice.json_payload(),
                true,
            )));
        }
        if let Some(mailer) = self.mailer.as_ref().filter(|_| notice.mailed()) {
            sends.push(futures::future::Either::Right(self.mail(mailer, &notice)));
        }
        futures::future::join_all(sends).await
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(self.config.retries as usize)
    }

    /// POST one notice, retried with exponential backoff (`backon`); `signed`
    /// with the webhook secret when there is one.
    async fn post(
        &self,
        url: String,
        notice: &Notice,
        body: serde_json::Value,
        signed: bool,
    ) -> Result<(), NotifyError> {
        let attempts = self.config.retries + 1;
        // The exact bytes that are signed are the ones sent.
        let body = body.to_string().into_bytes();
        let attempt = || async {
            let mut request = self
                .client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(EVENT_HEADER, notice.event_name())
                .header(DELIVERY_HEADER, notice.delivery_id());
            if let (true, Some(secret)) = (signed, &self.secret) {
                request = request.header(SIGNATURE_HEADER, signature(secret.expose(), &body));
            }
            match request.body(body.clone()).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                // reqwest's message names the URL: a secret.
                Err(e) => Err(e.without_url().to_string()),
            }
        };
        attempt
            .retry(self.backoff())
            .await
            .map_err(|message| NotifyError::Failed {
                url: url.clone(),
                message,
                attempts,
            })
    }

    /// E-mail one notice, retried like a webhook.
    async fn mail(&self, mailer: &Mailer, notice: &Notice) -> Result<(), NotifyError> {
        let subject = format!("[nix-deploy] {}", notice.subject());
        let body = notice.mail_body();
        let id = notice.delivery_id();
        let attempt = || mailer.send(&subject, &body, &id);
        Ok(attempt.retry(self.backoff()).await?)
    }
}

#[cfg(test)]
mod tests;
