//! What the CLI prints: one JSON document per command with `--json`, else
//! tables (comfy-table, so wide characters line up) and the plan shaped like
//! the seed's. Texts come from the core's `render`; nothing here decides
//! anything.

use comfy_table::{Table, presets};
use serde::Serialize;

use nix_deploy_core::events::HostStatus;
use nix_deploy_core::plan::{Action, EstimateSource};
use nix_deploy_core::render::{
    self, duration_ms, event_text, first_line, generation, generations, result_word, seconds,
    short_path, timestamp,
};
use nix_deploy_core::reports::{
    CancelAnswer, DeploymentList, HostHealth, PlanReport, StatusReport,
};
use nix_deploy_core::run::{Deployment, HostRun};
use nix_deploy_core::summary::ChangeSummary;

use super::Cli;

/// The document as JSON with `--json`, else as `print` shows it.
pub fn show<T: Serialize>(cli: &Cli, value: &T, print: fn(&T)) -> anyhow::Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print(value);
    }
    Ok(())
}

/// Rows as left-aligned columns, two spaces apart, no borders.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut table = Table::new();
    table
        .load_style(presets::NOTHING)
        .set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    for line in table.lines() {
        println!("{}", line.trim_end());
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
    println!(
        "Deployment Plan: {} host(s) selected of {} ({} to deploy, {} skipped, {} unreachable)",
        plan.hosts.len(),
        report.fleet_size,
        report.to_deploy.len(),
        report.skipped.len(),
        report.unreachable.len()
    );
    println!("Flake: {}", report.flake);
    println!("Evaluation: {}", report.evaluation.describe());
    println!("Strategy: {}", plan.strategy_reason);
    println!();
    for phase in &plan.phases {
        println!("Phase {} ({}):", phase.index + 1, phase.note);
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
            if let Some(batch) = h.batch {
                line.push_str(&format!(" | batch {batch}"));
            }
            if !h.depends_on.is_empty() {
                line.push_str(&format!(" | depends on {}", h.depends_on.join(", ")));
            }
            println!("{line}");
        }
    }
    let skipped: Vec<_> = plan
        .hosts
        .iter()
        .filter(|h| h.action == Action::Skip)
        .collect();
    if !skipped.is_empty() {
        println!("Skipped:");
        for h in skipped {
            println!(
                "  - {} ({}) - {} ({}) | generation {}",
                h.name,
                h.role,
                h.state.as_str(),
                h.reason.as_deref().unwrap_or("skip"),
                generation(h.current.generation)
            );
        }
    }
    let unreachable: Vec<_> = plan
        .hosts
        .iter()
        .filter(|h| h.action == Action::Unreachable)
        .collect();
    if !unreachable.is_empty() {
        println!("Unreachable:");
        for h in unreachable {
            println!(
                "  - {}: {}",
                h.name,
                h.error.as_deref().unwrap_or("unreachable")
            );
        }
    }
    if !report.evaluation.failed.is_empty() {
        println!("Could not be evaluated (not planned):");
        for failure in &report.evaluation.failed {
            let mut lines = failure.error.lines();
            println!("  - {}: {}", failure.host, lines.next().unwrap_or_default());
            for line in lines {
                println!("      {line}");
            }
        }
    }
    for warning in &plan.warnings {
        println!("Warning: {warning}");
    }
    println!();
    if report.to_deploy.is_empty() {
        if report.unreachable.is_empty() {
            println!("Nothing to deploy: every host runs its evaluated system.");
        } else {
            println!(
                "Nothing to deploy among the hosts that answered; {} could not be reached: {}.",
                report.unreachable.len(),
                report.unreachable.join(", ")
            );
        }
        return;
    }
    println!("Recommendation: deploy {}", report.to_deploy.join(", "));
    println!(
        "Estimated time: {} (parallel limit {})",
        seconds(plan.eta_seconds),
        plan.parallel_limit
    );
    println!("Risk level: {}", plan.risk.as_str());
    for reason in &plan.risk_reasons {
        println!("  - {reason}");
    }
    println!("Rollback strategy: {}", plan.rollback_strategy);
}

/// How a deployment ended: one row per host, then each failure in full.
pub fn print_report(deployment: &Deployment) {
    println!();
    println!(
        "Deployment #{} {} (strategy {})",
        deployment.id, deployment.status, deployment.strategy
    );
    if let Some(error) = &deployment.error {
        println!("Stopped: {error}");
    }
    let rows = deployment
        .hosts
        .iter()
        .map(|run| {
            let note = match run.status {
                HostStatus::Skipped | HostStatus::Cancelled => {
                    run.reason.clone().unwrap_or_default()
                }
                _ => run
                    .error
                    .as_deref()
                    .map(first_line)
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
        println!();
        println!("── {} ({}) ──", run.host, run.status);
        println!("{}", run.error.as_deref().unwrap_or("no error recorded"));
    }
    println!();
    println!(
        "Total time: {} | deployed {}/{} | skipped {} | rolled back {} | failed {}",
        deployment
            .duration_ms()
            .map(duration_ms)
            .unwrap_or_else(|| "-".into()),
        deployment.count(HostStatus::Deployed),
        deployment.hosts.len(),
        deployment.count(HostStatus::Skipped),
        deployment.count(HostStatus::RolledBack),
        failed.len() - deployment.count(HostStatus::RolledBack),
    );
}

pub fn print_status(status: &StatusReport) {
    if status.hosts.is_empty() {
        println!("No hosts known yet: run `nix-deploy plan` or `nix-deploy deploy` first.");
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
        ],
        rows,
    );
}

pub fn print_history(list: &DeploymentList) {
    if list.deployments.is_empty() {
        println!("No deployments recorded yet.");
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
                d.strategy.clone(),
                render::hosts_summary(&d.hosts),
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
    println!(
        "Deployment #{} {} ({} by {}, {})",
        d.id,
        d.status,
        d.trigger,
        d.requested_by,
        timestamp(d.created_at)
    );
    println!(
        "Flake: {}{}",
        d.flake,
        d.flake_rev
            .as_deref()
            .map(|r| format!(" @ {r}"))
            .unwrap_or_default()
    );
    if let Some(error) = &d.error {
        println!("Error: {error}");
    }
    println!();
    for event in d.events.iter().flatten() {
        let offset = duration_ms(event.at - d.created_at);
        let host = event.host.as_deref().unwrap_or("-");
        println!(
            "[{offset:>7}] {host:<12} {}",
            first_line(&event_text(event))
        );
    }
    print_report(d);
}

/// A host's health now.
pub fn print_health(health: &HostHealth) {
    println!(
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
        println!(
            "  {} {}: {}",
            if r.ok { "✅" } else { "❌" },
            r.check,
            first_line(&r.output)
        );
    }
    if let Some(error) = &health.error {
        println!("  {error}");
    }
}

pub fn print_cancel(answer: &CancelAnswer) {
    println!(
        "Cancel requested for deployment #{}: no new hosts will start; running hosts finish or roll back.",
        answer.id
    );
}
