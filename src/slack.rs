//! The `/nix-deploy` Slack slash command: signature verification (v0,
//! HMAC-SHA256 with the signing secret, 5-minute replay window), the form
//! Slack posts, the command's arguments (the same as the CLI's), and the
//! messages we answer and post back.

use hmac::{Hmac, Mac};
use sha2::Sha256;

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
    if !crate::shell::is_valid_user(&command.user_name) {
        command.user_name = if crate::shell::is_valid_user(&command.user_id) {
            command.user_id.clone()
        } else {
            "unknown".into()
        };
    }
    Ok(command)
}

/// `/nix-deploy …` arguments for a deployment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatDeploy {
    pub hosts: Vec<String>,
    pub strategy: Option<String>,
    pub parallel: bool,
    pub sequential: bool,
    pub canary: Vec<String>,
    pub canary_soak: Option<std::time::Duration>,
    pub force: bool,
    pub batch_size: Option<String>,
    pub max_failures: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatRequest {
    Deploy(ChatDeploy),
    Status,
    Cancel { id: Option<i64> },
    Help,
}

const STRATEGIES: [&str; 6] = [
    "smart",
    "parallel",
    "rolling",
    "sequential",
    "canary",
    "blue-green",
];

fn valid_selector(word: &str) -> bool {
    crate::shell::is_valid_host_name(word.strip_prefix('@').unwrap_or(word))
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
    let mut deploy = ChatDeploy::default();
    let mut i = 0;
    while i < words.len() {
        let word = words[i];
        i += 1;
        let Some(flag) = word.strip_prefix("--") else {
            if !valid_selector(word) {
                return Err(SlackError::BadArgument(format!(
                    "`{word}` is not a host name or @tag"
                )));
            }
            deploy.hosts.push(word.to_string());
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
        match name {
            "strategy" => {
                let v = value("a strategy")?;
                if !STRATEGIES.contains(&v.as_str()) {
                    return Err(SlackError::BadArgument(format!(
                        "unknown strategy `{v}` ({})",
                        STRATEGIES.join(", ")
                    )));
                }
                deploy.strategy = Some(v);
            }
            "parallel" if inline.is_none() => deploy.parallel = true,
            "sequential" if inline.is_none() => deploy.sequential = true,
            "force" if inline.is_none() => deploy.force = true,
            "canary" => {
                let v = value("a host")?;
                if !crate::shell::is_valid_host_name(&v) {
                    return Err(SlackError::BadArgument(format!("`{v}` is not a host name")));
                }
                deploy.canary.push(v);
            }
            "canary-soak" => {
                let v = value("a duration")?;
                deploy.canary_soak = Some(
                    crate::duration::parse(&v)
                        .map_err(|e| SlackError::BadArgument(format!("--canary-soak: {e}")))?,
                );
            }
            "batch-size" => deploy.batch_size = Some(value("N or N%")?),
            "max-failures" => deploy.max_failures = Some(value("N or N%")?),
            other => {
                return Err(SlackError::BadArgument(format!(
                    "unknown option `--{other}`"
                )));
            }
        }
    }
    if deploy.parallel && deploy.sequential {
        return Err(SlackError::BadArgument(
            "--parallel and --sequential exclude each other".into(),
        ));
    }
    Ok(ChatRequest::Deploy(deploy))
}

/// Only post to `response_url`s under the configured prefixes.
pub fn is_allowed_response_url(url: &str, allowed_prefixes: &[String]) -> bool {
    !url.chars().any(char::is_whitespace)
        && allowed_prefixes
            .iter()
            .any(|p| !p.is_empty() && url.starts_with(p.as_str()))
}

fn seconds(v: &serde_json::Value) -> String {
    let secs = v.as_f64().unwrap_or(0.0);
    if secs < 60.0 {
        format!("{secs:.0}s")
    } else {
        format!("{}m {:02}s", secs as u64 / 60, secs as u64 % 60)
    }
}

/// The plan as a chat message (from `PlanReport` JSON).
pub fn plan_message(plan: &serde_json::Value) -> serde_json::Value {
    let mut text = format!(
        "*Deployment Plan*: {} to deploy, {} skipped\n_{}_\n",
        plan["to_deploy"].as_array().map(Vec::len).unwrap_or(0),
        plan["skipped"].as_array().map(Vec::len).unwrap_or(0),
        plan["strategy_reason"].as_str().unwrap_or("")
    );
    let hosts = plan["hosts"].as_array().cloned().unwrap_or_default();
    for (index, phase) in plan["phases"].as_array().into_iter().flatten().enumerate() {
        text.push_str(&format!(
            "*Phase {}* ({}):\n",
            index + 1,
            phase["note"].as_str().unwrap_or("")
        ));
        for name in phase["hosts"].as_array().into_iter().flatten() {
            let host = hosts.iter().find(|h| h["name"] == *name);
            let summary = host
                .and_then(|h| h["summary"]["compared"].as_bool().filter(|c| *c).map(|_| h))
                .map(|h| {
                    format!(
                        " (+{} -{} ~{} packages{})",
                        h["summary"]["added"].as_array().map(Vec::len).unwrap_or(0),
                        h["summary"]["removed"]
                            .as_array()
                            .map(Vec::len)
                            .unwrap_or(0),
                        h["summary"]["upgraded"]
                            .as_array()
                            .map(Vec::len)
                            .unwrap_or(0),
                        if h["summary"]["kernel_changed"] == true {
                            ", kernel"
                        } else {
                            ""
                        }
                    )
                })
                .unwrap_or_default();
            text.push_str(&format!(
                "  • {} - CHANGED{summary}{}\n",
                name.as_str().unwrap_or("?"),
                if host.is_some_and(|h| h["canary"] == true) {
                    " (canary)"
                } else {
                    ""
                }
            ));
        }
    }
    for host in hosts.iter().filter(|h| h["action"] != "deploy") {
        text.push_str(&format!(
            "  • {} - {} ({})\n",
            host["name"].as_str().unwrap_or("?"),
            host["state"].as_str().unwrap_or("").to_uppercase(),
            host["reason"].as_str().unwrap_or("")
        ));
    }
    text.push_str(&format!(
        "Estimated time: {} | Risk: {}",
        seconds(&plan["eta_seconds"]),
        plan["risk"].as_str().unwrap_or("?")
    ));
    serde_json::json!({ "response_type": "in_channel", "text": text })
}

/// The final summary as a chat message (from a deployment report's JSON).
pub fn summary_message(report: &serde_json::Value) -> serde_json::Value {
    let hosts = report["hosts"].as_array().cloned().unwrap_or_default();
    let count = |s: &str| hosts.iter().filter(|h| h["status"] == s).count();
    let icon = if report["status"] == "succeeded" {
        "✅"
    } else {
        "❌"
    };
    let mut text = format!(
        "{icon} *Deployment #{} {}* (strategy {})\nHosts deployed: {}/{} | skipped: {} | rolled back: {}\n",
        report["id"],
        report["status"].as_str().unwrap_or("?"),
        report["strategy"].as_str().unwrap_or("?"),
        count("deployed"),
        hosts.len(),
        count("skipped"),
        count("rolled-back")
    );
    for h in &hosts {
        let generations = match (
            h["from"]["generation"].as_u64(),
            h["to"]["generation"].as_u64(),
        ) {
            (from, Some(to)) if h["status"] == "deployed" => format!(
                " (generation {} → {to})",
                from.map(|f| f.to_string()).unwrap_or("-".into())
            ),
            _ => String::new(),
        };
        let note = h["error"]
            .as_str()
            .or(h["reason"].as_str())
            .and_then(|e| e.lines().next())
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        text.push_str(&format!(
            "  • {} {}{generations}{note}\n",
            h["name"].as_str().unwrap_or("?"),
            h["status"].as_str().unwrap_or("?")
        ));
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
        assert_eq!(
            parse_text("").unwrap(),
            ChatRequest::Deploy(ChatDeploy::default())
        );
        assert_eq!(
            parse_text("p620 razer --strategy=canary").unwrap(),
            ChatRequest::Deploy(ChatDeploy {
                hosts: vec!["p620".into(), "razer".into()],
                strategy: Some("canary".into()),
                ..ChatDeploy::default()
            })
        );
        assert_eq!(
            parse_text("@laptop --strategy rolling --batch-size=2 --force").unwrap(),
            ChatRequest::Deploy(ChatDeploy {
                hosts: vec!["@laptop".into()],
                strategy: Some("rolling".into()),
                batch_size: Some("2".into()),
                force: true,
                ..ChatDeploy::default()
            })
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
        for bad in [
            "--strategy=yolo",
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
        let report = serde_json::json!({
            "id": 4, "status": "succeeded", "strategy": "smart",
            "hosts": [
                { "name": "p620", "status": "deployed", "from": { "generation": 245 }, "to": { "generation": 246 } },
                { "name": "p510", "status": "skipped", "reason": "no changes", "from": {}, "to": {} }
            ]
        });
        let text = summary_message(&report)["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(text.contains("Deployment #4 succeeded"), "{text}");
        assert!(
            text.contains("p620 deployed (generation 245 → 246)"),
            "{text}"
        );
        assert!(text.contains("p510 skipped: no changes"), "{text}");
        let plan = serde_json::json!({
            "to_deploy": ["p620"], "skipped": ["p510"], "strategy_reason": "smart",
            "phases": [ { "hosts": ["p620"], "note": "parallel" } ],
            "hosts": [ { "name": "p620", "action": "deploy" },
                       { "name": "p510", "action": "skip", "state": "unchanged", "reason": "no changes" } ],
            "eta_seconds": 90.0, "risk": "LOW"
        });
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
