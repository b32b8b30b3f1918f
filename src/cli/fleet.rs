//! The watched fleet as `status` prints it: where the data comes from and
//! how old it is, then per host its drift (each kind with how long it has
//! lasted), health, what it runs and when it was last seen. Texts come from
//! the core's `render`.

use nix_deploy_core::render::{self, first_line, generation, short_path};
use nix_deploy_core::reports::StatusReport;
use nix_deploy_core::watch::FleetReport;

use super::output::table;

/// Where `fleet` comes from, and how old its data is.
fn provenance(fleet: &FleetReport) -> String {
    let now = fleet.generated_at;
    let oldest = fleet
        .oldest_probe()
        .map(|at| format!("the oldest observation is {} old", render::age(now - at)))
        .unwrap_or_else(|| "no host observed yet".into());
    // A stored view names the daemon that watched; `status --live`'s none.
    match (fleet.watching, fleet.interval_seconds, &fleet.watched_by) {
        (true, Some(every), _) => format!(
            "Watched by the daemon, each host probed every {}: {oldest}.",
            render::age(every as i64 * 1000)
        ),
        (false, _, None) if fleet.evaluated_at.is_some() => format!("Probed now: {oldest}."),
        _ => format!(
            "Not watched now: as a daemon's watch last stored it ({oldest}); `status --live` probes now."
        ),
    }
}

pub fn print_fleet(status: &StatusReport, fleet: &FleetReport) {
    println!("{}", provenance(fleet));
    if let Some(error) = &fleet.evaluation_error {
        println!(
            "The flake does not evaluate (every desired system is unknown): {}",
            first_line(error)
        );
    }
    if let Some(branch) = &fleet.branch {
        println!(
            "Following {} at {}: {}{}",
            branch.branch,
            branch.remote,
            branch
                .commit
                .as_deref()
                .map(|c| c.get(..12).unwrap_or(c).to_string())
                .unwrap_or_else(|| "not polled yet".into()),
            branch
                .error
                .as_deref()
                .map(|e| format!(" ({})", first_line(e)))
                .unwrap_or_default()
        );
    }
    let now = fleet.generated_at;
    let rows = fleet
        .hosts
        .iter()
        .map(|h| {
            let last = status.hosts.iter().find(|r| r.name == h.name);
            vec![
                h.name.clone(),
                match h.deployment {
                    Some(id) => format!("deploying (#{id})"),
                    None => render::drift(&h.drift, now),
                },
                match (h.healthy, h.failing_checks.first()) {
                    (Some(true), _) => "ok".into(),
                    (Some(false), Some(check)) => format!("failing: {check}"),
                    (Some(false), None) => "failing".into(),
                    (None, _) => "-".into(),
                },
                short_path(h.running.as_deref()),
                generation(h.generation),
                h.last_seen
                    .map(|at| format!("{} ago", render::age(now - at)))
                    .unwrap_or_else(|| "never".into()),
                last.and_then(|r| r.last_status.clone())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "HOST",
            "STATE",
            "HEALTH",
            "RUNNING",
            "GENERATION",
            "LAST SEEN",
            "LAST RESULT",
        ],
        rows,
    );
    for host in fleet.hosts.iter().filter(|h| h.reachable == Some(false)) {
        if let Some(error) = &host.error {
            println!("{}: {}", host.name, first_line(error));
        }
    }
}
