//! Tables and JSON documents for the terminal. Tables go to stdout; nothing
//! here decides anything.

use crate::engine::{DeployReport, PlanReport};
use crate::events::{Event, EventKind, HostStatus, SystemRef};
use crate::plan::{Action, EstimateSource};
use crate::store::{DeploymentRow, HostRun, HostStateRow};
use crate::summary::ChangeSummary;

pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `/nix/store/<hash>-name` → `name` (hash prefix kept short) for tables.
pub fn short_path(path: Option<&str>) -> String {
    match path {
        None => "-".into(),
        Some(p) => match p.strip_prefix("/nix/store/") {
            Some(rest) if rest.len() > 33 => format!("{}…-{}", &rest[..7], &rest[33..]),
            _ => p.to_string(),
        },
    }
}

pub fn generation(g: Option<u32>) -> String {
    g.map(|g| g.to_string()).unwrap_or_else(|| "-".into())
}

pub fn duration_ms(ms: i64) -> String {
    let secs = ms as f64 / 1000.0;
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = secs as u64;
        format!("{}m {:02}s", whole / 60, whole % 60)
    }
}

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

/// Print rows as left-aligned columns.
fn table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
            }
        }
        println!("{}", line.trim_end());
    }
}

pub fn seconds(secs: f64) -> String {
    duration_ms((secs * 1000.0) as i64)
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
    for warning in &plan.warnings {
        println!("Warning: {warning}");
    }
    println!();
    if report.to_deploy.is_empty() {
        println!("Nothing to deploy: every reachable host runs its evaluated system.");
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

fn host_json(run: &HostRun) -> serde_json::Value {
    serde_json::json!({
        "name": run.host,
        "status": run.status,
        "changed": run.changed,
        "from": system_json(&run.from),
        "to": system_json(&run.to),
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "duration_ms": run.duration_ms(),
        "steps": run.steps,
        "reason": run.reason,
        "error": run.error,
        "summary": run.summary,
    })
}

fn system_json(s: &SystemRef) -> serde_json::Value {
    serde_json::json!({ "path": s.path, "generation": s.generation })
}

pub fn report_json(report: &DeployReport) -> serde_json::Value {
    serde_json::json!({
        "id": report.id,
        "status": report.status,
        "flake": report.flake,
        "strategy": report.strategy,
        "error": report.error,
        "started_at": report.started_at,
        "finished_at": report.finished_at,
        "duration_ms": report.finished_at - report.started_at,
        "hosts": report.hosts.iter().map(host_json).collect::<Vec<_>>(),
    })
}

pub fn deployment_json(d: &DeploymentRow, runs: &[HostRun]) -> serde_json::Value {
    let mut doc = serde_json::to_value(d).unwrap_or_default();
    doc["hosts"] = runs.iter().map(host_json).collect::<Vec<_>>().into();
    doc["selected"] = serde_json::to_value(&d.hosts).unwrap_or_default();
    doc
}

fn result_word(status: HostStatus) -> String {
    match status {
        HostStatus::Deployed => "✅ deployed".into(),
        HostStatus::Skipped => "⏭  skipped".into(),
        HostStatus::RolledBack => "↩️  rolled back".into(),
        HostStatus::Failed => "❌ failed".into(),
        HostStatus::RollbackFailed => "❌ rollback failed".into(),
        HostStatus::Unreachable => "❌ unreachable".into(),
        other => other.as_str().into(),
    }
}

fn generations(run: &HostRun) -> String {
    match run.status {
        HostStatus::Deployed => format!(
            "{} → {}",
            generation(run.from.generation),
            generation(run.to.generation)
        ),
        HostStatus::RolledBack => format!(
            "{} → {} → {}",
            generation(run.from.generation),
            generation(run.to.generation),
            generation(run.from.generation)
        ),
        _ => generation(run.from.generation),
    }
}

pub fn print_report(report: &DeployReport) {
    println!();
    println!(
        "Deployment #{} {} (strategy {})",
        report.id, report.status, report.strategy
    );
    if let Some(error) = &report.error {
        println!("Stopped: {error}");
    }
    let mut rows = vec![vec![
        "HOST".into(),
        "RESULT".into(),
        "GENERATION".into(),
        "DURATION".into(),
        "NOTE".into(),
    ]];
    for run in &report.hosts {
        let note = match run.status {
            HostStatus::Skipped | HostStatus::Cancelled => run.reason.clone().unwrap_or_default(),
            _ => run
                .error
                .as_deref()
                .and_then(|e| e.lines().next())
                .unwrap_or_default()
                .to_string(),
        };
        rows.push(vec![
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
        ]);
    }
    table(&rows);
    let failed: Vec<&HostRun> = report
        .hosts
        .iter()
        .filter(|h| h.status.is_failure())
        .collect();
    for run in &failed {
        println!();
        println!("── {} ({}) ──", run.host, run.status);
        println!("{}", run.error.as_deref().unwrap_or("no error recorded"));
    }
    let count = |s: HostStatus| report.hosts.iter().filter(|h| h.status == s).count();
    println!();
    println!(
        "Total time: {} | deployed {}/{} | skipped {} | rolled back {} | failed {}",
        duration_ms(report.finished_at - report.started_at),
        count(HostStatus::Deployed),
        report.hosts.len(),
        count(HostStatus::Skipped),
        count(HostStatus::RolledBack),
        failed.len() - count(HostStatus::RolledBack),
    );
}

pub fn print_status(hosts: &[HostStateRow]) {
    if hosts.is_empty() {
        println!("No hosts known yet: run `nix-deploy plan` or `nix-deploy deploy` first.");
        return;
    }
    let mut rows = vec![vec![
        "HOST".into(),
        "SYSTEM".into(),
        "GENERATION".into(),
        "LAST RESULT".into(),
        "DEPLOYMENT".into(),
        "WHEN".into(),
        "REACHABLE".into(),
    ]];
    for h in hosts {
        rows.push(vec![
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
        ]);
    }
    table(&rows);
}

pub fn print_history(rows: &[(DeploymentRow, Vec<HostRun>)]) {
    if rows.is_empty() {
        println!("No deployments recorded yet.");
        return;
    }
    let mut table_rows = vec![vec![
        "ID".into(),
        "STARTED".into(),
        "STATUS".into(),
        "STRATEGY".into(),
        "HOSTS".into(),
        "DURATION".into(),
        "BY".into(),
    ]];
    for (d, runs) in rows {
        table_rows.push(vec![
            format!("#{}", d.id),
            timestamp(d.created_at),
            d.status.to_string(),
            d.strategy.clone(),
            hosts_summary(runs),
            d.finished_at
                .map(|f| duration_ms(f - d.created_at))
                .unwrap_or_else(|| "-".into()),
            format!("{} ({})", d.requested_by, d.trigger),
        ]);
    }
    table(&table_rows);
}

/// `2 deployed, 1 skipped, 1 rolled back, 1 failed`: what happened to the
/// hosts of one deployment (rolled back is not counted as failed).
fn hosts_summary(runs: &[HostRun]) -> String {
    let count = |s: HostStatus| runs.iter().filter(|h| h.status == s).count();
    let rolled_back = count(HostStatus::RolledBack);
    let failed = runs
        .iter()
        .filter(|h| h.status.is_failure() && h.status != HostStatus::RolledBack)
        .count();
    let mut parts = vec![
        format!("{} deployed", count(HostStatus::Deployed)),
        format!("{} skipped", count(HostStatus::Skipped)),
    ];
    if rolled_back > 0 {
        parts.push(format!("{rolled_back} rolled back"));
    }
    parts.push(format!("{failed} failed"));
    parts.join(", ")
}

pub fn print_deployment(d: &DeploymentRow, runs: &[HostRun], events: &[Event]) {
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
    for event in events {
        let offset = duration_ms(event.at - d.created_at);
        let host = event.host.as_deref().unwrap_or("-");
        let text = match &event.kind {
            EventKind::StepFinished {
                step,
                ok,
                duration_ms: ms,
                message,
            } => format!(
                "{step} {} ({}){}",
                if *ok { "ok" } else { "FAILED" },
                duration_ms(*ms as i64),
                message
                    .as_deref()
                    .map(|m| format!(": {}", m.lines().next().unwrap_or_default()))
                    .unwrap_or_default()
            ),
            EventKind::StepStarted { step } => format!("{step} started"),
            EventKind::HostProbed { state, error, .. } => match error {
                Some(e) => format!("probe: {} ({e})", state.as_str()),
                None => format!("probe: {}", state.as_str()),
            },
            EventKind::Planned {
                reason,
                eta_seconds,
                risk,
                ..
            } => {
                format!("plan: {reason}; ETA {}; risk {risk}", seconds(*eta_seconds))
            }
            EventKind::HostPlanned { action, reason } => {
                format!(
                    "plan: {action}{}",
                    reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )
            }
            EventKind::HostFinished { status, .. } => format!("finished: {status}"),
            EventKind::DeploymentStarted { hosts, strategy } => {
                format!("started: {} host(s), strategy {strategy}", hosts.len())
            }
            EventKind::DeploymentFinished { status } => format!("finished: {status}"),
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
        };
        println!("[{offset:>7}] {host:<12} {text}");
    }
    println!();
    let report = DeployReport {
        id: d.id,
        status: d.status,
        flake: d.flake.clone(),
        strategy: d.strategy.clone(),
        error: d.error.clone(),
        started_at: d.created_at,
        finished_at: d.finished_at.unwrap_or(d.created_at),
        hosts: runs.to_vec(),
    };
    print_report(&report);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortens_store_paths() {
        assert_eq!(
            short_path(Some(
                "/nix/store/q4zfsrsm5n0vhqjrgz2c1lc78slrrsmw-nixos-system-p620"
            )),
            "q4zfsrs…-nixos-system-p620"
        );
        assert_eq!(short_path(None), "-");
        assert_eq!(duration_ms(1500), "1.5s");
        assert_eq!(duration_ms(83_000), "1m 23s");
    }
}
