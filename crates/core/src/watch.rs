//! The fleet as the daemon's watch sees it, one document for the store, the
//! API (`GET /api/v1/fleet`, its event stream), `status --json` and the
//! client: every host's desired, running, booted and boot-default systems,
//! its drift kinds with their times, health, reachability and last sight.
//! Also what the watch records when a host changes ([`FleetEvent`]) and the
//! alerts it sends ([`Alert`]), and how [`assess`] turns one observation
//! into a host's new state.

use serde::{Deserialize, Serialize};

use crate::drift::{self, AlertKind, Drift, DriftKind, History, Observed};
use crate::remote::ProbeResult;

/// What the watch does about a drifted or behind host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDrift {
    /// Report it (status, API, metrics, alerts); change nothing.
    #[default]
    Report,
    /// Deploy the flake's system to it through the normal pipeline.
    Redeploy,
}

/// One host, as last observed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostWatch {
    pub name: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The toplevel the flake evaluates to now; `None` with `desired_error`.
    pub desired: Option<String>,
    /// Why the desired system is unknown (the evaluation's error).
    #[serde(default)]
    pub desired_error: Option<String>,
    /// The desired system is unknown because the whole flake does not
    /// evaluate (not this host's own configuration): one fleet alert says
    /// so, not one per host.
    #[serde(default)]
    pub fleet_unevaluated: bool,
    /// `/run/current-system`.
    pub running: Option<String>,
    /// The profile's generation (the boot default's number).
    pub generation: Option<u32>,
    /// `/run/booted-system`.
    pub booted: Option<String>,
    /// The system the profile points at: what the next boot runs.
    pub boot_default: Option<String>,
    /// The kinds the host is in, each since when; `in-sync` alone when all
    /// is well.
    pub drift: Vec<Drift>,
    /// The last health checks' verdict (`None`: not checked yet).
    pub healthy: Option<bool>,
    /// The checks that failed, with their output's first line.
    #[serde(default)]
    pub failing_checks: Vec<String>,
    /// When its health checks last ran (Unix ms).
    #[serde(default)]
    pub health_checked_at: Option<i64>,
    /// Whether the last probe reached it (`None`: never probed).
    pub reachable: Option<bool>,
    /// The last probe's error.
    #[serde(default)]
    pub error: Option<String>,
    /// When a probe last reached it (Unix ms).
    pub last_seen: Option<i64>,
    /// When it was last probed, reached or not (Unix ms).
    pub probed_at: Option<i64>,
    /// When its drift kinds last changed (Unix ms).
    pub since: Option<i64>,
    /// The deployment changing it right now: it is reported from that
    /// deployment, not probed meanwhile.
    #[serde(default)]
    pub deployment: Option<i64>,
    /// What the watch does about its drift (the matching `on-drift` rule).
    #[serde(default)]
    pub on_drift: OnDrift,
}

impl HostWatch {
    pub fn kinds(&self) -> Vec<DriftKind> {
        drift::kinds(&self.drift)
    }

    pub fn has(&self, kind: DriftKind) -> bool {
        self.drift.iter().any(|d| d.kind == kind)
    }

    /// When it entered `kind`, if it is in it.
    pub fn since(&self, kind: DriftKind) -> Option<i64> {
        self.drift.iter().find(|d| d.kind == kind).map(|d| d.since)
    }
}

/// The whole fleet, as the watch sees it (`GET /api/v1/fleet`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetReport {
    /// When this document was made (Unix ms): ages are counted from it.
    pub generated_at: i64,
    /// Whether a watch loop keeps it fresh (`false`: the last state a daemon
    /// stored, or one `status --live` observation).
    pub watching: bool,
    /// The coordinator whose watch this is: the elected leader of the
    /// daemons sharing the history (the others answer from what it stored).
    #[serde(default)]
    pub watched_by: Option<String>,
    /// How often each host is probed, in seconds.
    #[serde(default)]
    pub interval_seconds: Option<u64>,
    /// The flake the desired systems come from.
    pub flake: String,
    /// Its revision, when it has one.
    #[serde(default)]
    pub revision: Option<String>,
    /// When it was last evaluated (Unix ms).
    #[serde(default)]
    pub evaluated_at: Option<i64>,
    /// Why it does not evaluate (every host's desired system is then unknown).
    #[serde(default)]
    pub evaluation_error: Option<String>,
    /// Pull mode: the branch followed, and what was last seen on it.
    #[serde(default)]
    pub branch: Option<BranchWatch>,
    pub hosts: Vec<HostWatch>,
}

impl FleetReport {
    pub fn host(&self, name: &str) -> Option<&HostWatch> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// When the oldest observation was made: how old the data is at worst.
    pub fn oldest_probe(&self) -> Option<i64> {
        self.hosts.iter().filter_map(|h| h.probed_at).min()
    }
}

/// Pull mode's view of the tracked branch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BranchWatch {
    pub branch: String,
    /// The git remote polled.
    pub remote: String,
    /// The commit last seen on it.
    pub commit: Option<String>,
    /// When it was last polled (Unix ms).
    pub polled_at: Option<i64>,
    /// The last poll's error, or why the last move was not deployed.
    pub error: Option<String>,
}

/// A host's drift changed (stored, then sent on `/api/v1/fleet/events`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetEvent {
    /// Position in the fleet's history: `Last-Event-ID` resumes after it.
    pub id: i64,
    /// Unix ms.
    pub at: i64,
    pub host: String,
    pub appeared: Vec<DriftKind>,
    pub cleared: Vec<DriftKind>,
    /// The host's whole state after the change.
    pub state: HostWatch,
}

/// Something people are told about (e-mail, Slack, webhooks), once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Position in the alerts' history; with `created_at`, the delivery id
    /// receivers deduplicate by.
    pub id: i64,
    pub created_at: i64,
    pub kind: AlertKind,
    /// `None` for the fleet's own alerts (its evaluation).
    pub host: Option<String>,
    /// The drift kinds that appeared or cleared.
    #[serde(default)]
    pub drift: Vec<DriftKind>,
    /// What people need to act: failing checks, the error, the systems.
    #[serde(default)]
    pub detail: Option<String>,
}

impl Alert {
    pub fn delivery_id(&self) -> String {
        format!("alert-{}-{}", self.created_at, self.id)
    }

    /// What happened, in plain words (e-mail subjects).
    pub fn summary(&self) -> String {
        let host = self.host.as_deref().unwrap_or("the fleet");
        let kinds = self
            .drift
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        match self.kind {
            AlertKind::Unhealthy => format!("{host} is unhealthy"),
            AlertKind::Healthy => format!("{host} is healthy again"),
            AlertKind::Drifted => format!("{host} drifted: {kinds}"),
            AlertKind::DriftCleared => format!("{host} no longer drifted: {kinds}"),
            AlertKind::Unreachable => format!("{host} is unreachable"),
            AlertKind::Reachable => format!("{host} is reachable again"),
            AlertKind::EvaluationFailed => "the flake no longer evaluates".to_string(),
            AlertKind::EvaluationRecovered => "the flake evaluates again".to_string(),
        }
    }

    /// One line for chat: the summary with its icon.
    pub fn text(&self) -> String {
        let icon = match self.kind {
            AlertKind::Unhealthy => "🩺",
            AlertKind::Healthy => "💚",
            AlertKind::Drifted => "🔀",
            AlertKind::DriftCleared | AlertKind::EvaluationRecovered => "✅",
            AlertKind::Unreachable => "📵",
            AlertKind::Reachable => "📶",
            AlertKind::EvaluationFailed => "⚠️",
        };
        format!("{icon} {}", self.summary())
    }
}

/// One probe (and perhaps health check) of a host, ready to be judged.
#[derive(Clone, Debug)]
pub struct Observation {
    /// What the probe found, or why it could not.
    pub probe: Result<ProbeResult, String>,
    /// When the health checks ran now: `(healthy, failing checks)`.
    pub health: Option<(bool, Vec<String>)>,
    /// Unix ms.
    pub at: i64,
}

/// A host's new state from its previous one and one observation: drift
/// classified against the desired system and our history, times carried.
/// `desired` is the flake's toplevel for it, or the evaluation's error.
pub fn assess(
    previous: &HostWatch,
    desired: Result<&str, &str>,
    observation: &Observation,
    history: &History,
) -> HostWatch {
    let mut next = previous.clone();
    let at = observation.at;
    (next.desired, next.desired_error) = match desired {
        Ok(path) => (Some(path.to_string()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    if let Some((healthy, failing)) = &observation.health {
        next.healthy = Some(*healthy);
        next.failing_checks = failing.clone();
        next.health_checked_at = Some(at);
    }
    next.probed_at = Some(at);
    match &observation.probe {
        Ok(probe) => {
            next.reachable = Some(true);
            next.error = None;
            next.last_seen = Some(at);
            next.running = probe.current_system.clone();
            next.generation = probe.generation;
            next.booted = probe.booted_system.clone();
            next.boot_default = probe.profile_system.clone();
        }
        Err(e) => {
            next.reachable = Some(false);
            next.error = Some(e.clone());
        }
    }
    let kinds = drift::classify(
        &Observed {
            desired: desired.ok(),
            probe: observation.probe.as_ref().ok(),
            history,
            healthy: next.healthy,
        },
        &previous.kinds(),
    );
    next.drift = drift::carry(&previous.drift, &kinds, at);
    if next.kinds() != previous.kinds() {
        next.since = Some(at);
    }
    next
}

/// What an alert about `host` tells beyond its one line: the failing checks,
/// the systems involved, the error.
pub fn alert_detail(kind: AlertKind, host: &HostWatch) -> Option<String> {
    let path = |p: &Option<String>| p.clone().unwrap_or_else(|| "-".into());
    match kind {
        AlertKind::Unhealthy => Some(host.failing_checks.join("\n")),
        AlertKind::Drifted | AlertKind::DriftCleared => {
            let mut text = format!(
                "running {}\nboot default {}\ndesired {}",
                path(&host.running),
                path(&host.boot_default),
                path(&host.desired)
            );
            if let Some(error) = &host.desired_error {
                text.push_str(&format!("\ndesired system unknown: {error}"));
            }
            Some(text)
        }
        AlertKind::Unreachable => Some(format!(
            "unreachable since {}{}",
            crate::render::timestamp(host.since(DriftKind::Unreachable).unwrap_or_default()),
            host.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )),
        _ => None,
    }
    .filter(|t| !t.is_empty())
}

/// A host that cannot be probed: the flake that says how to reach it does
/// not evaluate (and the watch has no earlier evaluation of it). It keeps
/// its last known kinds, but `in-sync`, and its desired system is unknown.
pub fn unobserved(previous: &HostWatch, error: &str, now: i64) -> HostWatch {
    let mut next = previous.clone();
    next.desired = None;
    next.desired_error = Some(error.to_string());
    let mut kinds: Vec<DriftKind> = previous
        .kinds()
        .into_iter()
        .filter(|k| *k != DriftKind::InSync && *k != DriftKind::DesiredUnknown)
        .collect();
    kinds.push(DriftKind::DesiredUnknown);
    kinds.sort();
    next.drift = drift::carry(&previous.drift, &kinds, now);
    if next.kinds() != previous.kinds() {
        next.since = Some(now);
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-a";
    const B: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-b";

    fn running(path: &str) -> Observation {
        Observation {
            probe: Ok(ProbeResult {
                current_system: Some(path.into()),
                profile_system: Some(path.into()),
                generation: Some(2),
                ..ProbeResult::default()
            }),
            health: None,
            at: 1_000,
        }
    }

    #[test]
    fn assessing_keeps_what_an_unreachable_host_was_last_seen_running() {
        let first = assess(
            &HostWatch {
                name: "web1".into(),
                ..HostWatch::default()
            },
            Ok(A),
            &running(A),
            &History::default(),
        );
        assert_eq!(first.kinds(), [DriftKind::InSync]);
        assert_eq!(first.last_seen, Some(1_000));
        assert_eq!(first.since, Some(1_000));
        assert_eq!(first.reachable, Some(true));
        let lost = assess(
            &first,
            Ok(A),
            &Observation {
                probe: Err("web1: cannot connect".into()),
                health: None,
                at: 5_000,
            },
            &History::default(),
        );
        assert_eq!(lost.kinds(), [DriftKind::Unreachable]);
        assert_eq!(lost.running.as_deref(), Some(A), "last known");
        assert_eq!(lost.last_seen, Some(1_000));
        assert_eq!(lost.probed_at, Some(5_000));
        assert_eq!(lost.since(DriftKind::Unreachable), Some(5_000));
        assert_eq!(lost.error.as_deref(), Some("web1: cannot connect"));
    }

    #[test]
    fn assessing_health_and_an_unknown_desired_system() {
        let mut sick = running(A);
        sick.health = Some((false, vec!["service nginx (failed)".into()]));
        let host = assess(
            &HostWatch::default(),
            Err("error: undefined variable"),
            &sick,
            &History::default(),
        );
        assert_eq!(
            host.kinds(),
            [DriftKind::Unhealthy, DriftKind::DesiredUnknown]
        );
        assert_eq!(
            host.desired_error.as_deref(),
            Some("error: undefined variable")
        );
        assert_eq!(host.failing_checks, ["service nginx (failed)"]);
        // Health is kept between its own checks; the flake evaluates again.
        let later = Observation {
            at: 2_000,
            ..running(B)
        };
        let again = assess(&host, Ok(B), &later, &History::default());
        assert_eq!(again.kinds(), [DriftKind::Unhealthy]);
        assert_eq!(again.since(DriftKind::Unhealthy), Some(1_000));
        assert_eq!(again.health_checked_at, Some(1_000));
    }

    #[test]
    fn a_host_that_cannot_be_observed_is_never_in_sync() {
        let host = assess(
            &HostWatch::default(),
            Ok(A),
            &running(A),
            &History::default(),
        );
        let later = unobserved(&host, "error: syntax error", 9_000);
        assert_eq!(later.kinds(), [DriftKind::DesiredUnknown]);
        assert_eq!(later.since, Some(9_000));
        assert_eq!(later.running.as_deref(), Some(A));
        assert_eq!(unobserved(&later, "again", 10_000).since, Some(9_000));
    }

    #[test]
    fn alerts_have_stable_delivery_ids_and_plain_text() {
        let alert = Alert {
            id: 7,
            created_at: 1_700_000_000_000,
            kind: AlertKind::Drifted,
            host: Some("web1".into()),
            drift: vec![DriftKind::ManualSwitch],
            detail: None,
        };
        assert_eq!(alert.delivery_id(), "alert-1700000000000-7");
        assert_eq!(alert.text(), "🔀 web1 drifted: manual-switch");
        let json = serde_json::to_value(&alert).unwrap();
        assert_eq!(json["kind"], "drifted");
        assert_eq!(serde_json::from_value::<Alert>(json).unwrap(), alert);
    }
}
