//! What the CLI prints: one JSON document per command with `--json`, else
//! tables (comfy-table, so wide characters line up) and the plan shaped like
//! the seed's. Texts come from the core's `render`; nothing here decides
//! anything.

use std::borrow::Cow;

use comfy_table::{Table, presets};
use serde::Serialize;

use nix_deploy_core::events::HostStatus;
use nix_deploy_core::goal::{Goal, RebootPolicy};
use nix_deploy_core::plan::{Action, EstimateSource};
use nix_deploy_core::render::{
    self, duration_ms, event_text, first_line, generation, generations, result_word, seconds,
    short_path, timestamp,
};
use nix_deploy_core::reports::{
    BuildReport, CancelAnswer, DeploymentList, HostBuild, HostHealth, PlanReport, StatusReport,
};
use nix_deploy_core::run::{Deployment, HostRun, RunKind};
use nix_deploy_core::summary::ChangeSummary;

use super::Cli;

/// Text as it may reach a terminal: control characters (other than newline
/// and tab) and bidirectional overrides are shown escaped (`\u{1b}`,
/// `\r`), never interpreted, so a host's output cannot move the cursor,
/// retitle the window, rewrite earlier lines or reorder what it shows. The
/// one escaping of the CLI's tables, reports, progress and errors; `--json`
/// keeps everything verbatim.
pub(crate) fn escape(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `println!` for people: the line goes through [`escape`].
macro_rules! say {
    () => {
        println!()
    };
    ($($arg:tt)*) => {
        println!("{}", $crate::cli::output::escape(&format!($($arg)*)))
    };
}

/// The document as JSON with `--json`, else as `print` shows it.
pub fn show<T: Serialize>(cli: &Cli, value: &T, print: fn(&T)) -> anyhow::Result<()> {
    if cli.json {
        // Verbatim: JSON escapes control characters itself.
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print(value);
    }
    Ok(())
}

/// Rows as left-aligned columns, two spaces apart, no borders.
pub(super) fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut table = Table::new();
    table
        .load_style(presets::NOTHING)
        .set_header(header.to_vec());
    for row in rows {
        table.add_row(row.iter().map(|cell| escape(cell).into_owned()));
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    for line in table.lines() {
        say!("{}", line.trim_end());
    }
}

fn summary_text(summary: Option<&ChangeSummary>) -> String {
    summary
        .map(|s| format!(": {}", s.one_line()))
        .unwrap_or_default()
}

/// The plan, shaped like the seed's: phases, states, summaries, ETA, risk.
pub fn print_plan(report: &PlanReport) {
    let plan = &report.plan;
    say!(
        "Deployment Plan: {} host(s) selected of {} ({} to deploy, {} skipped, {} unreachable)",
        plan.hosts.len(),
        report.fleet_size,
        report.to_deploy.len(),
        report.skipped.len(),
        report.unreachable.len()
    );
    say!("Flake: {}", report.flake);
    say!("Evaluation: {}", report.evaluation.describe());
    say!("Strategy: {}", plan.strategy_reason);
    say!();
    for phase in &plan.phases {
        say!("Phase {} ({}):", phase.index + 1, phase.note);
        for name in &phase.hosts {
            let Some(h) = plan.get(name) else { continue };
            let mut line = format!(
                "  - {} ({}) - {}{}",
                h.name,
                h.role,
                if h.changed {
                    "CHANGED"
                } else {
                    "UNCHANGED (forced)"
                },
                summary_text(h.summary.as_ref())
            );
            line.push_str(&format!(
                " | generation {} | est. {}{} | risk {}",
                generation(h.current.generation),
                seconds(h.estimate_seconds),
                match h.estimate_source {
                    EstimateSource::Host => "",
                    EstimateSource::Fleet => " (fleet median)",
                    EstimateSource::Default => " (no history)",
                },
                h.risk.as_str()
            ));
            if h.canary {
                line.push_str(" | CANARY");
            }
            if report.reboot_required.contains(&h.name) {
                line.push_str(" | REBOOT REQUIRED");
            }
            if report.pending_reboot.contains(&h.name) {
                line.push_str(" | PENDING REBOOT");
            }
            if let Some(batch) = h.batch {
                line.push_str(&format!(" | batch {batch}"));
            }
            if !h.depends_on.is_empty() {
                line.push_str(&format!(" | depends on {}", h.depends_on.join(", ")));
            }
            say!("{line}");
        }
    }
    let skipped: Vec<_> = plan
        .hosts
        .iter()
        .filter(|h| h.action == Action::Skip)
        .collect();
    if !skipped.is_empty() {
        say!("Skipped:");
        for h in skipped {
            say!(
                "  - {} ({}) - {} ({}) | generation {}{}",
                h.name,
                h.role,
                h.state.as_str(),
                h.reason.as_deref().unwrap_or("skip"),
                generation(h.current.generation),
                if report.pending_reboot.contains(&h.name) {
                    " | PENDING REBOOT"
                } else {
                    ""
                }
            );
        }
    }
    let unreachable: Vec<_> = plan
        .hosts
        .iter()
        .filter(|h| h.action == Action::Unreachable)
        .collect();
    if !unreachable.is_empty() {
        say!("Unreachable:");
        for h in unreachable {
            say!(
                "  - {}: {}",
                h.name,
                render::after_prefix(
                    h.error.as_deref().unwrap_or("unreachable"),
                    Some(&h.name),
                    Some("probe")
                )
            );
        }
    }
    if !report.evaluation.failed.is_empty() {
        say!("Could not be evaluated (not planned):");
        for failure in &report.evaluation.failed {
            let mut lines = failure.error.lines();
            say!("  - {}: {}", failure.host, lines.next().unwrap_or_default());
            for line in lines {
                say!("      {line}");
            }
        }
    }
    if !report.pending_reboot.is_empty() {
        say!(
            "Pending reboot (boot into another system than they run): {}",
            report.pending_reboot.join(", ")
        );
    }
    if !report.reboot_required.is_empty() {
        say!(
            "Reboot required (kernel or initrd changed; `deploy --reboot=auto` reboots these): {}",
            report.reboot_required.join(", ")
        );
    }
    for warning in &plan.warnings {
        say!("Warning: {warning}");
    }
    say!();
    if report.to_deploy.is_empty() {
        if report.unreachable.is_empty() {
            say!("Nothing to deploy: every host runs its evaluated system.");
        } else {
            say!(
                "Nothing to deploy among the hosts that answered; {} could not be reached: {}.",
                report.unreachable.len(),
                report.unreachable.join(", ")
            );
        }
        return;
    }
    say!("Recommendation: deploy {}", report.to_deploy.join(", "));
    say!(
        "Estimated time: {} (parallel limit {})",
        seconds(plan.eta_seconds),
        plan.parallel_limit
    );
    say!("Risk level: {}", plan.risk.as_str());
    for reason in &plan.risk_reasons {
        say!("  - {reason}");
    }
    say!("Rollback strategy: {}", plan.rollback_strategy);
}

/// How a run ended: a deployment's report, or an exec's summary.
pub fn print_report(deployment: &Deployment) {
    match deployment.kind {
        RunKind::Deploy => print_deployment_report(deployment),
        RunKind::Exec | RunKind::UploadKeys => print_exec_report(deployment),
    }
}

/// Why a run's output is not shown (the daemon left it out).
const WITHHELD: &str =
    "what commands print is shown only to tokens that may run them (scope admin)";

/// One command on many hosts: one row per host (result, exit code,
/// duration, last line of output), then each failure's output tails.
fn print_exec_report(run: &Deployment) {
    say!();
    match (&run.kind, &run.exec) {
        (RunKind::Exec, Some(spec)) => say!(
            "exec #{} {}: `{}` on {} host(s)",
            run.id,
            run.status,
            spec.display(),
            run.hosts.len()
        ),
        _ => say!(
            "{} #{} {} on {} host(s)",
            run.kind.as_str(),
            run.id,
            run.status,
            run.hosts.len()
        ),
    }
    let rows = run
        .hosts
        .iter()
        .map(|h| {
            let output = h.output.as_ref();
            let note = match h.status {
                _ if output.is_some_and(|o| o.withheld) => "(output withheld)".to_string(),
                HostStatus::Succeeded => output.map(|o| o.last_line()).unwrap_or("").to_string(),
                HostStatus::Skipped | HostStatus::Cancelled => h.reason.clone().unwrap_or_default(),
                // A failure's last word is usually on stderr.
                _ => output
                    .and_then(|o| o.stderr.lines().rev().find(|l| !l.trim().is_empty()))
                    .or(output.map(|o| o.last_line()).filter(|l| !l.is_empty()))
                    .or(h.error.as_deref().map(first_line))
                    .unwrap_or("")
                    .to_string(),
            };
            vec![
                h.host.clone(),
                result_word(h.status),
                output
                    .and_then(|o| o.exit_code)
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                h.duration_ms()
                    .map(duration_ms)
                    .unwrap_or_else(|| "-".into()),
                note,
            ]
        })
        .collect();
    table(&["HOST", "RESULT", "EXIT", "DURATION", "OUTPUT"], rows);
    if run
        .hosts
        .iter()
        .any(|h| h.output.as_ref().is_some_and(|o| o.withheld))
    {
        say!("Output withheld: {WITHHELD}.");
    }
    for h in run.hosts.iter().filter(|h| h.status.is_failure()) {
        say!();
        say!("── {} ({}) ──", h.host, h.status);
        if let Some(error) = &h.error {
            say!("{error}");
        }
        if let Some(output) = h.output.as_ref().filter(|o| !o.withheld) {
            for (name, text) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
                if !text.trim().is_empty() {
                    say!("{name}:");
                    for line in text.lines() {
                        say!("  {line}");
                    }
                }
            }
        }
    }
    say!();
    say!(
        "Total time: {} | {}",
        run.duration_ms()
            .map(duration_ms)
            .unwrap_or_else(|| "-".into()),
        render::exec_summary(&run.hosts)
    );
}

/// How a deployment ended: one row per host, then each failure in full.
fn print_deployment_report(deployment: &Deployment) {
    say!();
    say!(
        "Deployment #{} {} (strategy {}{})",
        deployment.id,
        deployment.status,
        deployment.strategy,
        match (deployment.options.goal, deployment.options.reboot) {
            (Goal::Switch, RebootPolicy::Never) => String::new(),
            (goal, RebootPolicy::Never) => format!(", goal {goal}"),
            (goal, reboot) => format!(", goal {goal}, reboot {}", reboot.as_str()),
        }
    );
    if let Some(error) = &deployment.error {
        say!("Stopped: {error}");
    }
    let rows = deployment
        .hosts
        .iter()
        .map(|run| {
            let note = match run.status {
                HostStatus::Skipped | HostStatus::Cancelled => {
                    run.reason.clone().unwrap_or_default()
                }
                HostStatus::Deployed | HostStatus::Succeeded => goal_note(run),
                _ => run
                    .error
                    .as_deref()
                    .map(|e| first_line(render::after_prefix(e, Some(&run.host), None)))
                    .unwrap_or_default()
                    .to_string(),
            };
            vec![
                run.host.clone(),
                result_word(run.status),
                generations(run),
                match run.status {
                    HostStatus::Skipped => "-".into(),
                    _ => run
                        .duration_ms()
                        .map(duration_ms)
                        .unwrap_or_else(|| "-".into()),
                },
                note,
            ]
        })
        .collect();
    table(&["HOST", "RESULT", "GENERATION", "DURATION", "NOTE"], rows);
    let failed: Vec<&HostRun> = deployment
        .hosts
        .iter()
        .filter(|h| h.status.is_failure())
        .collect();
    for run in &failed {
        say!();
        say!("── {} ({}) ──", run.host, run.status);
        say!("{}", run.error.as_deref().unwrap_or("no error recorded"));
    }
    say!();
    say!(
        "Total time: {} | {} of {} host(s)",
        deployment
            .duration_ms()
            .map(duration_ms)
            .unwrap_or_else(|| "-".into()),
        nix_deploy_core::render::hosts_summary(&deployment.hosts),
        deployment.hosts.len(),
    );
}

/// What a deployed host's goal left it as.
fn goal_note(run: &HostRun) -> String {
    let rebooted = run
        .reboot
        .as_ref()
        .filter(|r| r.boot_id_after.is_some())
        .map(|_| "rebooted")
        .unwrap_or_default();
    match run.goal {
        Some(Goal::Boot) if run.reboot.is_none() => "boot default set: pending reboot".into(),
        Some(Goal::Test) => "test: until the next reboot".into(),
        Some(Goal::Push) => "pushed: the closure is on the host, not activated".into(),
        Some(Goal::DryActivate) => {
            let would = run.output.as_ref().map(|o| {
                let text = format!("{}\n{}", o.stdout, o.stderr);
                text.lines()
                    .filter(|l| l.trim_start().starts_with("would "))
                    .count()
            });
            match would {
                Some(n) if n > 0 => format!("dry-activate: {n} change(s), see `show`"),
                _ => "dry-activate: nothing would change".into(),
            }
        }
        _ => rebooted.to_string(),
    }
}

pub fn print_status(status: &StatusReport) {
    if let Some(fleet) = &status.fleet
        && !fleet.hosts.is_empty()
    {
        super::fleet::print_fleet(status, fleet);
        return;
    }
    if status.hosts.is_empty() {
        say!("No hosts known yet: run `nix-deploy plan` or `nix-deploy deploy` first.");
        return;
    }
    let rows = status
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                short_path(h.current_path.as_deref()),
                generation(h.generation),
                h.last_status.clone().unwrap_or_else(|| "-".into()),
                h.last_deployment_id
                    .map(|id| format!("#{id}"))
                    .unwrap_or_else(|| "-".into()),
                h.last_finished_at
                    .map(timestamp)
                    .unwrap_or_else(|| "-".into()),
                match (&h.probe_error, h.probed_at) {
                    (Some(_), _) => "no (last probe failed)".into(),
                    (None, Some(_)) => "yes".into(),
                    (None, None) => "-".into(),
                },
                if h.pending_reboot {
                    format!("pending reboot → {}", short_path(h.boot_path.as_deref()))
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    table(
        &[
            "HOST",
            "SYSTEM",
            "GENERATION",
            "LAST RESULT",
            "DEPLOYMENT",
            "WHEN",
            "REACHABLE",
            "BOOT",
        ],
        rows,
    );
}

pub fn print_history(list: &DeploymentList) {
    if list.deployments.is_empty() {
        say!("No deployments recorded yet.");
        return;
    }
    let rows = list
        .deployments
        .iter()
        .map(|d| {
            vec![
                format!("#{}", d.id),
                timestamp(d.created_at),
                d.status.to_string(),
                render::run_label(d),
                render::run_summary(d),
                d.duration_ms()
                    .filter(|_| d.time.finished_at.is_some())
                    .map(duration_ms)
                    .unwrap_or_else(|| "-".into()),
                format!("{} ({})", d.requested_by, d.trigger),
            ]
        })
        .collect();
    table(
        &[
            "ID", "STARTED", "STATUS", "STRATEGY", "HOSTS", "DURATION", "BY",
        ],
        rows,
    );
}

/// One deployment: its events on a time line, then the report.
pub fn print_deployment(d: &Deployment) {
    let what = match d.kind {
        RunKind::Deploy => "Deployment".to_string(),
        RunKind::Exec => format!(
            "exec `{}`,",
            d.exec.as_ref().map(|e| e.display()).unwrap_or_default()
        ),
        RunKind::UploadKeys => "upload-keys".to_string(),
    };
    say!(
        "{what} #{} {} ({} by {}, {})",
        d.id,
        d.status,
        d.trigger,
        d.requested_by,
        timestamp(d.created_at)
    );
    say!(
        "Flake: {}{}",
        d.flake,
        d.flake_rev
            .as_deref()
            .map(|r| format!(" @ {r}"))
            .unwrap_or_default()
    );
    if let Some(error) = &d.error {
        say!("Error: {error}");
    }
    if let Some(promotion) = d.pinned.as_ref().and_then(|p| p.promotion.as_ref()) {
        println!(
            "Promoted from {} to {}: {}",
            promotion.from.join(", "),
            promotion.to.join(", "),
            promotion.describe()
        );
    }
    if let Some(waiting) = &d.waiting {
        println!("Now {}", nix_deploy_core::render::window_wait(waiting));
    }
    for gate in &d.gates {
        super::ops::print_gate(gate);
        for approval in &gate.approvals {
            say!("  {} saw:", approval.by);
            for line in approval.seen.lines() {
                say!("    {line}");
            }
        }
    }
    say!();
    for event in d.events.iter().flatten() {
        let offset = duration_ms(event.at - d.created_at);
        let host = event.host.as_deref().unwrap_or("-");
        say!(
            "[{offset:>7}] {host:<12} {}",
            first_line(&event_text(event))
        );
    }
    print_report(d);
}

/// A host's health now.
pub fn print_health(health: &HostHealth) {
    say!(
        "{}: {} ({}), generation {}",
        health.host,
        if !health.reachable {
            "UNREACHABLE"
        } else if health.healthy {
            "HEALTHY"
        } else {
            "UNHEALTHY"
        },
        health.state.as_str(),
        generation(health.current.generation)
    );
    for r in &health.results {
        say!(
            "  {} {}: {}",
            if r.ok { "✅" } else { "❌" },
            r.check,
            first_line(&r.output)
        );
    }
    if let Some(error) = &health.error {
        say!("  {error}");
    }
}

pub fn print_cancel(answer: &CancelAnswer) {
    say!(
        "Cancel requested for deployment #{}: no new hosts will start; running hosts finish or roll back.",
        answer.id
    );
}

/// One host's build as it ends (stderr: progress, not the report).
pub fn print_host_build(host: &HostBuild) {
    match &host.error {
        None => eprintln!("built {} in {}", host.name, duration_ms(host.duration_ms)),
        Some(error) => eprintln!("{}: build: {}", host.name, first_line(error)),
    }
}

/// `build`: each host's system, built or why not; no host was touched.
pub fn print_build(report: &BuildReport) {
    let rows = report
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                if h.error.is_none() { "built" } else { "FAILED" }.to_string(),
                duration_ms(h.duration_ms),
                h.result.clone().unwrap_or_else(|| h.toplevel.clone()),
            ]
        })
        .collect();
    table(&["HOST", "RESULT", "DURATION", "SYSTEM"], rows);
    for h in report.hosts.iter().filter(|h| h.error.is_some()) {
        println!();
        println!("── {} (build failed) ──", h.name);
        println!("{}", h.error.as_deref().unwrap_or_default());
    }
    let built = report.hosts.iter().filter(|h| h.error.is_none()).count();
    println!();
    println!(
        "built {built}/{} | evaluated {} | no host was touched",
        report.hosts.len(),
        report.evaluation.describe()
    );
}

#[cfg(test)]
mod tests;
