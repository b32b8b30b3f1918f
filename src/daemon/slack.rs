//! The `/nix-deploy` Slack slash command: signature verification (v0,
//! HMAC-SHA256 with the signing secret, 5-minute replay window), the form
//! Slack posts, the command's arguments (the same as the CLI's), and the
//! messages we answer and post back.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use nix_deploy_core::events::{DeploymentStatus, HostStatus};
use nix_deploy_core::options::{Amount, Request, STRATEGY_NAMES};
use nix_deploy_core::plan::Action;
use nix_deploy_core::reports::PlanReport;
use nix_deploy_core::run::Deployment;
use nix_deploy_core::{duration, render, shell};

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

#[derive(Clone, Debug, PartialEq)]
pub enum ChatRequest {
    /// `/nix-deploy [HOST|@TAG ...] [--flag[=value] ...]`: the CLI's flags.
    Deploy(Box<Request>),
    Status,
    Cancel {
        id: Option<i64>,
    },
    Help,
}

/// A host name or glob, a `@tag` or tag glob, or a comma list of them
/// ([`nix_deploy_core::select`]), as on the command line.
fn check_selector(word: &str) -> Result<(), SlackError> {
    nix_deploy_core::select::check(&[word.to_string()])
        .map_err(|e| SlackError::BadArgument(e.to_string()))
}

/// Parse the text after `/nix-deploy`, with the CLI's flags (`--flag=value`
/// or `--flag value`).
pub fn parse_text(text: &str) -> Result<ChatRequest, SlackError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.first().copied() {
        Some("help") => return Ok(ChatRequest::Help),
        Some("status") if words.len() == 1 => return Ok(ChatRequest::Status),
        Some("cancel") => {
            return match words.get(1) {
                None => Ok(ChatRequest::Cancel { id: None }),
                Some(id) if words.len() == 2 => id
                    .trim_start_matches('#')
                    .parse()
                    .map(|id| ChatRequest::Cancel { id: Some(id) })
                    .map_err(|_| SlackError::BadArgument(format!("`{id}` is not a deployment id"))),
                Some(_) => Err(SlackError::BadArgument("usage: cancel [ID]".into())),
            };
        }
        _ => {}
    }
    let mut request = Request::default();
    let mut i = 0;
    while i < words.len() {
        let word = words[i];
        i += 1;
        let Some(flag) = word.strip_prefix("--") else {
            check_selector(word)?;
            request.hosts.push(word.to_string());
            continue;
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        let mut value = |what: &str| -> Result<String, SlackError> {
            let v = match inline.clone() {
                Some(v) => v,
                None => {
                    let v = words
                        .get(i)
                        .copied()
                        .ok_or_else(|| SlackError::BadArgument(format!("--{name} needs {what}")))?;
                    i += 1;
                    v.to_string()
                }
            };
            if v.is_empty() || v.len() > 64 {
                return Err(SlackError::BadArgument(format!("--{name} needs {what}")));
            }
            Ok(v)
        };
        let bad = |e: String| SlackError::BadArgument(format!("--{name}: {e}"));
        let duration = |v: String| duration::parse_timeout(&v).map_err(bad);
        match name {
            "strategy" => {
                let v = value("a strategy")?;
                if !STRATEGY_NAMES.contains(&v.as_str()) {
                    return Err(SlackError::BadArgument(format!(
                        "unknown strategy `{v}` ({})",
                        STRATEGY_NAMES.join(", ")
                    )));
                }
                request.strategy = Some(v);
            }
            "on" => {
                let v = value("a selector (web-*, @tag)")?;
                check_selector(&v)?;
                request.on.push(v);
            }
            "exclude" => {
                let v = value("a selector (web-*, @tag)")?;
                check_selector(&v)?;
                request.exclude.push(v);
            }
            "goal" => {
                let v = value("a goal")?;
                nix_deploy_core::goal::Goal::parse(&v).map_err(|e| bad(e.0))?;
                request.goal = Some(v);
            }
            "parallel" if inline.is_none() => request.parallel = true,
            "sequential" if inline.is_none() => request.sequential = true,
            "force" if inline.is_none() => request.force = true,
            "canary" => {
                let v = value("a host")?;
                if !shell::is_valid_host_name(&v) {
                    return Err(SlackError::BadArgument(format!("`{v}` is not a host name")));
                }
                request.canary.push(v);
            }
            "canary-soak" => {
                let v = value("a duration")?;
                request.canary_soak = Some(duration::parse(&v).map_err(bad)?);
            }
            "health-timeout" => request.health_timeout = Some(duration(value("a duration")?)?),
            "confirm-timeout" => request.confirm_timeout = Some(duration(value("a duration")?)?),
            "activation-timeout" => {
                request.activation_timeout = Some(duration(value("a duration")?)?)
            }
            "batch-size" => {
                let v = value("N or N%")?;
                request.batch_size = Some(Amount::parse(&v).map_err(|e| bad(e.0))?);
            }
            "max-failures" => {
                let v = value("N or N%")?;
                request.max_failures = Some(Amount::parse(&v).map_err(|e| bad(e.0))?);
            }
            other => {
                return Err(SlackError::BadArgument(format!(
                    "unknown option `--{other}`"
                )));
            }
        }
    }
    if request.parallel && request.sequential {
        return Err(SlackError::BadArgument(
            "--parallel and --sequential exclude each other".into(),
        ));
    }
    Ok(ChatRequest::Deploy(Box::new(request)))
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
    fn parses_commands_like_the_cli() {
        assert_eq!(parse_text("").unwrap(), ChatRequest::Deploy(Box::default()));
        assert_eq!(
            parse_text("p620 razer --strategy=canary").unwrap(),
            ChatRequest::Deploy(Box::new(Request {
                hosts: vec!["p620".into(), "razer".into()],
                strategy: Some("canary".into()),
                ..Request::default()
            }))
        );
        assert_eq!(
            parse_text("@laptop --strategy rolling --batch-size=2 --force").unwrap(),
            ChatRequest::Deploy(Box::new(Request {
                hosts: vec!["@laptop".into()],
                strategy: Some("rolling".into()),
                batch_size: Some(Amount::Count(2)),
                force: true,
                ..Request::default()
            }))
        );
        assert!(matches!(parse_text("--parallel").unwrap(), ChatRequest::Deploy(d) if d.parallel));
        for (text, secs) in [
            ("--canary-soak=90", 90),
            ("--canary-soak 30s", 30),
            ("--canary-soak=1h30m", 5400),
        ] {
            assert!(
                matches!(parse_text(text).unwrap(), ChatRequest::Deploy(d)
                    if d.canary_soak == Some(std::time::Duration::from_secs(secs))),
                "{text}"
            );
        }
        let e = parse_text("--canary-soak=10x").unwrap_err().to_string();
        assert!(e.contains("--canary-soak") && e.contains("30s"), "{e}");
        assert!(
            matches!(parse_text("--health-timeout 2m --confirm-timeout=45").unwrap(),
            ChatRequest::Deploy(d) if d.health_timeout == Some(std::time::Duration::from_secs(120))
                && d.confirm_timeout == Some(std::time::Duration::from_secs(45)))
        );
        let e = parse_text("--confirm-timeout=0").unwrap_err().to_string();
        assert!(e.contains("at least 1s"), "{e}");
        assert!(parse_text("--batch-size=0%x").is_err());
        assert!(
            matches!(parse_text("--sequential").unwrap(), ChatRequest::Deploy(d) if d.sequential)
        );
        assert_eq!(parse_text("status").unwrap(), ChatRequest::Status);
        assert_eq!(
            parse_text("cancel").unwrap(),
            ChatRequest::Cancel { id: None }
        );
        assert_eq!(
            parse_text("cancel #12").unwrap(),
            ChatRequest::Cancel { id: Some(12) }
        );
        assert_eq!(parse_text("help").unwrap(), ChatRequest::Help);
        assert_eq!(
            parse_text("web-* --on @edge-* --exclude=web-3 --goal boot").unwrap(),
            ChatRequest::Deploy(Box::new(Request {
                hosts: vec!["web-*".into()],
                on: vec!["@edge-*".into()],
                exclude: vec!["web-3".into()],
                goal: Some("boot".into()),
                ..Request::default()
            }))
        );
        for bad in [
            "--strategy=yolo",
            "--goal=reboot",
            "--on=a;b",
            "--exclude",
            "web-[",
            "--nope",
            "p620;reboot",
            "--strategy",
            "--parallel --sequential",
            "cancel x",
            "--canary=-oProxy",
        ] {
            assert!(parse_text(bad).is_err(), "{bad}");
        }
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
            hosts: vec![p620, p510],
            events: None,
            gates: Vec::new(),
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
