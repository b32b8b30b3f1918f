//! Deployments and host runs as they are recorded and reported: one type per
//! document, the same for the store, the engine's result, the CLI's `--json`,
//! the API and the daemon's client.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::approval::Gate;
use crate::events::{DeploymentStatus, Event, HostStatus, Step, SystemRef};
use crate::exec::{CommandOutput, ExecSpec};
use crate::goal::Goal;
use crate::keys::KeyChanges;
use crate::options::DeployOptions;
use crate::plan::Plan;
use crate::promote::Promotion;
use crate::remote::HostSystems;
use crate::summary::ChangeSummary;

/// When something started and ended (Unix milliseconds). Documents carry the
/// duration too (`duration_ms`), derived, never stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl Span {
    pub fn duration_ms(&self) -> Option<i64> {
        Some(self.finished_at? - self.started_at?)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("started_at", &self.started_at)?;
        map.serialize_entry("finished_at", &self.finished_at)?;
        map.serialize_entry("duration_ms", &self.duration_ms())?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            started_at: Option<i64>,
            #[serde(default)]
            finished_at: Option<i64>,
            // Derived: read and dropped.
            #[serde(default, rename = "duration_ms")]
            _duration_ms: Option<i64>,
        }
        let raw = Raw::deserialize(d)?;
        Ok(Span {
            started_at: raw.started_at,
            finished_at: raw.finished_at,
        })
    }
}

/// The timing of one step of a host run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    pub step: Step,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub ok: Option<bool>,
}

/// One host's part in a deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRun {
    pub deployment_id: i64,
    #[serde(rename = "name", alias = "host")]
    pub host: String,
    pub status: HostStatus,
    /// The step in progress, while running.
    pub step: Option<String>,
    /// Whether the host ran something else than the evaluated system.
    pub changed: Option<bool>,
    pub from: SystemRef,
    pub to: SystemRef,
    #[serde(flatten)]
    pub time: Span,
    pub steps: Vec<StepTiming>,
    /// Why the host was skipped or what it waits for.
    pub reason: Option<String>,
    pub error: Option<String>,
    pub summary: Option<ChangeSummary>,
    /// The activation's token on the host (names the watchdog's files).
    pub token: Option<String>,
    /// What the deployment did to this host (absent: `switch`, or not a
    /// deployment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goal: Option<Goal>,
    /// A command's exit code and output tails (`exec`), or what a dry
    /// activation would do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<CommandOutput>,
    /// The host's reboot, when it rebooted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootRecord>,
    /// What the host ran and booted when its part ended, read from the
    /// host itself (absent when the run never touched it, or the host could
    /// not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<HostSystems>,
    /// What the way back did to the host's keys (put back, removed, not
    /// put back), or why it left them: keys follow the system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeyChanges>,
}

/// A reboot as it happened: the boot ids before and after, and what the
/// host ran when it was back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootRecord {
    pub boot_id_before: Option<String>,
    pub boot_id_after: Option<String>,
    /// `/run/current-system` once it was back.
    pub system: Option<String>,
}

impl HostRun {
    pub fn new(deployment_id: i64, host: &str) -> Self {
        HostRun {
            deployment_id,
            host: host.to_string(),
            status: HostStatus::Pending,
            step: None,
            changed: None,
            from: SystemRef::default(),
            to: SystemRef::default(),
            time: Span::default(),
            steps: Vec::new(),
            reason: None,
            error: None,
            summary: None,
            token: None,
            goal: None,
            output: None,
            reboot: None,
            after: None,
            keys: None,
        }
    }

    pub fn duration_ms(&self) -> Option<i64> {
        self.time.duration_ms()
    }

    /// Whether one of this host's own steps failed (a rolled-back host that
    /// failed, as against one rolled back because others did).
    pub fn failed_itself(&self) -> bool {
        self.steps
            .iter()
            .any(|s| s.ok == Some(false) && s.step != Step::Rollback)
    }
}

/// What a recorded run is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunKind {
    /// A deployment (or a rollback on request).
    #[default]
    Deploy,
    /// `nix-deploy exec`: a command on many hosts.
    Exec,
    /// `nix-deploy upload-keys`.
    UploadKeys,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Deploy => "deploy",
            RunKind::Exec => "exec",
            RunKind::UploadKeys => "upload-keys",
        }
    }

    pub fn parse(text: &str) -> RunKind {
        match text {
            "exec" => RunKind::Exec,
            "upload-keys" => RunKind::UploadKeys,
            _ => RunKind::Deploy,
        }
    }
}

/// What a deployment deploys, fixed when it starts: the flake's content
/// (a reference Nix resolves only to what was evaluated) and each host's
/// planned toplevel. `resume`, and every takeover, deploy exactly these
/// closures or refuse.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned {
    /// The pinned flake reference (absent when the flake's identity could
    /// not be read: then the toplevels alone are checked).
    pub flake: Option<String>,
    /// The flake's locked revision, when it had one.
    pub revision: Option<String>,
    /// Host → planned toplevel.
    pub hosts: std::collections::BTreeMap<String, String>,
    /// Host → its tags when the deployment started: a caller limited to
    /// some hosts may cancel or resume it only if every host is within
    /// reach.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, Vec<String>>,
    /// A promotion: where each host's system came from (`resume` fetches
    /// it from there again, never from the flake).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,
}

/// What a deployment waits for while it is `waiting-for-window`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowWait {
    /// The hosts outside their window.
    pub hosts: Vec<String>,
    pub reason: String,
    /// When the first of them may start (Unix ms; none within 400 days).
    pub opens_at: Option<i64>,
}

/// One deployment: the request, how it went, and its hosts' runs.
///
/// `created_at` is when it was requested; `started_at` when it began (later,
/// for a deployment that waited for busy hosts).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: i64,
    /// `deploy`, `exec` or `upload-keys` (rows from before kinds: `deploy`).
    #[serde(default)]
    pub kind: RunKind,
    pub created_at: i64,
    #[serde(flatten)]
    pub time: Span,
    pub status: DeploymentStatus,
    /// `cli`, `api`, `slack`, `github`.
    pub trigger: String,
    /// `user@machine`, `token:NAME`, `slack:USER`, `github:PUSHER`.
    pub requested_by: String,
    pub flake: String,
    pub flake_rev: Option<String>,
    /// The strategy's name, or `rollback` for a rollback on request.
    pub strategy: String,
    pub options: DeployOptions,
    /// The hosts the request selected.
    pub selected: Vec<String>,
    pub plan: Option<Plan>,
    pub error: Option<String>,
    /// The coordinator process that ran it.
    pub pid: Option<i64>,
    /// What it deploys, fixed when it started (absent: queued, or recorded
    /// before pins existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<Pinned>,
    /// `exec`: the command, its timeout and parallel limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecSpec>,
    /// Every host run, by host name.
    #[serde(default)]
    pub hosts: Vec<HostRun>,
    /// With `show`: everything that happened, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<Event>>,
    /// Approval gates and pauses it met: who approved, when, what they saw.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<Gate>,
    /// While it is `waiting-for-window`: for which hosts, why, and the next
    /// opening.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<WindowWait>,
}

impl Deployment {
    pub fn duration_ms(&self) -> Option<i64> {
        self.time.duration_ms()
    }

    /// Whether a host failed, was rolled back or could not be reached.
    pub fn any_failure(&self) -> bool {
        self.hosts.iter().any(|h| h.status.is_failure())
    }

    pub fn count(&self, status: HostStatus) -> usize {
        self.hosts.iter().filter(|h| h.status == status).count()
    }
}

/// What we last knew about a host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub current_path: Option<String>,
    pub generation: Option<u32>,
    pub probed_at: Option<i64>,
    pub probe_error: Option<String>,
    pub last_deployment_id: Option<i64>,
    pub last_status: Option<String>,
    pub last_error: Option<String>,
    pub last_finished_at: Option<i64>,
    /// The system the host boots next (its profile's generation).
    #[serde(default)]
    pub boot_path: Option<String>,
    /// Whether its next boot runs another system than the running one.
    #[serde(default)]
    pub pending_reboot: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_runs_carry_their_duration_and_keep_the_documented_names() {
        let mut run = HostRun::new(3, "web1");
        run.time = Span {
            started_at: Some(1_000),
            finished_at: Some(3_500),
        };
        let json = serde_json::to_value(&run).unwrap();
        assert_eq!(json["name"], "web1");
        assert_eq!(json["duration_ms"], 2_500);
        assert_eq!(json["started_at"], 1_000);
        let back: HostRun = serde_json::from_value(json).unwrap();
        assert_eq!(back, run);
        let old: HostRun = serde_json::from_value(serde_json::json!({
            "deployment_id": 1, "host": "a", "status": "deployed", "step": null,
            "changed": true, "from": {"path": null, "generation": null},
            "to": {"path": null, "generation": null}, "steps": [],
            "reason": null, "error": null, "summary": null, "token": null
        }))
        .unwrap();
        assert_eq!(old.host, "a");
        assert_eq!(old.duration_ms(), None);
    }
}
