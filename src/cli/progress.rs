//! Live progress while a deployment runs, drawn from the engine's events (which
//! are already stored). On a terminal: a line per host with its step, elapsed
//! time and generation, plus an overall line. Otherwise (pipes, CI, `--json`):
//! plain timestamped lines on stderr.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc::UnboundedReceiver;

use super::output::{duration_ms, generation};
use crate::events::{Event, EventKind, HostStatus};

pub async fn render(mut events: UnboundedReceiver<Event>, fancy: bool) {
    if fancy {
        render_bars(&mut events).await
    } else {
        render_lines(&mut events).await
    }
}

fn status_line(status: HostStatus, from: Option<u32>, to: Option<u32>, ms: u64) -> String {
    let took = duration_ms(ms as i64);
    match status {
        HostStatus::Deployed => format!(
            "✅ DEPLOYED ({took}) generation {} → {}",
            generation(from),
            generation(to)
        ),
        HostStatus::Skipped => "⏭  SKIPPED (no changes)".into(),
        HostStatus::RolledBack => format!(
            "↩️  ROLLED BACK ({took}) to generation {}",
            generation(from)
        ),
        HostStatus::RollbackFailed => format!("❌ ROLLBACK FAILED ({took})"),
        HostStatus::Failed => format!("❌ FAILED ({took})"),
        HostStatus::Unreachable => "❌ UNREACHABLE".into(),
        HostStatus::Cancelled => "⏹  CANCELLED".into(),
        other => other.as_str().to_uppercase(),
    }
}

async fn render_lines(events: &mut UnboundedReceiver<Event>) {
    let start = Instant::now();
    while let Some(event) = events.recv().await {
        let host = event.host.as_deref().unwrap_or("deployment");
        let line = match &event.kind {
            EventKind::DeploymentStarted { hosts, .. } => {
                format!(
                    "deployment #{} started: {} host(s)",
                    event.deployment_id,
                    hosts.len()
                )
            }
            EventKind::HostProbed {
                state,
                probe,
                error,
            } => match error {
                Some(e) => format!("{host}: {} — {e}", state.as_str()),
                None => format!(
                    "{host}: {} (generation {})",
                    state.as_str(),
                    generation(probe.as_ref().and_then(|p| p.generation))
                ),
            },
            EventKind::HostPlanned { .. } => continue,
            EventKind::Planned {
                reason,
                phases,
                eta_seconds,
                risk,
                ..
            } => format!(
                "plan: {reason}; {} phase(s); ETA {}; risk {risk}",
                phases.len(),
                super::output::seconds(*eta_seconds)
            ),
            EventKind::StepStarted { step } => format!("{host}: {}", step.progress_word()),
            EventKind::StepFinished {
                step,
                ok,
                duration_ms: ms,
                message,
            } => {
                if *ok {
                    format!("{host}: {step} ok ({})", duration_ms(*ms as i64))
                } else {
                    format!(
                        "{host}: {step} FAILED ({}): {}",
                        duration_ms(*ms as i64),
                        message.as_deref().unwrap_or_default()
                    )
                }
            }
            EventKind::HostFinished {
                status,
                from,
                to,
                duration_ms: ms,
                ..
            } => format!(
                "{host}: {}",
                status_line(*status, from.generation, to.generation, *ms)
            ),
            EventKind::DeploymentFinished { status } => {
                format!("deployment #{} {status}", event.deployment_id)
            }
            EventKind::HealthChecked { phase, results } => format!(
                "{host}: health checks ({phase}): {}",
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
            EventKind::Log { message } => format!("{host}: {message}"),
        };
        eprintln!("[{:>7.1}s] {line}", start.elapsed().as_secs_f64());
    }
}

/// Steps a normal host goes through; the bar's length.
const PIPELINE_STEPS: u64 = 5;

async fn render_bars(events: &mut UnboundedReceiver<Event>) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix:>12.bold} [{bar:30.cyan/blue}] {percent:>3}% {wide_msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("█▓░");
    let overall = multi.add(ProgressBar::new_spinner());
    overall.set_style(
        ProgressStyle::with_template("{wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    struct HostBar {
        bar: ProgressBar,
        since: Instant,
        from: Option<u32>,
        step: Option<String>,
    }
    let mut bars: BTreeMap<String, HostBar> = BTreeMap::new();
    let mut total = 0usize;
    let mut finished = 0usize;
    let mut eta: Option<f64> = None;
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let add_bar = |bars: &mut BTreeMap<String, HostBar>, host: &str| {
        if !bars.contains_key(host) {
            let bar = multi.insert_before(&overall, ProgressBar::new(PIPELINE_STEPS));
            bar.set_style(style.clone());
            bar.set_prefix(host.to_string());
            bars.insert(
                host.to_string(),
                HostBar {
                    bar,
                    since: Instant::now(),
                    from: None,
                    step: None,
                },
            );
        }
    };
    let overall_line = |finished: usize, total: usize, eta: Option<f64>| {
        let elapsed = start.elapsed().as_secs_f64();
        let eta_text = eta
            .map(|e| format!(" | ETA: {}", super::output::seconds((e - elapsed).max(0.0))))
            .unwrap_or_default();
        format!(
            "Overall: {finished}/{total} complete | Elapsed: {}{eta_text}",
            super::output::seconds(elapsed)
        )
    };
    loop {
        let event = tokio::select! {
            event = events.recv() => match event { Some(e) => e, None => break },
            _ = ticker.tick() => {
                overall.set_message(overall_line(finished, total, eta));
                for host in bars.values() {
                    if let Some(step) = &host.step {
                        host.bar.set_message(format!(
                            "{step} ({}) generation {} → …",
                            duration_ms(host.since.elapsed().as_millis() as i64),
                            generation(host.from)
                        ));
                    }
                }
                continue;
            }
        };
        let Some(name) = event.host.clone() else {
            match &event.kind {
                EventKind::Planned { eta_seconds, .. } => {
                    // The plan's ETA counts from now, after probing.
                    eta = Some(start.elapsed().as_secs_f64() + eta_seconds);
                }
                EventKind::DeploymentStarted { hosts, .. } => {
                    total = hosts.len();
                    for h in hosts {
                        add_bar(&mut bars, h);
                        bars[h].bar.set_message("probing");
                    }
                }
                EventKind::Log { message } => multi.suspend(|| eprintln!("{message}")),
                _ => {}
            }
            continue;
        };
        add_bar(&mut bars, &name);
        let Some(host) = bars.get_mut(&name) else {
            continue;
        };
        match &event.kind {
            EventKind::HostProbed { state, probe, .. } => {
                host.from = probe.as_ref().and_then(|p| p.generation);
                host.bar.set_message(format!(
                    "{} (generation {})",
                    state.as_str(),
                    generation(host.from)
                ));
            }
            EventKind::HostPlanned { action, reason } => {
                if action == "deploy" {
                    host.bar.set_message("waiting");
                } else {
                    host.bar.set_message(format!(
                        "{action}: {}",
                        reason.as_deref().unwrap_or_default()
                    ));
                }
            }
            EventKind::StepStarted { step } => {
                host.step = Some(step.progress_word().to_uppercase());
            }
            EventKind::StepFinished { step, ok, .. } => {
                host.step = None;
                if *ok {
                    host.bar.inc(1);
                } else {
                    host.bar.set_message(format!("{step} failed"));
                }
            }
            EventKind::HostFinished {
                status,
                from,
                to,
                duration_ms: ms,
                ..
            } => {
                finished += 1;
                host.step = None;
                if *status == HostStatus::Deployed {
                    host.bar.set_position(PIPELINE_STEPS);
                }
                host.bar.abandon_with_message(status_line(
                    *status,
                    from.generation,
                    to.generation,
                    *ms,
                ));
            }
            EventKind::Log { message } => {
                let message = format!("{name}: {message}");
                multi.suspend(|| eprintln!("{message}"));
            }
            _ => {}
        }
    }
    overall.finish_with_message(overall_line(finished, total, None));
}
