//! The remaining documents, one type each, shared by the CLI's `--json`, the
//! API and the daemon's client: a plan, the fleet's status, a host's health,
//! the answers to "start" and "cancel", and a list of deployments.

use serde::{Deserialize, Serialize};

use crate::eval::EvaluationReport;
use crate::events::{CheckResult, HostState, SystemRef};
use crate::plan::Plan;
use crate::run::{Deployment, HostRecord};
use crate::watch::FleetReport;

/// What `plan` shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    pub flake: String,
    pub fleet_size: usize,
    #[serde(flatten)]
    pub plan: Plan,
    pub to_deploy: Vec<String>,
    pub skipped: Vec<String>,
    pub unreachable: Vec<String>,
    /// How the fleet was evaluated, and which hosts could not be.
    #[serde(default)]
    pub evaluation: EvaluationReport,
    /// Hosts whose next boot runs another system than the running one (a
    /// `boot` deployment not rebooted yet).
    #[serde(default)]
    pub pending_reboot: Vec<String>,
    /// Hosts whose new system has another kernel or initrd than the one
    /// they booted: `--reboot=auto` reboots these.
    #[serde(default)]
    pub reboot_required: Vec<String>,
}

impl PlanReport {
    pub fn new(flake: &str, fleet_size: usize, plan: Plan) -> Self {
        use crate::plan::Action;
        let names = |action: Action| {
            plan.hosts
                .iter()
                .filter(|h| h.action == action)
                .map(|h| h.name.clone())
                .collect()
        };
        PlanReport {
            flake: flake.to_string(),
            fleet_size,
            to_deploy: names(Action::Deploy),
            skipped: names(Action::Skip),
            unreachable: names(Action::Unreachable),
            pending_reboot: Vec::new(),
            reboot_required: Vec::new(),
            plan,
            evaluation: EvaluationReport::default(),
        }
    }
}

/// Every host as the history knows it; `fleet`, as the watch observed it
/// (drift, health, last sight); `live` (with `?live=true`) compares them
/// with the flake right now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub hosts: Vec<HostRecord>,
    /// Deployments running now.
    #[serde(default)]
    pub running_deployments: Vec<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<PlanReport>,
    /// The daemon's live view, the last one a daemon stored, or (with
    /// `status --live`) one observation made now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetReport>,
}

/// A host's health right now (`health HOST`, `POST /hosts/{host}/health`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostHealth {
    pub host: String,
    pub reachable: bool,
    pub current: SystemRef,
    /// Whether it runs what the flake evaluates to.
    pub state: HostState,
    pub healthy: bool,
    pub results: Vec<CheckResult>,
    pub error: Option<String>,
}

/// `202 Accepted`: a deployment was started (or queued).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub id: i64,
    /// `running`, or `queued` while it waits for busy hosts.
    pub status: String,
    /// Where its Server-Sent Events are.
    pub events: String,
}

impl Accepted {
    pub fn new(id: i64, status: &str) -> Self {
        Accepted {
            id,
            status: status.to_string(),
            events: format!("/api/v1/deployments/{id}/events"),
        }
    }
}

/// The answer to a cancel request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CancelAnswer {
    pub id: i64,
    pub cancel_requested: bool,
}

/// Past deployments, newest first (`history`, `GET /deployments`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeploymentList {
    pub deployments: Vec<Deployment>,
}

/// What `build` (and `apply build`) did: each selected host's system built
/// on the coordinator; no host was touched.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildReport {
    pub flake: String,
    /// How the fleet was evaluated.
    #[serde(default)]
    pub evaluation: EvaluationReport,
    pub hosts: Vec<HostBuild>,
}

impl BuildReport {
    /// Whether every selected host's system was built.
    pub fn all_built(&self) -> bool {
        self.hosts.iter().all(|h| h.error.is_none())
    }
}

/// One host's build.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostBuild {
    pub name: String,
    /// The system the flake evaluates to (and, when built, the built path).
    pub toplevel: String,
    pub drv_path: String,
    /// Why it was not built.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `--keep-result`: the GC root kept for it (`STATE/results/HOST`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    pub duration_ms: i64,
}
