//! Asking every selected host what it runs: one probe per host
//! ([`crate::engine::host::observe`]), in parallel and bounded, recorded
//! once the request is validated; and what the planner needs to know about
//! each (its history too).
//!
//! Probing may start while the fleet still evaluates ([`EarlyProbes`]): a
//! probe changes nothing. Its result is recorded only once the request is
//! validated, and it is taken again if another run may have changed the
//! host since.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{EventKind, HostStatus};
use nix_deploy_core::fleet::{Host, HostMeta};
use nix_deploy_core::plan::{self, HostFacts, HostHistory};
use nix_deploy_core::summary::ChangeSummary;

use super::FleetContext;
use crate::engine::EngineError;
use crate::engine::host::fence::HostFence;
use crate::engine::host::observe::{Assessment, Settle, probe_host};
use crate::engine::host::recorder::Recorder;
use crate::now_ms;
use crate::transport::ssh::{Connection, SshOptions};

/// What a probe found, and its connection.
type Probed = (Assessment, Option<Connection>);

/// Probes started while the fleet still evaluates, at most `limit` at once.
pub(crate) struct EarlyProbes {
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

/// Probe hosts in parallel, reusing what `early` probes found (unless
/// another run may have changed the host since). Returns each
/// assessment and its open connection, in the order of `hosts`, once
/// every probe is recorded.
pub(crate) async fn probe_all(
    cx: FleetContext<'_>,
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
            let mut stale: BTreeSet<String> = cx
                .store
                .hosts_touched_since(&probed, since)
                .await?
                .into_iter()
                .collect();
            stale.extend(probed.into_iter().filter(|n| !wanted.contains(n.as_str())));
            // An early probe only looks: a host with undecided
            // activations is probed again, settling them, now that it
            // is leased.
            if matches!(settle, Settle::Yes { .. }) {
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
    let semaphore = Arc::new(Semaphore::new(cx.config.probe_limit.max(1)));
    let mut tasks = JoinSet::new();
    let mut results = Vec::new();
    for (index, host) in hosts.into_iter().enumerate() {
        if let Some(done) = ready.remove(&host.name) {
            results.push((index, done));
            continue;
        }
        let semaphore = semaphore.clone();
        let options = cx.config.ssh.clone();
        let settle = settle.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            (index, probe_host(host, &options, settle).await)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.map_err(|e| EngineError::Internal(format!("probe task failed: {e}")))?);
    }
    results.sort_by_key(|(index, _)| *index);
    // A host that refused our epoch: another coordinator holds the
    // deployment now, and nothing of this probe is ours to record.
    if let Settle::Yes {
        fence: Some(fence), ..
    } = &settle
        && let Err(e) = fence.held()
    {
        for (_, (_, connection)) in results {
            if let Some(connection) = connection {
                connection.close().await;
            }
        }
        return Err(e.into());
    }
    let mut probed = Vec::with_capacity(results.len());
    for (_, (assessment, connection)) in results {
        cx.store
            .record_probe(
                &assessment.host.name,
                &assessment.current,
                assessment.error.as_deref(),
            )
            .await?;
        cx.store
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
                        probe: assessment.probe.clone().map(Box::new),
                        error: assessment.error.clone(),
                    },
                )
                .await?;
        }
        probed.push((assessment, connection));
    }
    Ok(probed)
}

/// Raise the deployment's fence (see `engine::host::fence`) on `hosts`:
/// hosts an earlier holder of the deployment finished, which this run does
/// not probe, so that holder, paused and woken, cannot switch them back. In
/// parallel, bounded like probes. A host that cannot be reached is said in
/// the deployment's events; one that refuses means another coordinator
/// holds the deployment (refused with `StoreError::Superseded`).
pub(crate) async fn fence_hosts(
    cx: FleetContext<'_>,
    hosts: Vec<HostMeta>,
    fence: &HostFence,
    recorder: &Recorder,
) -> Result<(), EngineError> {
    let semaphore = Arc::new(Semaphore::new(cx.config.probe_limit.max(1)));
    let mut tasks = JoinSet::new();
    for host in hosts {
        let semaphore = semaphore.clone();
        let ssh = cx.config.ssh.clone();
        let fence = fence.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let raised = crate::engine::host::fence::raise(&host, &ssh, &fence).await;
            (host.name, raised)
        });
    }
    let mut failed = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(e))) => failed.push((name, e)),
            Err(e) => return Err(EngineError::Internal(format!("fence task failed: {e}"))),
        }
    }
    fence.held()?;
    failed.sort();
    for (name, error) in failed {
        recorder
            .log(
                Some(&name),
                format!("warning: could not record this deployment's new epoch on the host ({error}): an earlier holder of the deployment that still runs could switch it back"),
            )
            .await?;
    }
    Ok(())
}

/// What the planner knows about a probed host.
pub(crate) async fn facts(
    cx: FleetContext<'_>,
    assessment: &Assessment,
    summary: Option<ChangeSummary>,
) -> Result<HostFacts, EngineError> {
    Ok(HostFacts {
        name: assessment.host.name.clone(),
        role: assessment.host.role.clone(),
        state: assessment.state,
        current: assessment.current.clone(),
        target_path: assessment.host.toplevel().to_string(),
        probe_error: assessment.error.clone(),
        summary,
        history: history(cx, &assessment.host.name).await?,
    })
}

async fn history(cx: FleetContext<'_>, host: &str) -> Result<HostHistory, EngineError> {
    let runs = cx.store.recent_host_runs(host, 10).await?;
    let fleet = cx.store.recent_successful_durations(200).await?;
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
