//! The deployment report as Markdown, shaped like the seed's "Deployment
//! Summary".

use std::fmt::Write;

use nix_deploy_core::events::{Event, EventKind, HostStatus};
use nix_deploy_core::render::{self, duration_ms, first_line, generation, timestamp};
use nix_deploy_core::run::{Deployment, HostRun, RunKind};

/// The report of an `exec` or `upload-keys` run: one row per host with its
/// exit code and last line of output, then each failure's output tails.
fn run_markdown(d: &Deployment) -> String {
    let mut out = String::new();
    let what = match &d.exec {
        Some(spec) => format!("`{}`", spec.display()),
        None => d.kind.as_str().to_string(),
    };
    let _ = writeln!(
        out,
        "# {} #{}: {}
",
        d.kind.as_str(),
        d.id,
        d.status
    );
    let _ = writeln!(out, "- Command: {what}");
    let _ = writeln!(out, "- Started: {}", timestamp(d.created_at));
    if let Some(ms) = d.duration_ms() {
        let _ = writeln!(out, "- Total time: {}", duration_ms(ms));
    }
    let _ = writeln!(out, "- Requested by: {} ({})", d.requested_by, d.trigger);
    let _ = writeln!(out, "- Hosts: {}", render::exec_summary(&d.hosts));
    let _ = writeln!(
        out,
        "
| Host | Result | Exit | Duration | Output |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for r in &d.hosts {
        let output = r.output.as_ref();
        let last = output
            .map(|o| o.last_line())
            .filter(|l| !l.is_empty())
            .or(r.error.as_deref().map(first_line))
            .or(r.reason.as_deref())
            .unwrap_or("")
            .replace('|', "\\|");
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.host,
            r.status,
            output
                .and_then(|o| o.exit_code)
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            r.duration_ms()
                .map(duration_ms)
                .unwrap_or_else(|| "-".into()),
            last
        );
    }
    for r in d.hosts.iter().filter(|r| r.status.is_failure()) {
        let _ = writeln!(out, "\n## {} ({})\n", r.host, r.status);
        if let Some(error) = &r.error {
            let _ = writeln!(out, "{error}\n");
        }
        if let Some(output) = &r.output {
            for (name, text) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
                if !text.trim().is_empty() {
                    let _ = writeln!(out, "{name}:\n```\n{text}\n```");
                }
            }
        }
    }
    out
}

/// The report of a deployment (with its events, when loaded).
pub fn markdown(d: &Deployment) -> String {
    if d.kind != RunKind::Deploy {
        return run_markdown(d);
    }
    let runs = &d.hosts;
    let events: &[Event] = d.events.as_deref().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "# Deployment #{}: {}\n", d.id, d.status);
    let _ = writeln!(out, "- Started: {}", timestamp(d.created_at));
    if let Some(ms) = d.duration_ms() {
        let _ = writeln!(out, "- Total time: {}", duration_ms(ms));
    }
    let _ = writeln!(out, "- Requested by: {} ({})", d.requested_by, d.trigger);
    let _ = writeln!(
        out,
        "- Flake: `{}`{}",
        d.flake,
        d.flake_rev
            .as_deref()
            .map(|r| format!(" at `{r}`"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "- Strategy: {}", d.strategy);
    if let Some(promotion) = d.pinned.as_ref().and_then(|p| p.promotion.as_ref()) {
        let _ = writeln!(out, "- Promoted: {}", promotion.describe());
    }
    if let Some(waiting) = &d.waiting {
        let _ = writeln!(out, "- Now {}", render::window_wait(waiting));
    }
    if let Some(e) = &d.error {
        let _ = writeln!(out, "- Stopped: {e}");
    }
    for gate in &d.gates {
        let _ = writeln!(
            out,
            "- Gate {} ({}): {} for {}",
            gate.number,
            gate.title,
            gate.state.as_str(),
            gate.hosts.join(", ")
        );
        for approval in &gate.approvals {
            let _ = writeln!(
                out,
                "  - approved by {} at {} via {}; they saw: {}",
                approval.by,
                timestamp(approval.at),
                approval.via,
                approval.seen.replace('\n', "; ")
            );
        }
        if let (Some(by), Some(reason)) = (&gate.decided_by, &gate.reason) {
            let _ = writeln!(out, "  - {} by {by}: {reason}", gate.state.as_str());
        }
    }
    let count = |s: HostStatus| runs.iter().filter(|r| r.status == s).count();
    let attempted = runs
        .iter()
        .filter(|r| r.status != HostStatus::Skipped)
        .count();
    let deployed = count(HostStatus::Deployed);
    let _ = writeln!(out, "\n## Deployment Summary\n");
    let _ = writeln!(
        out,
        "- Hosts deployed: {deployed}/{} ({} skipped)",
        runs.len(),
        count(HostStatus::Skipped)
    );
    if attempted > 0 {
        let _ = writeln!(
            out,
            "- Success rate: {:.0}%",
            deployed as f64 * 100.0 / attempted as f64
        );
    }
    let _ = writeln!(out, "- Rollbacks: {}", count(HostStatus::RolledBack));
    let _ = writeln!(out, "\n| Host | Result | Generation | Duration | Note |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for r in runs {
        let note = r
            .error
            .as_deref()
            .or(r.reason.as_deref())
            .map(first_line)
            .unwrap_or("")
            .replace('|', "\\|");
        let _ = writeln!(
            out,
            "| {} | {} | {} → {} | {} | {} |",
            r.host,
            r.status,
            generation(r.from.generation),
            generation(r.to.generation),
            r.duration_ms()
                .map(duration_ms)
                .unwrap_or_else(|| "-".into()),
            note
        );
    }
    let failures: Vec<&HostRun> = runs.iter().filter(|r| r.status.is_failure()).collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## Failures\n");
        for r in failures {
            let _ = writeln!(
                out,
                "### {} ({})\n\n```\n{}\n```\n",
                r.host,
                r.status,
                r.error.as_deref().unwrap_or("")
            );
        }
    }
    let health: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::HealthChecked { .. }))
        .collect();
    if !health.is_empty() {
        let _ = writeln!(out, "\n## Health checks\n");
        for e in health {
            if let EventKind::HealthChecked { phase, results } = &e.kind {
                for r in results {
                    let _ = writeln!(
                        out,
                        "- {} ({phase}): {} {} ({} attempt(s))",
                        e.host.as_deref().unwrap_or("-"),
                        r.check,
                        if r.ok { "✅" } else { "❌" },
                        r.attempts
                    );
                }
            }
        }
    }
    out
}
