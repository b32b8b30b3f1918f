//! What happens during a deployment, as data: the statuses, the steps of a
//! host's pipeline and the events the engine records and streams.
//!
//! Every event is written to SQLite by the product's store before anyone is
//! told about it.

use serde::{Deserialize, Serialize};

use crate::approval::{GateKind, GateState};
use crate::remote::{HostSystems, ProbeResult};

/// One step of a host's pipeline (see ARCHITECTURE.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Probe,
    #[serde(rename = "pre-flight")]
    Preflight,
    Build,
    /// A promotion: the closure fetched from the source host instead of built.
    Fetch,
    Copy,
    SetProfile,
    Activate,
    Validate,
    Confirm,
    Soak,
    Commit,
    Rollback,
    /// Upload `deployment.keys` (before or after activation, or after a reboot).
    Keys,
    /// Reboot and wait for the host to come back with a new boot id.
    Reboot,
    /// Run an `exec` command.
    Exec,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Probe => "probe",
            Step::Preflight => "pre-flight",
            Step::Build => "build",
            Step::Fetch => "fetch",
            Step::Copy => "copy",
            Step::SetProfile => "set-profile",
            Step::Activate => "activate",
            Step::Validate => "validate",
            Step::Confirm => "confirm",
            Step::Soak => "soak",
            Step::Commit => "commit",
            Step::Rollback => "rollback",
            Step::Keys => "keys",
            Step::Reboot => "reboot",
            Step::Exec => "exec",
        }
    }

    /// What the progress display says while the step runs.
    pub fn progress_word(self) -> &'static str {
        match self {
            Step::Probe => "probing",
            Step::Preflight => "pre-flight checks",
            Step::Build => "building",
            Step::Fetch => "fetching from the source host",
            Step::Copy => "copying",
            Step::SetProfile => "setting profile",
            Step::Activate => "activating",
            Step::Validate => "validating",
            Step::Confirm => "confirming",
            Step::Soak => "soaking (canary)",
            Step::Commit => "committing",
            Step::Rollback => "rolling back",
            Step::Keys => "uploading keys",
            Step::Reboot => "rebooting",
            Step::Exec => "running",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a probe concluded about a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostState {
    Changed,
    Unchanged,
    Unreachable,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Changed => "CHANGED",
            HostState::Unchanged => "UNCHANGED",
            HostState::Unreachable => "UNREACHABLE",
        }
    }
}

/// Where a host run stands, or how it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostStatus {
    Pending,
    Running,
    Skipped,
    Deployed,
    Failed,
    RolledBack,
    RollbackFailed,
    Unreachable,
    /// Unhealthy before we touched it: not deployed, not our doing.
    Unhealthy,
    Cancelled,
    /// The coordinator died while this host was in progress.
    Interrupted,
    /// Done without deploying anything: a command that exited 0 (`exec`),
    /// keys uploaded (`upload-keys`), a dry activation.
    Succeeded,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Pending => "pending",
            HostStatus::Running => "running",
            HostStatus::Skipped => "skipped",
            HostStatus::Deployed => "deployed",
            HostStatus::Failed => "failed",
            HostStatus::RolledBack => "rolled-back",
            HostStatus::RollbackFailed => "rollback-failed",
            HostStatus::Unreachable => "unreachable",
            HostStatus::Unhealthy => "unhealthy",
            HostStatus::Cancelled => "cancelled",
            HostStatus::Interrupted => "interrupted",
            HostStatus::Succeeded => "succeeded",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    /// Whether this outcome makes the deployment unsuccessful (exit code 1).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            HostStatus::Failed
                | HostStatus::RolledBack
                | HostStatus::RollbackFailed
                | HostStatus::Unreachable
                | HostStatus::Unhealthy
                | HostStatus::Interrupted
        )
    }

    pub fn is_final(self) -> bool {
        !matches!(self, HostStatus::Pending | HostStatus::Running)
    }
}

impl std::fmt::Display for HostStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeploymentStatus {
    /// Recorded, waiting to start (busy hosts, or not yet validated).
    Queued,
    Running,
    /// Started, and waiting for a maintenance window to open.
    WaitingForWindow,
    /// Started, stopped before hosts that wait for approval (or a pause
    /// that waits for a promotion).
    AwaitingApproval,
    Succeeded,
    Failed,
    Cancelled,
    Interrupted,
    /// Never started: a newer push of the same branch came first.
    Superseded,
}

/// The statuses of a deployment that has not ended, as SQL (`status IN …`).
pub const ACTIVE_STATUSES_SQL: &str =
    "('queued', 'running', 'waiting-for-window', 'awaiting-approval')";

impl DeploymentStatus {
    /// Whether it has not ended yet (queued, running, or waiting).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            DeploymentStatus::Queued
                | DeploymentStatus::Running
                | DeploymentStatus::WaitingForWindow
                | DeploymentStatus::AwaitingApproval
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentStatus::Queued => "queued",
            DeploymentStatus::Running => "running",
            DeploymentStatus::WaitingForWindow => "waiting-for-window",
            DeploymentStatus::AwaitingApproval => "awaiting-approval",
            DeploymentStatus::Succeeded => "succeeded",
            DeploymentStatus::Failed => "failed",
            DeploymentStatus::Cancelled => "cancelled",
            DeploymentStatus::Interrupted => "interrupted",
            DeploymentStatus::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

impl std::fmt::Display for DeploymentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A system a host runs or will run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemRef {
    pub path: Option<String>,
    pub generation: Option<u32>,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EventKind {
    DeploymentStarted {
        hosts: Vec<String>,
        strategy: String,
    },
    HostProbed {
        state: HostState,
        /// Boxed: a probe is much larger than the other events.
        probe: Option<Box<ProbeResult>>,
        error: Option<String>,
    },
    Planned {
        strategy: String,
        reason: String,
        phases: Vec<Vec<String>>,
        eta_seconds: f64,
        risk: String,
    },
    HostPlanned {
        action: String,
        reason: Option<String>,
    },
    StepStarted {
        step: Step,
    },
    StepFinished {
        step: Step,
        ok: bool,
        duration_ms: u64,
        message: Option<String>,
    },
    HostFinished {
        status: HostStatus,
        from: SystemRef,
        to: SystemRef,
        duration_ms: u64,
        error: Option<String>,
        /// What the host ran and booted when its part ended, as it said.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<HostSystems>,
    },
    DeploymentFinished {
        status: DeploymentStatus,
    },
    HealthChecked {
        phase: String,
        results: Vec<CheckResult>,
    },
    Log {
        message: String,
    },
    /// Hosts wait for their maintenance window (or are refused).
    WaitingForWindow {
        hosts: Vec<String>,
        reason: String,
        /// When the first of them may start (Unix ms).
        until: Option<i64>,
    },
    /// The deployment stopped at a gate (approval rules, a pause).
    GateOpened {
        gate: u32,
        gate_kind: GateKind,
        title: String,
        hosts: Vec<String>,
        /// Who still has to say yes.
        missing: String,
        deadline: Option<i64>,
    },
    /// A gate was approved, rejected, timed out or closed.
    GateDecided {
        gate: u32,
        state: GateState,
        by: Option<String>,
        reason: Option<String>,
    },
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::DeploymentStarted { .. } => "deployment-started",
            EventKind::HostProbed { .. } => "host-probed",
            EventKind::Planned { .. } => "planned",
            EventKind::HostPlanned { .. } => "host-planned",
            EventKind::StepStarted { .. } => "step-started",
            EventKind::StepFinished { .. } => "step-finished",
            EventKind::HostFinished { .. } => "host-finished",
            EventKind::DeploymentFinished { .. } => "deployment-finished",
            EventKind::HealthChecked { .. } => "health-checked",
            EventKind::Log { .. } => "log",
            EventKind::WaitingForWindow { .. } => "waiting-for-window",
            EventKind::GateOpened { .. } => "gate-opened",
            EventKind::GateDecided { .. } => "gate-decided",
        }
    }
}

/// One recorded event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the deployment's history (the events table's id).
    pub id: i64,
    pub deployment_id: i64,
    /// Unix milliseconds.
    pub at: i64,
    pub host: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// One attempt of a health check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// Unix milliseconds.
    pub at: i64,
    pub ok: bool,
    pub output: String,
}

/// One health check: its verdict (the last attempt) and its attempts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub check: String,
    pub ok: bool,
    pub attempts: u32,
    pub output: String,
    #[serde(default)]
    pub history: Vec<Attempt>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_use_the_documented_names() {
        assert_eq!(
            serde_json::to_string(&HostStatus::RolledBack).unwrap(),
            "\"rolled-back\""
        );
        assert_eq!(
            HostStatus::parse("rolled-back"),
            Some(HostStatus::RolledBack)
        );
        assert_eq!(HostStatus::parse("nope"), None);
        assert!(HostStatus::Unreachable.is_failure());
        assert!(!HostStatus::Skipped.is_failure());
        assert_eq!(
            DeploymentStatus::parse("interrupted"),
            Some(DeploymentStatus::Interrupted)
        );
        for status in [
            DeploymentStatus::Queued,
            DeploymentStatus::Running,
            DeploymentStatus::WaitingForWindow,
            DeploymentStatus::AwaitingApproval,
        ] {
            assert!(status.is_active());
            assert!(ACTIVE_STATUSES_SQL.contains(&format!("'{}'", status.as_str())));
            assert_eq!(DeploymentStatus::parse(status.as_str()), Some(status));
        }
        assert!(!DeploymentStatus::Cancelled.is_active());
    }

    #[test]
    fn events_round_trip_through_json() {
        let event = Event {
            id: 3,
            deployment_id: 1,
            at: 5,
            host: Some("web1".into()),
            kind: EventKind::StepFinished {
                step: Step::SetProfile,
                ok: true,
                duration_ms: 12,
                message: None,
            },
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["kind"], "step-finished");
        assert_eq!(json["step"], "set-profile");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }
}
