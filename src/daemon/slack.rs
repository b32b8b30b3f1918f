//! The `/nix-deploy` Slack slash command: signature verification (v0,
//! HMAC-SHA256 with the signing secret, 5-minute replay window), the form
//! Slack posts, and the messages we answer and post back. The command's
//! words are parsed by the CLI's own grammar (`nix_deploy_core::grammar`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use nix_deploy_core::events::{DeploymentStatus, HostStatus};
use nix_deploy_core::plan::Action;
use nix_deploy_core::reports::PlanReport;
use nix_deploy_core::run::Deployment;
use nix_deploy_core::{render, shell};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlackError {
    #[error("missing X-Slack-Request-Timestamp or X-Slack-Signature")]
    MissingHeader,
    #[error("malformed signature or timestamp")]
    Malformed,
    #[error("request timestamp is more than 5 minutes away (replay?)")]
    Stale,
    #[error("signature does not match")]
    BadSignature,
    #[error("malformed form: {0}")]
    BadForm(String),
    #[error("{0}")]
    BadArgument(String),
}

/// How far a request's timestamp may be from now.
pub const REPLAY_WINDOW_SECS: i64 = 300;

pub fn verify_signature(
    signing_secret: &[u8],
    timestamp: &str,
    body: &[u8],
    signature: &str,
    now_unix: i64,
) -> Result<(), SlackError> {
    if timestamp.is_empty() || signature.is_empty() {
        return Err(SlackError::MissingHeader);
    }
    let ts: i64 = timestamp.parse().map_err(|_| SlackError::Malformed)?;
    if (now_unix - ts).abs() > REPLAY_WINDOW_SECS {
        return Err(SlackError::Stale);
    }
    let expected = signature
        .strip_prefix("v0=")
        .and_then(|h| hex::decode(h).ok())
        .ok_or(SlackError::Malformed)?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(signing_secret).map_err(|_| SlackError::BadSignature)?;
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    // Constant-time comparison.
    mac.verify_slice(&expected)
        .map_err(|_| SlackError::BadSignature)
}

/// What Slack posts for a slash command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlashCommand {
    pub command: String,
    pub text: String,
    pub user_id: String,
    pub user_name: String,
    pub channel_id: String,
    pub team_domain: String,
    pub response_url: Option<String>,
}

pub fn parse_form(body: &[u8]) -> Result<SlashCommand, SlackError> {
    let mut command = SlashCommand::default();
    for (key, value) in form_urlencoded::parse(body) {
        let value = value.into_owned();
        match key.as_ref() {
            "command" => command.command = value,
            "text" => command.text = value,
            "user_id" => command.user_id = value,
            "user_name" => command.user_name = value,
            "channel_id" => command.channel_id = value,
            "team_domain" => command.team_domain = value,
            "response_url" => command.response_url = Some(value).filter(|v| !v.is_empty()),
            _ => {}
        }
    }
    if command.command.is_empty() {
        return Err(SlackError::BadForm("no `command` field".into()));
    }
    // Names end up in the history: keep them tame.
    if !shell::is_valid_user(&command.user_name) {
        command.user_name = if shell::is_valid_user(&command.user_id) {
            command.user_id.clone()
        } else {
            "unknown".into()
        };
    }
    Ok(command)
}

/// Only post to `response_url`s under the configured prefixes.
pub fn is_allowed_response_url(url: &str, allowed_prefixes: &[String]) -> bool {
    !url.chars().any(char::is_whitespace)
        && allowed_prefixes
            .iter()
            .any(|p| !p.is_empty() && url.starts_with(p.as_str()))
}

/// The plan as a chat message.
pub fn plan_message(plan: &PlanReport) -> serde_json::Value {
    let mut text = format!(
        "*Deployment Plan*: {} to deploy, {} skipped\n_{}_\n",
        plan.to_deploy.len(),
        plan.skipped.len(),
        plan.plan.strategy_reason
    );
    for (index, phase) in plan.plan.phases.iter().enumerate() {
        text.push_str(&format!("*Phase {}* ({}):\n", index + 1, phase.note));
        for name in &phase.hosts {
            let host = plan.plan.get(name);
            let summary = host
                .and_then(|h| h.summary.as_ref())
                .filter(|s| s.compared)
                .map(|s| {
                    format!(
                        " (+{} -{} ~{} packages{})",
                        s.added.len(),
                        s.removed.len(),
                        s.upgraded.len(),
                        if s.kernel_changed { ", kernel" } else { "" }
                    )
                })
                .unwrap_or_default();
            text.push_str(&format!(
                "  • {name} - CHANGED{summary}{}\n",
                if host.is_some_and(|h| h.canary) {
                    " (canary)"
                } else {
                    ""
                }
            ));
        }
    }
    for host in plan
        .plan
        .hosts
        .iter()
        .filter(|h| h.action != Action::Deploy)
    {
        text.push_str(&format!(
            "  • {} - {} ({})\n",
            host.name,
            host.state.as_str(),
            host.reason.as_deref().unwrap_or("")
        ));
    }
    text.push_str(&format!(
        "Estimated time: {} | Risk: {}",
        render::seconds(plan.plan.eta_seconds),
        plan.plan.risk.as_str()
    ));
    serde_json::json!({ "response_type": "in_channel", "text": text })
}

/// The final summary as a chat message.
pub fn summary_message(deployment: &Deployment) -> serde_json::Value {
    let icon = if deployment.status == DeploymentStatus::Succeeded {
        "✅"
    } else {
        "❌"
    };
    let mut text = format!(
        "{icon} *Deployment #{} {}* (strategy {})\nHosts deployed: {}/{} | skipped: {} | rolled back: {}\n",
        deployment.id,
        deployment.status,
        deployment.strategy,
        deployment.count(HostStatus::Deployed),
        deployment.hosts.len(),
        deployment.count(HostStatus::Skipped),
        deployment.count(HostStatus::RolledBack)
    );
    for h in &deployment.hosts {
        let generations = match h.status {
            HostStatus::Deployed => format!(
                " (generation {} → {})",
                render::generation(h.from.generation),
                render::generation(h.to.generation)
            ),
            _ => String::new(),
        };
        let note = h
            .error
            .as_deref()
            .or(h.reason.as_deref())
            .map(|e| format!(": {}", render::first_line(e)))
            .unwrap_or_default();
        text.push_str(&format!("  • {} {}{generations}{note}\n", h.host, h.status));
    }
    serde_json::json!({ "response_type": "in_channel", "text": text })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], ts: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("v0:{ts}:").as_bytes());
        mac.update(body);
        format!("v0={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn verifies_signatures_within_the_replay_window() {
        let body = b"command=%2Fnix-deploy&text=";
        let sig = sign(b"secret", "1000", body);
        assert_eq!(
            verify_signature(b"secret", "1000", body, &sig, 1100),
            Ok(())
        );
        assert_eq!(
            verify_signature(b"secret", "1000", body, &sig, 1301),
            Err(SlackError::Stale)
        );
        assert_eq!(
            verify_signature(b"secret", "1000", body, &sig, 699),
            Err(SlackError::Stale)
        );
        assert_eq!(
            verify_signature(b"other", "1000", body, &sig, 1000),
            Err(SlackError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"secret", "1000", b"tampered", &sig, 1000),
            Err(SlackError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"secret", "", body, &sig, 1000),
            Err(SlackError::MissingHeader)
        );
        assert_eq!(
            verify_signature(b"secret", "x", body, &sig, 1000),
            Err(SlackError::Malformed)
        );
        assert_eq!(
            verify_signature(b"secret", "1000", body, "v1=ab", 1000),
            Err(SlackError::Malformed)
        );
    }

    #[test]
    fn parses_the_form() {
        let c = parse_form(b"command=%2Fnix-deploy&text=p620+razer+--strategy%3Dcanary&user_name=alice&response_url=https%3A%2F%2Fhooks.slack.com%2Fx").unwrap();
        assert_eq!(c.command, "/nix-deploy");
        assert_eq!(c.text, "p620 razer --strategy=canary");
        assert_eq!(c.user_name, "alice");
        assert_eq!(c.response_url.as_deref(), Some("https://hooks.slack.com/x"));
        assert!(parse_form(b"text=x").is_err());
        let c = parse_form(b"command=%2Fnix-deploy&user_name=a%3Bb&user_id=U123").unwrap();
        assert_eq!(c.user_name, "U123");
    }

    #[test]
    fn response_urls_must_match_a_prefix() {
        let prefixes = vec!["https://hooks.slack.com/".to_string()];
        assert!(is_allowed_response_url(
            "https://hooks.slack.com/commands/1/2",
            &prefixes
        ));
        assert!(!is_allowed_response_url(
            "https://evil.example/hooks.slack.com/",
            &prefixes
        ));
        assert!(!is_allowed_response_url(
            "http://169.254.169.254/",
            &prefixes
        ));
        assert!(!is_allowed_response_url("https://hooks.slack.com/x", &[]));
    }

    #[test]
    fn messages_read_like_the_seed() {
        use nix_deploy_core::events::{HostState, SystemRef};
        use nix_deploy_core::plan::{EstimateSource, Phase, Plan, PlannedHost, Risk};
        use nix_deploy_core::run::{HostRun, Span};

        let mut p620 = HostRun::new(4, "p620");
        p620.status = HostStatus::Deployed;
        p620.from.generation = Some(245);
        p620.to.generation = Some(246);
        let mut p510 = HostRun::new(4, "p510");
        p510.status = HostStatus::Skipped;
        p510.reason = Some("no changes".into());
        let deployment = Deployment {
            id: 4,
            kind: Default::default(),
            exec: None,
            created_at: 0,
            time: Span::default(),
            status: DeploymentStatus::Succeeded,
            trigger: "slack".into(),
            requested_by: "slack:alice".into(),
            flake: ".".into(),
            flake_rev: None,
            strategy: "smart".into(),
            options: Default::default(),
            selected: vec!["p510".into(), "p620".into()],
            plan: None,
            error: None,
            pid: None,
            pinned: None,
            hosts: vec![p620, p510],
            events: None,
            gates: Vec::new(),
            waiting: None,
        };
        let text = summary_message(&deployment)["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(text.contains("Deployment #4 succeeded"), "{text}");
        assert!(
            text.contains("p620 deployed (generation 245 → 246)"),
            "{text}"
        );
        assert!(text.contains("p510 skipped: no changes"), "{text}");

        let planned = |name: &str, action: Action, state: HostState| PlannedHost {
            name: name.into(),
            role: "client".into(),
            state,
            changed: action == Action::Deploy,
            current: SystemRef::default(),
            target_path: String::new(),
            action,
            reason: (action == Action::Skip).then(|| "no changes".into()),
            error: None,
            depends_on: Vec::new(),
            waits_for: Vec::new(),
            phase: (action == Action::Deploy).then_some(0),
            canary: false,
            batch: None,
            estimate_seconds: 90.0,
            estimate_from_history: false,
            estimate_source: EstimateSource::Default,
            risk: Risk::Low,
            risk_reasons: Vec::new(),
            summary: None,
            eval_cached: false,
        };
        let plan = PlanReport {
            flake: ".".into(),
            fleet_size: 2,
            evaluation: Default::default(),
            plan: Plan {
                strategy: Default::default(),
                strategy_reason: "smart".into(),
                hosts: vec![
                    planned("p620", Action::Deploy, HostState::Changed),
                    planned("p510", Action::Skip, HostState::Unchanged),
                ],
                phases: vec![Phase {
                    index: 0,
                    hosts: vec!["p620".into()],
                    note: "parallel".into(),
                }],
                eta_seconds: 90.0,
                risk: Risk::Low,
                risk_reasons: Vec::new(),
                rollback_strategy: String::new(),
                warnings: Vec::new(),
                parallel_limit: 4,
                max_failures: Some(0),
                rollback_all_on_abort: true,
                canary_soak_seconds: None,
            },
            to_deploy: vec!["p620".into()],
            skipped: vec!["p510".into()],
            unreachable: Vec::new(),
            pending_reboot: Vec::new(),
            reboot_required: Vec::new(),
        };
        let text = plan_message(&plan)["text"].as_str().unwrap().to_string();
        assert!(
            text.contains("Phase 1") && text.contains("p620 - CHANGED"),
            "{text}"
        );
        assert!(text.contains("p510 - UNCHANGED (no changes)"), "{text}");
        assert!(
            text.contains("1m 30s") && text.contains("Risk: LOW"),
            "{text}"
        );
    }
}
