//! Asking hosts what they run: one SSH round trip per host, in parallel and
//! bounded; what the planner needs to know about each (its history too);
//! change summaries; and `plan`, which probes and plans without touching
//! anything (and says which hosts are pending a reboot, and whose kernel or
//! initrd changes).

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use nix_deploy_core::events::{EventKind, HostState, HostStatus, SystemRef};
use nix_deploy_core::fleet::{Host, Selection};
use nix_deploy_core::goal;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::plan::{self, HostFacts, HostHistory};
use nix_deploy_core::remote::{self, ProbeResult};
use nix_deploy_core::reports::PlanReport;
use nix_deploy_core::summary::{self, ChangeSummary};

use super::reboot::local_boot_files;
use super::recorder::Recorder;
use super::{Engine, EngineError};
use crate::nix::Nix;
use crate::transport::ssh::{Connection, SshOptions};

/// A host as probed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Assessment {
    pub host: Host,
    pub state: HostState,
    pub current: SystemRef,
    pub probe: Option<ProbeResult>,
    pub error: Option<String>,
}

/// Connect and probe one host. Never fails: an unreachable host is a result.
pub(super) async fn probe_host(
    host: Host,
    options: &SshOptions,
) -> (Assessment, Option<Connection>) {
    let unreachable = |host: Host, error: String| Assessment {
        host,
        state: HostState::Unreachable,
        current: SystemRef::default(),
        probe: None,
        error: Some(error),
    };
    let connection = match Connection::connect(&host.name, &host.target, options).await {
        Ok(c) => c,
        Err(e) => return (unreachable(host, e.to_string()), None),
    };
    let output = match connection
        .run("probe", &remote::probe_argv(), options.command_timeout)
        .await
    {
        Ok(o) => o,
        Err(e) => {
            connection.close().await;
            return (unreachable(host, e.to_string()), None);
        }
    };
    match remote::parse_probe(&output.stdout) {
        Ok(probe) => {
            let state = plan::classify(probe.current_system.as_deref(), &host.toplevel);
            let current = SystemRef {
                path: probe.current_system.clone(),
                generation: probe.generation,
            };
            (
                Assessment {
                    host,
                    state,
                    current,
                    probe: Some(probe),
                    error: None,
                },
                Some(connection),
            )
        }
        Err(e) => {
            connection.close().await;
            let error = format!("{}: probe: {e}", host.name);
            (unreachable(host, error), None)
        }
    }
}

/// Compare the closure of `built` (the host's new toplevel, already built
/// locally) with the one the host runs (queried on the host; nothing is copied).
pub(super) async fn change_summary(
    nix: &Nix,
    connection: &Connection,
    built: &str,
) -> Result<ChangeSummary, String> {
    let new = nix.closure(built).await.map_err(|e| e.to_string())?;
    let old = match connection
        .run(
            "summary",
            &remote::closure_argv("/run/current-system"),
            CLOSURE_QUERY_TIMEOUT,
        )
        .await
    {
        Ok(out) => out
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        // A host with no system yet has no closure to compare with.
        Err(_) => Vec::new(),
    };
    Ok(summary::summarize(&old, &new))
}

/// Listing a closure on a host: a bounded query, however large the system.
const CLOSURE_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

impl Engine {
    /// Probe hosts in parallel. Returns each assessment and its open connection.
    pub(super) async fn probe_all(
        &self,
        hosts: Vec<Host>,
        recorder: Option<&Recorder>,
    ) -> Result<Vec<(Assessment, Option<Connection>)>, EngineError> {
        let semaphore = Arc::new(Semaphore::new(self.config.probe_limit.max(1)));
        let mut tasks = JoinSet::new();
        for (index, host) in hosts.into_iter().enumerate() {
            let semaphore = semaphore.clone();
            let options = self.config.ssh.clone();
            tasks.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                (index, probe_host(host, &options).await)
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (index, (assessment, connection)) =
                joined.map_err(|e| EngineError::Internal(format!("probe task failed: {e}")))?;
            self.store
                .record_probe(
                    &assessment.host.name,
                    &assessment.current,
                    assessment.error.as_deref(),
                )
                .await?;
            self.store
                .record_boot_default(
                    &assessment.host.name,
                    assessment
                        .probe
                        .as_ref()
                        .and_then(|p| p.boot_default.as_deref()),
                )
                .await?;
            if let Some(recorder) = recorder {
                recorder
                    .emit(
                        Some(&assessment.host.name),
                        EventKind::HostProbed {
                            state: assessment.state,
                            probe: assessment.probe.clone(),
                            error: assessment.error.clone(),
                        },
                    )
                    .await?;
            }
            results.push((index, assessment, connection));
        }
        results.sort_by_key(|(index, _, _)| *index);
        Ok(results.into_iter().map(|(_, a, c)| (a, c)).collect())
    }

    /// What the planner knows about a probed host.
    pub(super) async fn facts(
        &self,
        assessment: &Assessment,
        summary: Option<ChangeSummary>,
    ) -> Result<HostFacts, EngineError> {
        Ok(HostFacts {
            name: assessment.host.name.clone(),
            role: assessment.host.role.clone(),
            state: assessment.state,
            current: assessment.current.clone(),
            target_path: assessment.host.toplevel.clone(),
            probe_error: assessment.error.clone(),
            summary,
            history: self.history(&assessment.host.name).await?,
        })
    }

    async fn history(&self, host: &str) -> Result<HostHistory, EngineError> {
        let runs = self.store.recent_host_runs(host, 10).await?;
        let fleet = self.store.recent_successful_durations(200).await?;
        Ok(HostHistory {
            successful_ms: runs
                .iter()
                .filter(|r| r.status == HostStatus::Deployed)
                .filter_map(|r| r.duration_ms())
                .map(|ms| ms.max(0) as u64)
                .collect(),
            recent_failures: runs
                .iter()
                .take(5)
                .filter(|r| r.status.is_failure() && r.status != HostStatus::Unreachable)
                .count() as u32,
            fleet_median_ms: plan::median_ms(&fleet),
        })
    }

    /// What a deployment would do. Changes nothing on any host; with
    /// `summaries`, builds the changed toplevels locally to compare closures.
    pub async fn plan(
        &self,
        selection: &Selection,
        options: &DeployOptions,
        summaries: bool,
    ) -> Result<PlanReport, EngineError> {
        let prepared = self.prepare(selection, options).await?;
        let probed = self.probe_all(prepared.hosts, None).await?;
        let mut facts = Vec::new();
        let (mut pending_reboot, mut reboot_required) = (Vec::new(), Vec::new());
        for (assessment, connection) in probed {
            let name = assessment.host.name.clone();
            if let Some(probe) = &assessment.probe
                && goal::pending_reboot(
                    probe.current_system.as_deref(),
                    probe.boot_default.as_deref(),
                )
            {
                pending_reboot.push(name.clone());
            }
            let summary = match (&connection, summaries, assessment.state) {
                (Some(connection), true, HostState::Changed) => {
                    let nix = &self.config.nix;
                    match nix.build(&assessment.host.drv_path, |_, _| {}).await {
                        Ok(built) => {
                            let booted = assessment
                                .probe
                                .as_ref()
                                .map(|p| p.booted.clone())
                                .unwrap_or_default();
                            if goal::boot_changed(&booted, &local_boot_files(&built)) == Some(true)
                            {
                                reboot_required.push(name.clone());
                            }
                            change_summary(nix, connection, &built).await.ok()
                        }
                        Err(_) => None,
                    }
                }
                _ => None,
            };
            if let Some(connection) = connection {
                connection.close().await;
            }
            facts.push(self.facts(&assessment, summary).await?);
        }
        let plan = plan::plan(&facts, &prepared.graph, prepared.inventory.len(), options)?;
        let mut report = PlanReport::new(&self.config.flake, prepared.inventory.len(), plan);
        report.pending_reboot = pending_reboot;
        report.reboot_required = reboot_required;
        Ok(report)
    }
}
