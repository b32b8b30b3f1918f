//! The fleet: every host with what it should run (its latest evaluation),
//! what it runs and what it boots, its last deployment and when it was last
//! seen; filtered by tag and searched by name in the page. One query per
//! source for the whole fleet, whatever its size.
//!
//! The watch's truth wins where it exists ([`with_watch`]): the daemon's
//! watched fleet (the same document as `GET /api/v1/fleet`, from the
//! leader's live view or what it stored) gives each host it observed its
//! desired system (what the tracked flake evaluates to now), its running and
//! booted systems, its drift kinds and health, and when it was last seen;
//! the drift and health columns appear only when the watch observed some
//! host.

use std::collections::{BTreeMap, BTreeSet};

use askama::Template;
use axum::extract::State;
use axum::response::Response;

use nix_deploy_core::drift::DriftKind;
use nix_deploy_core::fleet::{self, Evaluated};
use nix_deploy_core::render::{first_line, generation, short_path};
use nix_deploy_core::run::HostRecord;
use nix_deploy_core::source::FleetSource;
use nix_deploy_core::watch::{FleetReport, HostWatch};

use super::{Page, render, result_class, when};
use crate::daemon::AppState;
use crate::daemon::config::Scope;
use crate::daemon::web::{Viewer, WebError};
use crate::store::LatestEvaluation;

/// One host, as the fleet table shows it.
pub struct FleetRow {
    pub name: String,
    pub tags: Vec<String>,
    pub role: String,
    /// The system its latest evaluation wants (short), and in full with
    /// when it was evaluated.
    pub desired: String,
    pub desired_full: String,
    pub running: String,
    pub running_full: String,
    pub booted: String,
    pub generation: String,
    /// `in sync`, `out of date` or `unknown`, and its class.
    pub sync: (&'static str, &'static str),
    pub pending_reboot: bool,
    /// Drift kinds as the watch of the fleet reports them (none without it).
    pub drift: Vec<Badge>,
    /// Health as the watch of the fleet reports it (none without it).
    pub health: Option<Badge>,
    pub last_seen: String,
    /// The last deployment that touched it: id, result and its class.
    pub last: Option<(i64, String, &'static str)>,
    pub last_error: Option<String>,
}

/// A badge: its text, its class and what hovering it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Badge {
    pub text: String,
    pub class: &'static str,
    pub title: String,
}

#[derive(Template)]
#[template(path = "fleet.html")]
struct FleetPage {
    page: Page,
    rows: Vec<FleetRow>,
    tags: Vec<String>,
    /// The drift kinds some host is in (the drift filter's choices).
    kinds: Vec<&'static str>,
    show_drift: bool,
    show_health: bool,
    running: Vec<i64>,
    /// What the watch is, for the line above the table.
    watch: Option<String>,
    evaluation_error: Option<String>,
}

pub async fn page(State(state): State<AppState>, viewer: Viewer) -> Result<Response, WebError> {
    viewer.permit(&state, Scope::Read)?;
    let store = state.store();
    let watched = state.fleet_view().await?;
    let rows = with_watch(
        fleet_rows(
            store.host_states().await?,
            store.latest_evaluations().await?,
        ),
        &watched,
    );
    let tags: BTreeSet<String> = rows.iter().flat_map(|r| r.tags.clone()).collect();
    let kinds: BTreeSet<DriftKind> = watched.hosts.iter().flat_map(HostWatch::kinds).collect();
    Ok(render(&FleetPage {
        page: Page::new("Fleet", "/", Some(&viewer)),
        show_drift: rows.iter().any(|r| !r.drift.is_empty()),
        show_health: rows.iter().any(|r| r.health.is_some()),
        tags: tags.into_iter().collect(),
        kinds: kinds.into_iter().map(DriftKind::as_str).collect(),
        running: store.running_deployments().await?,
        watch: watch_line(&watched),
        evaluation_error: watched
            .evaluation_error
            .as_deref()
            .map(|e| first_line(e).to_string()),
        rows,
    }))
}

/// What the watch is: who watches how often, and how fresh the flake is.
fn watch_line(report: &FleetReport) -> Option<String> {
    if !report.watching && report.hosts.is_empty() {
        return None;
    }
    let mut line = if report.watching {
        format!(
            "Watched{}{}",
            report
                .watched_by
                .as_deref()
                .map(|w| format!(" by {w}"))
                .unwrap_or_default(),
            report
                .interval_seconds
                .map(|s| format!(", every {s}s"))
                .unwrap_or_default()
        )
    } else {
        "Not watched now: the watch's last stored observations".to_string()
    };
    line.push_str(&format!("; desired systems from {}", report.flake));
    if let Some(revision) = &report.revision {
        line.push_str(&format!(" at {}", &revision[..revision.len().min(12)]));
    }
    if report.evaluated_at.is_some() {
        line.push_str(&format!(", evaluated {}", when(report.evaluated_at)));
    }
    Some(line)
}

/// The CSS class of a drift kind: what is wrong is red, what is waiting
/// (a deployment, a reboot) is amber.
pub fn drift_class(kind: DriftKind) -> &'static str {
    match kind {
        DriftKind::InSync => "ok",
        DriftKind::Behind | DriftKind::PendingReboot | DriftKind::BootMismatch => "warn",
        DriftKind::ManualSwitch
        | DriftKind::ManualRollback
        | DriftKind::Unhealthy
        | DriftKind::Unreachable => "bad",
        DriftKind::DesiredUnknown => "muted",
    }
}

/// The rows with what the watch observed put over what the history knows
/// (hosts the watch saw and the history did not get rows of their own).
pub fn with_watch(rows: Vec<FleetRow>, report: &FleetReport) -> Vec<FleetRow> {
    let mut rows: BTreeMap<String, FleetRow> =
        rows.into_iter().map(|r| (r.name.clone(), r)).collect();
    for host in &report.hosts {
        let row = rows
            .entry(host.name.clone())
            .or_insert_with(|| row(host.name.clone(), None, None));
        watched(row, host);
    }
    rows.into_values().collect()
}

fn watched(row: &mut FleetRow, host: &HostWatch) {
    if !host.tags.is_empty() {
        row.tags = host.tags.clone();
    }
    match (&host.desired, &host.desired_error) {
        (Some(desired), _) => {
            row.desired = short_path(Some(desired));
            row.desired_full = desired.clone();
        }
        (None, Some(error)) => {
            row.desired = "unknown".into();
            row.desired_full = first_line(error).to_string();
        }
        (None, None) => {}
    }
    if host.running.is_some() {
        row.running = short_path(host.running.as_deref());
        row.running_full = host.running.clone().unwrap_or_default();
        row.generation = generation(host.generation);
        row.booted = if host.booted == host.running {
            "= running".into()
        } else {
            short_path(host.booted.as_deref())
        };
        row.pending_reboot = host.has(DriftKind::PendingReboot);
    }
    row.sync = match (&host.desired, &host.running) {
        (Some(d), Some(r)) if d == r => ("in sync", "ok"),
        (Some(_), Some(_)) => ("out of date", "warn"),
        _ => ("unknown", "muted"),
    };
    row.drift = host
        .drift
        .iter()
        .map(|d| Badge {
            text: d.kind.as_str().to_string(),
            class: drift_class(d.kind),
            title: format!("since {}", when(Some(d.since))),
        })
        .collect();
    row.health = Some(match host.healthy {
        Some(true) => Badge {
            text: "healthy".into(),
            class: "ok",
            title: format!("checked {}", when(host.health_checked_at)),
        },
        Some(false) => Badge {
            text: "unhealthy".into(),
            class: "bad",
            title: host.failing_checks.join("\n"),
        },
        None => Badge {
            text: "unchecked".into(),
            class: "muted",
            title: "no health check has run: none configured, or not yet".into(),
        },
    });
    if host.last_seen.is_some() {
        row.last_seen = when(host.last_seen);
    }
    if host.reachable == Some(false)
        && let Some(error) = &host.error
    {
        row.last_error = Some(first_line(error).to_string());
    }
}

/// Every host either source knows, by name: the history's last known state
/// and the latest evaluation (tags, role, desired system).
pub fn fleet_rows(records: Vec<HostRecord>, evaluations: Vec<LatestEvaluation>) -> Vec<FleetRow> {
    let mut known: BTreeMap<String, (Option<HostRecord>, Option<LatestEvaluation>)> =
        BTreeMap::new();
    for record in records {
        let name = record.name.clone();
        known.entry(name).or_default().0 = Some(record);
    }
    for evaluation in evaluations {
        let name = evaluation.host.clone();
        known.entry(name).or_default().1 = Some(evaluation);
    }
    known
        .into_iter()
        .map(|(name, (record, evaluation))| row(name, record, evaluation))
        .collect()
}

/// A host as its newest cached evaluation says. The cache does not record
/// which source the fleet was read from, so each is tried in turn: for what
/// the page shows (tags, role, the desired system) they mean the same.
fn newest(name: &str, value: &str) -> Option<Evaluated> {
    let value: serde_json::Value = serde_json::from_str(value).ok()?;
    [
        FleetSource::Nixos,
        FleetSource::Colmena,
        FleetSource::DeployRs,
    ]
    .into_iter()
    .find_map(|source| fleet::parse_host(source, name, value.clone()).ok())
}

fn row(name: String, record: Option<HostRecord>, evaluation: Option<LatestEvaluation>) -> FleetRow {
    let evaluated_at = evaluation.as_ref().map(|e| e.evaluated_at);
    let host = evaluation.and_then(|e| newest(&name, &e.value));
    let record = record.unwrap_or_else(|| HostRecord {
        name: name.clone(),
        current_path: None,
        generation: None,
        probed_at: None,
        probe_error: None,
        last_deployment_id: None,
        last_status: None,
        last_error: None,
        last_finished_at: None,
        boot_path: None,
        pending_reboot: false,
    });
    let desired = host
        .as_ref()
        .and_then(|h| h.system.as_ref())
        .map(|s| s.toplevel.clone());
    let sync = match (&desired, &record.current_path) {
        (Some(d), Some(c)) if d == c => ("in sync", "ok"),
        (Some(_), Some(_)) => ("out of date", "warn"),
        _ => ("unknown", "muted"),
    };
    let last_seen = record.probed_at.max(record.last_finished_at);
    FleetRow {
        tags: host
            .as_ref()
            .map(|h| h.meta.tags.clone())
            .unwrap_or_default(),
        role: host
            .as_ref()
            .map(|h| h.meta.role.clone())
            .unwrap_or_default(),
        desired: short_path(desired.as_deref()),
        desired_full: match desired {
            Some(d) => format!("{d} (evaluated {})", when(evaluated_at)),
            None => String::new(),
        },
        running: short_path(record.current_path.as_deref()),
        running_full: record.current_path.clone().unwrap_or_default(),
        booted: if record.pending_reboot {
            short_path(record.boot_path.as_deref())
        } else {
            "= running".into()
        },
        generation: generation(record.generation),
        sync,
        pending_reboot: record.pending_reboot,
        drift: Vec::new(),
        health: None,
        last_seen: when(last_seen),
        last: record.last_deployment_id.map(|id| {
            let status = record.last_status.clone().unwrap_or_else(|| "-".into());
            (id, status, result_class(record.last_status.as_deref()))
        }),
        last_error: record
            .last_error
            .as_deref()
            .or(record.probe_error.as_deref())
            .map(|e| first_line(e).to_string()),
        name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P1: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-a";
    const P2: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-a";

    fn record(name: &str, current: Option<&str>) -> HostRecord {
        HostRecord {
            name: name.into(),
            current_path: current.map(str::to_string),
            generation: Some(3),
            probed_at: Some(1_000),
            probe_error: None,
            last_deployment_id: Some(7),
            last_status: Some("rolled-back".into()),
            last_error: Some("health check failed\nmore".into()),
            last_finished_at: Some(2_000),
            boot_path: None,
            pending_reboot: false,
        }
    }

    fn evaluation(name: &str, toplevel: &str, tags: &[&str]) -> LatestEvaluation {
        LatestEvaluation {
            host: name.into(),
            value: serde_json::json!({
                "toplevel": toplevel,
                "drvPath": "/nix/store/cccccccccccccccccccccccccccccccc-x.drv",
                "deployment": { "tags": tags, "role": "web" },
            })
            .to_string(),
            evaluated_at: 500,
        }
    }

    #[test]
    fn rows_join_the_history_and_the_latest_evaluation() {
        let rows = fleet_rows(
            vec![record("a", Some(P1)), record("b", Some(P1))],
            vec![
                evaluation("a", P1, &["edge"]),
                evaluation("b", P2, &[]),
                evaluation("c", P2, &["new"]),
            ],
        );
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(rows[0].sync.0, "in sync");
        assert_eq!(rows[0].tags, ["edge"]);
        assert_eq!(rows[0].role, "web");
        assert_eq!(rows[1].sync.0, "out of date");
        assert_eq!(rows[2].sync.0, "unknown");
        assert_eq!(rows[0].last, Some((7, "rolled-back".into(), "warn")));
        assert_eq!(rows[0].last_error.as_deref(), Some("health check failed"));
        assert!(rows[2].last.is_none());
        assert!(
            rows.iter()
                .all(|r| r.drift.is_empty() && r.health.is_none())
        );
    }

    #[test]
    fn the_watch_s_observations_win_over_the_history() {
        use nix_deploy_core::drift::Drift;
        let rows = fleet_rows(vec![record("a", Some(P1))], vec![evaluation("a", P1, &[])]);
        assert_eq!(rows[0].sync.0, "in sync");
        let report = FleetReport {
            watching: true,
            hosts: vec![
                HostWatch {
                    name: "a".into(),
                    desired: Some(P1.into()),
                    running: Some(P2.into()),
                    booted: Some(P1.into()),
                    drift: vec![Drift {
                        kind: DriftKind::ManualSwitch,
                        since: 10,
                    }],
                    healthy: Some(false),
                    failing_checks: vec!["nginx: <down>".into()],
                    last_seen: Some(9_000),
                    ..HostWatch::default()
                },
                HostWatch {
                    name: "only-watched".into(),
                    ..HostWatch::default()
                },
            ],
            ..FleetReport::default()
        };
        let rows = with_watch(rows, &report);
        assert_eq!(rows.len(), 2);
        let a = &rows[0];
        assert_eq!(a.sync.0, "out of date");
        assert_eq!(a.running_full, P2);
        assert_eq!(a.booted, short_path(Some(P1)));
        assert_eq!(a.drift[0].text, "manual-switch");
        assert_eq!(a.drift[0].class, "bad");
        let health = a.health.as_ref().unwrap();
        assert_eq!((health.text.as_str(), health.class), ("unhealthy", "bad"));
        assert_eq!(health.title, "nginx: <down>");
        assert_eq!(a.last_seen, when(Some(9_000)));
        assert_eq!(rows[1].name, "only-watched");
        assert_eq!(rows[1].health.as_ref().unwrap().text, "unchecked");
    }
}
