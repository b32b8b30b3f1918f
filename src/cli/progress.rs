//! Live progress while a deployment runs, drawn from the engine's events (which
//! are already stored). On a terminal: a line per host with its step, elapsed
//! time and generation, plus an overall line. Otherwise (pipes, CI, `--json`):
//! plain timestamped lines on stderr.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc::UnboundedReceiver;

use nix_deploy_core::events::{Event, EventKind, HostStatus};
use nix_deploy_core::render::{duration_ms, event_text, generation, host_outcome, seconds};

use super::output::escape;

pub async fn render(mut events: UnboundedReceiver<Event>, fancy: bool) {
    if fancy {
        render_bars(&mut events).await
    } else {
        render_lines(&mut events).await
    }
}

async fn render_lines(events: &mut UnboundedReceiver<Event>) {
    let start = Instant::now();
    while let Some(event) = events.recv().await {
        if matches!(event.kind, EventKind::HostPlanned { .. }) {
            continue;
        }
        let text = event_text(&event);
        let line = match &event.host {
            Some(host) => format!("{host}: {text}"),
            None if matches!(event.kind, EventKind::Log { .. }) => format!("deployment: {text}"),
            None => text,
        };
        eprintln!(
            "[{:>7.1}s] {}",
            start.elapsed().as_secs_f64(),
            escape(&line)
        );
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
    // Steps of a host: the pipeline's, or one for an exec or upload-keys.
    let mut steps = PIPELINE_STEPS;
    let mut total = 0usize;
    let mut finished = 0usize;
    let mut eta: Option<f64> = None;
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let add_bar = |bars: &mut BTreeMap<String, HostBar>, host: &str, steps: u64| {
        if !bars.contains_key(host) {
            let bar = multi.insert_before(&overall, ProgressBar::new(steps));
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
            .map(|e| format!(" | ETA: {}", seconds((e - elapsed).max(0.0))))
            .unwrap_or_default();
        format!(
            "Overall: {finished}/{total} complete | Elapsed: {}{eta_text}",
            seconds(elapsed)
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
                EventKind::DeploymentStarted { hosts, strategy } => {
                    total = hosts.len();
                    let run = matches!(strategy.as_str(), "exec" | "upload-keys");
                    if run {
                        steps = 1;
                    }
                    for h in hosts {
                        add_bar(&mut bars, h, steps);
                        bars[h]
                            .bar
                            .set_message(if run { "waiting" } else { "probing" });
                    }
                }
                EventKind::Log { message } => multi.suspend(|| eprintln!("{}", escape(message))),
                _ => {}
            }
            continue;
        };
        add_bar(&mut bars, &name, steps);
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
                        escape(reason.as_deref().unwrap_or_default())
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
                after,
                ..
            } => {
                finished += 1;
                host.step = None;
                if matches!(status, HostStatus::Deployed | HostStatus::Succeeded) {
                    host.bar.set_position(steps);
                }
                host.bar.abandon_with_message(host_outcome(
                    *status,
                    from.generation,
                    to.generation,
                    after
                        .as_ref()
                        .map_or(from.generation, |a| a.boot_generation),
                    *ms,
                ));
            }
            EventKind::Log { message } => {
                let message = format!("{name}: {}", escape(message));
                multi.suspend(|| eprintln!("{message}"));
            }
            _ => {}
        }
    }
    overall.finish_with_message(overall_line(finished, total, None));
}
