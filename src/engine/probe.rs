//! Asking hosts what they run: one SSH round trip per host, in parallel and
//! bounded; what the planner needs to know about each (its history too);
//! change summaries; and `plan`, which probes and plans without touching
//! anything (and says which hosts are pending a reboot, and whose kernel or
//! initrd changes).
//!
//! Probing may start while the fleet still evaluates ([`EarlyProbes`]): a
//! probe changes nothing. Its result is recorded only once the request is
//! validated, and it is taken again if another run may have changed the
//! host since.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{EventKind, HostState, HostStatus, SystemRef};
use nix_deploy_core::fleet::{Host, Selection};
use nix_deploy_core::goal;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::plan::{self, HostFacts, HostHistory};
use nix_deploy_core::remote::{self, ProbeResult};
use nix_deploy_core::render;
use nix_deploy_core::reports::PlanReport;
use nix_deploy_core::summary::{self, ChangeSummary};

use super::prepare::Purpose;
use super::reboot::local_boot_files;
use super::recorder::Recorder;
use super::{Engine, EngineError};
use crate::nix::Nix;
use crate::now_ms;
use crate::transport::ssh::{Connection, SshOptions};

/// A host as probed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Assessment {
    pub host: Host,
    pub state: HostState,
    pub current: SystemRef,
    pub probe: Option<ProbeResult>,
    pub error: Option<String>,
    /// Undecided activations a dead coordinator left, settled before this
    /// probe (one line each).
    pub settled: Vec<String>,
}

/// Whether probing may change a host to settle what a dead coordinator left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Settle {
    /// Commands that touch hosts settle undecided activations first, so no
    /// old watchdog can switch a host back after them.
    Yes {
        /// How long an abandoned activation may still take to end.
        activation_timeout: Duration,
    },
    /// Read-only commands report them.
    No,
}

/// Connect and probe one host. Never fails: an unreachable host is a result.
/// With [`Settle::Yes`], activations a dead coordinator left undecided are
/// settled first (switched back, as their watchdogs would), then the host
/// is probed again.
pub(super) async fn probe_host(
    host: Host,
    options: &SshOptions,
    settle: Settle,
) -> (Assessment, Option<Connection>) {
    let (assessment, connection) = probe_once(host, options).await;
    let Settle::Yes { activation_timeout } = settle else {
        return (assessment, connection);
    };
    let Some(connection) = connection else {
        return (assessment, None);
    };
    if assessment
        .probe
        .as_ref()
        .is_none_or(|p| p.pending.is_empty())
    {
        return (assessment, Some(connection));
    }
    let settled = connection
        .run_privileged(
            "settle",
            &remote::settle_argv(activation_timeout.as_secs().max(1)),
            activation_timeout + Duration::from_secs(120),
        )
        .await;
    let lines: Vec<String> = match settled {
        Ok(out) => out.stdout.lines().map(str::to_string).collect(),
        Err(e) => vec![format!("could not settle: {e}")],
    };
    connection.close().await;
    // Probe again: what the host runs now is what counts.
    let (mut again, connection) = probe_once(assessment.host, options).await;
    again.settled = lines;
    (again, connection)
}

async fn probe_once(host: Host, options: &SshOptions) -> (Assessment, Option<Connection>) {
    let unreachable = |host: Host, error: String| Assessment {
        host,
        state: HostState::Unreachable,
        current: SystemRef::default(),
        probe: None,
        error: Some(error),
        settled: Vec::new(),
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
            let state = plan::classify(
                probe.current_system.as_deref(),
                probe.profile_system.as_deref(),
                &host.toplevel,
            );
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
                    settled: Vec::new(),
                },
                Some(connection),
            )
        }
        Err(e) => {
            connection.close().await;
            let error = render::host_error(&host.name, "probe", &e.to_string());
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
    let old = current_closure(connection).await;
    new_closure_summary(nix, &old, built).await
}

/// The closure of the system the host runs: empty when it has none yet (or
/// it cannot be read; the summary is informational).
pub(super) async fn current_closure(connection: &Connection) -> Vec<String> {
    match connection
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
        Err(_) => Vec::new(),
    }
}

/// What changes from the closure `old` to `built`'s.
pub(super) async fn new_closure_summary(
    nix: &Nix,
    old: &[String],
    built: &str,
) -> Result<ChangeSummary, String> {
    let new = nix.closure(built).await.map_err(|e| e.to_string())?;
    Ok(summary::summarize(old, &new))
}

/// What a probe found, and its connection.
type Probed = (Assessment, Option<Connection>);

/// Probes started while the fleet still evaluates, at most `limit` at once.
pub(super) struct EarlyProbes {
    /// When the first could have started: a host changed by another run
    /// after this is probed again.
    started_at_ms: i64,
    semaphore: Arc<Semaphore>,
    ssh: SshOptions,
    /// Probes not started yet give up when this is cancelled.
    stop: CancellationToken,
    tasks: JoinSet<Option<Probed>>,
}

impl EarlyProbes {
    pub fn new(limit: usize, ssh: SshOptions) -> Self {
        EarlyProbes {
            started_at_ms: now_ms(),
            semaphore: Arc::new(Semaphore::new(limit.max(1))),
            ssh,
            stop: CancellationToken::new(),
            tasks: JoinSet::new(),
        }
    }

    /// Probe `host` (in the background).
    pub fn spawn(&mut self, host: Host) {
        let semaphore = self.semaphore.clone();
        let ssh = self.ssh.clone();
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            if stop.is_cancelled() {
                return None;
            }
            // Before validation and leases: read only.
            Some(probe_host(host, &ssh, Settle::No).await)
        });
    }

    /// The request was refused: probes not started do not start, the
    /// others end and their connections are closed.
    pub async fn discard(mut self) {
        self.stop.cancel();
        while let Some(joined) = self.tasks.join_next().await {
            if let Ok(Some((_, Some(connection)))) = joined {
                connection.close().await;
            }
        }
    }

    /// Every probe's result, by host name.
    async fn collect(mut self) -> Result<BTreeMap<String, Probed>, EngineError> {
        let mut probed = BTreeMap::new();
        while let Some(joined) = self.tasks.join_next().await {
            let result =
                joined.map_err(|e| EngineError::Internal(format!("probe task failed: {e}")))?;
            if let Some((assessment, connection)) = result {
                probed.insert(assessment.host.name.clone(), (assessment, connection));
            }
        }
        Ok(probed)
    }
}

/// Listing a closure on a host: a bounded query, however large the system.
const CLOSURE_QUERY_TIMEOUT: Duration = Duration::from_secs(120);

impl Engine {
    /// Probe hosts in parallel, reusing what `early` probes found (unless
    /// another run may have changed the host since). Returns each
    /// assessment and its open connection, in the order of `hosts`, once
    /// every probe is recorded.
    pub(super) async fn probe_all(
        &self,
        hosts: Vec<Host>,
        recorder: Option<&Recorder>,
        settle: Settle,
        early: Option<EarlyProbes>,
    ) -> Result<Vec<(Assessment, Option<Connection>)>, EngineError> {
        let mut ready = match early {
            Some(early) => {
                let since = early.started_at_ms;
                let mut ready = early.collect().await?;
                let wanted: BTreeSet<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
                let probed: Vec<String> = ready.keys().cloned().collect();
                let mut stale: BTreeSet<String> = self
                    .store
                    .hosts_touched_since(&probed, since)
                    .await?
                    .into_iter()
                    .collect();
                stale.extend(probed.into_iter().filter(|n| !wanted.contains(n.as_str())));
                // An early probe only looks: a host with undecided
                // activations is probed again, settling them, now that it
                // is leased.
                if settle != Settle::No {
                    stale.extend(
                        ready
                            .iter()
                            .filter(|(_, (a, _))| {
                                a.probe.as_ref().is_some_and(|p| !p.pending.is_empty())
                            })
                            .map(|(name, _)| name.clone()),
                    );
                }
                for name in stale {
                    if let Some((_, Some(connection))) = ready.remove(&name) {
                        connection.close().await;
                    }
                }
                ready
            }
            None => BTreeMap::new(),
        };
        let semaphore = Arc::new(Semaphore::new(self.config.probe_limit.max(1)));
        let mut tasks = JoinSet::new();
        let mut results = Vec::new();
        for (index, host) in hosts.into_iter().enumerate() {
            if let Some(done) = ready.remove(&host.name) {
                results.push((index, done));
                continue;
            }
            let semaphore = semaphore.clone();
            let options = self.config.ssh.clone();
            tasks.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                (index, probe_host(host, &options, settle).await)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            results.push(
                joined.map_err(|e| EngineError::Internal(format!("probe task failed: {e}")))?,
            );
        }
        results.sort_by_key(|(index, _)| *index);
        let mut probed = Vec::with_capacity(results.len());
        for (_, (assessment, connection)) in results {
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
                        .and_then(|p| p.profile_system.as_deref()),
                )
                .await?;
            if let Some(recorder) = recorder {
                for line in &assessment.settled {
                    recorder
                        .log(
                            Some(&assessment.host.name),
                            format!("settled an activation a stopped coordinator left: {line}"),
                        )
                        .await?;
                }
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
            probed.push((assessment, connection));
        }
        Ok(probed)
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
        let mut prepared = self.prepare(selection, options, Purpose::PLAN).await?;
        let early = prepared.early.take();
        let probed = self
            .probe_all(std::mem::take(&mut prepared.hosts), None, Settle::No, early)
            .await?;
        let mut facts = Vec::new();
        let (mut pending_reboot, mut reboot_required) = (Vec::new(), Vec::new());
        for (assessment, connection) in probed {
            let name = assessment.host.name.clone();
            if let Some(probe) = &assessment.probe
                && goal::pending_reboot(
                    probe.current_system.as_deref(),
                    probe.profile_system.as_deref(),
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
        let mut plan = plan::plan(
            &facts,
            &prepared.graph,
            prepared.inventory.len() + prepared.evaluation.failed.len(),
            options,
        )?;
        for host in &mut plan.hosts {
            host.eval_cached = prepared.eval_cached.contains(&host.name);
        }
        let mut report = PlanReport::new(
            &self.config.flake,
            prepared.inventory.len() + prepared.evaluation.failed.len(),
            plan,
        );
        report.evaluation = prepared.evaluation;
        report.pending_reboot = pending_reboot;
        report.reboot_required = reboot_required;
        Ok(report)
    }
}
