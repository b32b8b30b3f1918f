//! Plain text for people, shared by the CLI (tables, progress, `show`), the
//! Markdown report and chat messages: one wording for every event, outcome
//! and value. Pure: callers decide where it goes.

use crate::events::{Event, EventKind, HostStatus};
use crate::goal::{Goal, RebootPolicy};
use crate::keys::KeyChanges;
use crate::run::{Deployment, HostRun, RunKind};

/// `/nix/store/<hash>-name` → `<hash:7>…-name`, for tables.
pub fn short_path(path: Option<&str>) -> String {
    match path {
        None => "-".into(),
        Some(p) => match p.strip_prefix("/nix/store/") {
            Some(rest) if rest.len() > 33 => format!("{}…-{}", &rest[..7], &rest[33..]),
            _ => p.to_string(),
        },
    }
}

/// `HOST: STEP: CAUSE`, said once: a cause that already starts with the
/// host (and the step) is not prefixed again, so errors that pass through
/// several layers read `web1: probe: cannot connect …`, never
/// `web1: probe: web1: cannot connect …`.
pub fn host_error(host: &str, step: &str, cause: &str) -> String {
    format!(
        "{host}: {step}: {}",
        after_prefix(cause, Some(host), Some(step))
    )
}

/// `text` without a leading `HOST: ` and then `STEP: `: what is left to say
/// where the host (and the step) are named already (a table's row, a
/// progress line, a report's section).
pub fn after_prefix<'a>(text: &'a str, host: Option<&str>, step: Option<&str>) -> &'a str {
    let strip = |text: &'a str, prefix: Option<&str>| match prefix {
        Some(prefix) => text
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix(": "))
            .unwrap_or(text),
        None => text,
    };
    strip(strip(text, host), step)
}

/// A generation number, or `-`.
pub fn generation(g: Option<u32>) -> String {
    g.map(|g| g.to_string()).unwrap_or_else(|| "-".into())
}

/// `1.5s`, `1m 23s`.
pub fn duration_ms(ms: i64) -> String {
    let secs = ms as f64 / 1000.0;
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = secs as u64;
        format!("{}m {:02}s", whole / 60, whole % 60)
    }
}

pub fn seconds(secs: f64) -> String {
    duration_ms((secs * 1000.0) as i64)
}

/// How long ago, roughly: `12s`, `5m`, `3h`, `2d` (never negative).
pub fn age(ms: i64) -> String {
    let secs = ms.max(0) / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// A host's drift kinds, each with how long it has lasted at `now`:
/// `manual-switch 3m, unhealthy 40s`.
pub fn drift(drift: &[crate::drift::Drift], now: i64) -> String {
    if drift.is_empty() {
        return "-".into();
    }
    drift
        .iter()
        .map(|d| format!("{} {}", d.kind, age(now - d.since)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Unix milliseconds as `2024-05-01 12:00:00Z`.
pub fn timestamp(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// What a waiting deployment waits for, in one line.
pub fn window_wait(wait: &crate::run::WindowWait) -> String {
    format!(
        "waiting for a maintenance window: {} ({}); next opening {}",
        wait.hosts.join(", "),
        wait.reason,
        wait.opens_at
            .map_or("none within 400 days".into(), timestamp)
    )
}

/// The icon of an outcome: each is two columns wide on a terminal and in
/// Unicode's width tables, so tables stay aligned.
pub fn icon(status: HostStatus) -> &'static str {
    match status {
        HostStatus::Deployed | HostStatus::Succeeded => "✅",
        HostStatus::Skipped => "⏩",
        HostStatus::RolledBack => "⏪",
        HostStatus::Failed
        | HostStatus::RollbackFailed
        | HostStatus::Unreachable
        | HostStatus::Unhealthy => "❌",
        HostStatus::Cancelled => "⛔",
        HostStatus::Interrupted => "❓",
        HostStatus::Pending | HostStatus::Running => "⏳",
    }
}

/// `✅ deployed`, `⏪ rolled back`: a table's result cell.
pub fn result_word(status: HostStatus) -> String {
    format!("{} {}", icon(status), status.as_str().replace('-', " "))
}

/// `1 → 2`, `1 → 2 → 1` (rolled back), `2 → 1` (rolled back on request),
/// or the generation it stayed on. Where it ended is what the host said
/// when its part ended, when it was read.
pub fn generations(run: &HostRun) -> String {
    let back = run
        .after
        .as_ref()
        .map_or(run.from.generation, |a| a.boot_generation);
    match run.status {
        HostStatus::Deployed => format!(
            "{} → {}",
            generation(run.from.generation),
            generation(run.to.generation)
        ),
        HostStatus::RolledBack if run.to.generation.is_none() || run.to.generation == back => {
            format!("{} → {}", generation(run.from.generation), generation(back))
        }
        HostStatus::RolledBack => format!(
            "{} → {} → {}",
            generation(run.from.generation),
            generation(run.to.generation),
            generation(back)
        ),
        _ => generation(back),
    }
}

/// What a way back did to a host's keys, in one line:
/// `keys: restored 2 (/run/keys/a, /run/keys/b); removed 1 created by this deployment (/run/keys/c)`;
/// `None` when it did nothing to them and said nothing.
pub fn key_changes(changes: &KeyChanges) -> Option<String> {
    let list = |paths: &[String]| format!("{} ({})", paths.len(), paths.join(", "));
    let mut parts = Vec::new();
    if !changes.restored.is_empty() {
        parts.push(format!("restored {}", list(&changes.restored)));
    }
    if !changes.removed.is_empty() {
        parts.push(format!(
            "removed {} created by this deployment ({})",
            changes.removed.len(),
            changes.removed.join(", ")
        ));
    }
    if !changes.uploaded_again.is_empty() {
        parts.push(format!(
            "uploaded again after the reboot with this deployment's contents {} (what they held before was lost with /run)",
            list(&changes.uploaded_again)
        ));
    }
    if !changes.failed.is_empty() {
        parts.push(format!(
            "NOT known to be as before the deployment: {}",
            changes.failed.join("; ")
        ));
    }
    if let Some(left) = &changes.left {
        parts.push(left.clone());
    }
    (!parts.is_empty()).then(|| format!("keys: {}", parts.join("; ")))
}

/// How a host ended, as the live display says it. `back`: the generation
/// it boots when its part ended (what a rollback went back to).
pub fn host_outcome(
    status: HostStatus,
    from: Option<u32>,
    to: Option<u32>,
    back: Option<u32>,
    ms: u64,
) -> String {
    let took = duration_ms(ms as i64);
    let icon = icon(status);
    match status {
        HostStatus::Deployed => format!(
            "{icon} DEPLOYED ({took}) generation {} → {}",
            generation(from),
            generation(to)
        ),
        HostStatus::Skipped => format!("{icon} SKIPPED (no changes)"),
        HostStatus::RolledBack => format!(
            "{icon} ROLLED BACK ({took}) to generation {}",
            generation(back)
        ),
        HostStatus::RollbackFailed => format!("{icon} ROLLBACK FAILED ({took})"),
        HostStatus::Failed => format!("{icon} FAILED ({took})"),
        HostStatus::Succeeded => format!("{icon} SUCCEEDED ({took})"),
        other => format!("{icon} {}", other.as_str().to_uppercase()),
    }
}

/// `2 deployed, 1 skipped, 1 failed (1 of them rolled back), 1 rolled back`:
/// what happened to the hosts of one deployment. A host that failed is
/// counted as failed whether or not it was rolled back; a host that was
/// deployed fine and rolled back because others failed is only rolled back.
pub fn hosts_summary(runs: &[HostRun]) -> String {
    let count = |s: HostStatus| runs.iter().filter(|h| h.status == s).count();
    let failed_back = runs
        .iter()
        .filter(|h| h.status == HostStatus::RolledBack && h.failed_itself())
        .count();
    let failed = runs
        .iter()
        .filter(|h| h.status.is_failure() && h.status != HostStatus::RolledBack)
        .count()
        + failed_back;
    let rolled_back = count(HostStatus::RolledBack) - failed_back;
    let mut parts = vec![
        format!("{} deployed", count(HostStatus::Deployed)),
        format!("{} skipped", count(HostStatus::Skipped)),
    ];
    parts.push(match failed_back {
        0 => format!("{failed} failed"),
        n => format!("{failed} failed ({n} of them rolled back)"),
    });
    if rolled_back > 0 {
        parts.push(format!("{rolled_back} rolled back"));
    }
    parts.join(", ")
}

/// `5 succeeded, 1 failed, 1 unreachable`: how the hosts of an `exec` or
/// `upload-keys` run ended.
pub fn exec_summary(runs: &[HostRun]) -> String {
    let count = |s: HostStatus| runs.iter().filter(|h| h.status == s).count();
    let mut parts = vec![format!("{} succeeded", count(HostStatus::Succeeded))];
    let failed = count(HostStatus::Failed);
    if failed > 0 {
        parts.push(format!("{failed} failed"));
    }
    let unreachable = count(HostStatus::Unreachable);
    if unreachable > 0 {
        parts.push(format!("{unreachable} unreachable"));
    }
    let other = runs.len() - count(HostStatus::Succeeded) - failed - unreachable;
    if other > 0 {
        parts.push(format!("{other} not run"));
    }
    parts.join(", ")
}

/// What a run's hosts did, in the words of its kind.
pub fn run_summary(deployment: &Deployment) -> String {
    match deployment.kind {
        RunKind::Deploy => hosts_summary(&deployment.hosts),
        RunKind::Exec | RunKind::UploadKeys => exec_summary(&deployment.hosts),
    }
}

/// The history's STRATEGY column: the strategy, the goal and reboots when
/// they are not the defaults, or the command of an `exec`.
pub fn run_label(deployment: &Deployment) -> String {
    match deployment.kind {
        RunKind::Exec => match &deployment.exec {
            Some(spec) => {
                let mut text = format!("exec: {}", spec.display());
                if text.chars().count() > 40 {
                    text = text.chars().take(39).collect::<String>() + "…";
                }
                text
            }
            None => "exec".into(),
        },
        RunKind::UploadKeys => "upload-keys".into(),
        RunKind::Deploy => {
            let options = &deployment.options;
            let mut text = deployment.strategy.clone();
            if options.goal != Goal::Switch {
                text.push_str(&format!(" ({})", options.goal));
            }
            if options.reboot != RebootPolicy::Never {
                text.push_str(&format!(" +reboot={}", options.reboot.as_str()));
            }
            text
        }
    }
}

/// The first line of a longer text.
pub fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// What an event says, in one line (without its host or time): the one
/// wording used by the live display, `show` and the daemon's streams.
pub fn event_text(event: &Event) -> String {
    match &event.kind {
        EventKind::DeploymentStarted { hosts, strategy }
            if matches!(strategy.as_str(), "exec" | "upload-keys") =>
        {
            format!(
                "{strategy} #{} started: {} host(s)",
                event.deployment_id,
                hosts.len()
            )
        }
        EventKind::DeploymentStarted { hosts, strategy } => format!(
            "deployment #{} started: {} host(s), strategy {strategy}",
            event.deployment_id,
            hosts.len()
        ),
        EventKind::HostProbed {
            state,
            probe,
            error,
        } => match error {
            Some(e) => format!(
                "{} — {}",
                state.as_str(),
                after_prefix(e, event.host.as_deref(), Some("probe"))
            ),
            None => format!(
                "{} (generation {})",
                state.as_str(),
                generation(probe.as_ref().and_then(|p| p.generation))
            ),
        },
        EventKind::Planned {
            reason,
            phases,
            eta_seconds,
            risk,
            ..
        } => format!(
            "plan: {reason}; {} phase(s); ETA {}; risk {risk}",
            phases.len(),
            seconds(*eta_seconds)
        ),
        EventKind::HostPlanned { action, reason } => match reason {
            Some(r) => format!("plan: {action} ({r})"),
            None => format!("plan: {action}"),
        },
        EventKind::StepStarted { step } => step.progress_word().to_string(),
        EventKind::StepFinished {
            step,
            ok,
            duration_ms: ms,
            message,
        } => {
            if *ok {
                format!("{step} ok ({})", duration_ms(*ms as i64))
            } else {
                format!(
                    "{step} FAILED ({}): {}",
                    duration_ms(*ms as i64),
                    after_prefix(
                        message.as_deref().unwrap_or_default(),
                        event.host.as_deref(),
                        Some(step.as_str())
                    )
                )
            }
        }
        EventKind::HostFinished {
            status,
            from,
            to,
            duration_ms: ms,
            after,
            ..
        } => host_outcome(
            *status,
            from.generation,
            to.generation,
            after
                .as_ref()
                .map_or(from.generation, |a| a.boot_generation),
            *ms,
        ),
        EventKind::DeploymentFinished { status } => {
            format!("deployment #{} {status}", event.deployment_id)
        }
        EventKind::HealthChecked { phase, results } => format!(
            "health checks ({phase}): {}",
            results
                .iter()
                .map(|r| format!(
                    "{} {} after {} attempt(s)",
                    r.check,
                    if r.ok { "ok" } else { "FAILED" },
                    r.attempts
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        EventKind::Log { message } => message.clone(),
        EventKind::WaitingForWindow {
            hosts,
            reason,
            until,
        } => format!(
            "waiting for a maintenance window: {} ({reason}); {}",
            hosts.join(", "),
            match until {
                Some(t) => format!("may start at {}", timestamp(*t)),
                None => "no window opens within 400 days".into(),
            }
        ),
        EventKind::GateOpened {
            gate,
            gate_kind,
            title,
            hosts,
            missing,
            deadline,
        } => format!(
            "{} (gate {gate}, {title}): {} wait{}; needs {missing}; `nix-deploy approve {}`{}",
            match gate_kind {
                crate::approval::GateKind::Approval => "awaiting approval",
                crate::approval::GateKind::Pause => "paused",
            },
            hosts.join(", "),
            if hosts.len() == 1 { "s" } else { "" },
            event.deployment_id,
            deadline
                .map(|d| format!(" before {}", timestamp(d)))
                .unwrap_or_default()
        ),
        EventKind::GateDecided {
            gate,
            state,
            by,
            reason,
        } => format!(
            "gate {gate} {}{}{}",
            state.as_str(),
            by.as_deref()
                .map(|b| format!(" by {b}"))
                .unwrap_or_default(),
            reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_happened_to_the_keys_is_said_in_one_line() {
        assert_eq!(key_changes(&KeyChanges::default()), None);
        let changes = KeyChanges {
            restored: vec!["/run/keys/a".into(), "/run/keys/b".into()],
            removed: vec!["/run/keys/c".into()],
            failed: vec!["/srv/d: mv: denied".into()],
            ..KeyChanges::default()
        };
        assert_eq!(
            key_changes(&changes).unwrap(),
            "keys: restored 2 (/run/keys/a, /run/keys/b); removed 1 created by this deployment (/run/keys/c); NOT known to be as before the deployment: /srv/d: mv: denied"
        );
        let left = KeyChanges {
            left: Some("left as they are".into()),
            ..KeyChanges::default()
        };
        assert_eq!(key_changes(&left).unwrap(), "keys: left as they are");
    }

    #[test]
    fn host_and_step_are_said_once() {
        assert_eq!(
            host_error(
                "web1",
                "probe",
                "web1: cannot connect over SSH to 10.0.0.1: refused"
            ),
            "web1: probe: cannot connect over SSH to 10.0.0.1: refused"
        );
        assert_eq!(
            host_error("web1", "probe", "web1: probe: `sh` timed out after 5s"),
            "web1: probe: `sh` timed out after 5s"
        );
        assert_eq!(
            host_error("web1", "rollback", "connection refused"),
            "web1: rollback: connection refused"
        );
        // Another host's name in the cause is kept.
        assert_eq!(
            host_error("web1", "probe", "web10: refused"),
            "web1: probe: web10: refused"
        );
        assert_eq!(
            after_prefix("web1: activate: exit 4", Some("web1"), Some("activate")),
            "exit 4"
        );
        assert_eq!(
            after_prefix("web1: exit 4", Some("web1"), Some("activate")),
            "exit 4"
        );
        assert_eq!(after_prefix("exit 4", Some("web1"), None), "exit 4");
        assert_eq!(after_prefix("web10: x", Some("web1"), None), "web10: x");
    }
    use crate::events::{Step, SystemRef};

    #[test]
    fn shortens_store_paths_and_durations() {
        assert_eq!(
            short_path(Some(
                "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system-p620"
            )),
            "q4zfsrs…-nixos-system-p620"
        );
        assert_eq!(short_path(None), "-");
        assert_eq!(duration_ms(1500), "1.5s");
        assert_eq!(duration_ms(83_000), "1m 23s");
        assert_eq!(timestamp(0), "1970-01-01 00:00:00Z");
    }

    #[test]
    fn events_read_as_one_line() {
        let event = |kind| Event {
            id: 1,
            deployment_id: 7,
            at: 0,
            host: Some("web1".into()),
            kind,
        };
        assert_eq!(
            event_text(&event(EventKind::StepFinished {
                step: Step::Copy,
                ok: true,
                duration_ms: 1200,
                message: None
            })),
            "copy ok (1.2s)"
        );
        assert_eq!(
            event_text(&event(EventKind::HostFinished {
                status: HostStatus::Deployed,
                from: SystemRef {
                    path: None,
                    generation: Some(1)
                },
                to: SystemRef {
                    path: None,
                    generation: Some(2)
                },
                duration_ms: 1500,
                error: None,
                after: None,
            })),
            "✅ DEPLOYED (1.5s) generation 1 → 2"
        );
        assert_eq!(result_word(HostStatus::RolledBack), "⏪ rolled back");
    }

    #[test]
    fn ages_and_drift() {
        use crate::drift::{Drift, DriftKind};
        assert_eq!(age(-5), "0s");
        assert_eq!(age(59_999), "59s");
        assert_eq!(age(3_600_000 * 5), "5h");
        assert_eq!(age(86_400_000 * 3), "3d");
        let kinds = [
            Drift {
                kind: DriftKind::ManualSwitch,
                since: 0,
            },
            Drift {
                kind: DriftKind::Unhealthy,
                since: 140_000,
            },
        ];
        assert_eq!(drift(&kinds, 180_000), "manual-switch 3m, unhealthy 40s");
        assert_eq!(drift(&[], 0), "-");
    }

    #[test]
    fn a_failed_host_is_counted_failed_whether_or_not_it_went_back() {
        use crate::run::StepTiming;
        let run = |status, failed_step: Option<Step>| {
            let mut run = HostRun::new(1, "h");
            run.status = status;
            run.steps = [Step::Activate, Step::Validate, Step::Rollback]
                .into_iter()
                .map(|step| StepTiming {
                    step,
                    started_at: 0,
                    finished_at: Some(1),
                    ok: Some(Some(step) != failed_step),
                })
                .collect();
            run
        };
        let runs = [
            run(HostStatus::Deployed, None),
            run(HostStatus::RolledBack, Some(Step::Validate)),
            run(HostStatus::RolledBack, None),
            run(HostStatus::Failed, Some(Step::Activate)),
        ];
        assert_eq!(
            hosts_summary(&runs),
            "1 deployed, 0 skipped, 2 failed (1 of them rolled back), 1 rolled back"
        );
        let mut back = HostRun::new(1, "h");
        back.status = HostStatus::RolledBack;
        back.from.generation = Some(2);
        back.to.generation = Some(1);
        back.after = Some(crate::remote::HostSystems {
            running: None,
            boot_generation: Some(1),
            boot: None,
        });
        assert_eq!(generations(&back), "2 → 1");
    }
}
