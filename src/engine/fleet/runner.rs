//! The runner of `exec`-like runs (`exec`, `upload-keys`): every selected
//! host in parallel (bounded), each recorded as a host run of the same
//! history as deployments, stored before anyone is told.
//!
//! A host that cannot be reached (refused, frozen, gone) is `unreachable`
//! within the connect timeout while the others finish. Such runs take no
//! lease of their own (`upload-keys` leases its hosts itself) and never
//! change a host's last known system or result.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{Event, EventKind, HostStatus, Step};
use nix_deploy_core::exec::ExecSpec;
use nix_deploy_core::fleet::HostMeta;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::run::{HostRun, RunKind};

use super::FleetContext;
use crate::engine::EngineError;
use crate::engine::host::recorder::Recorder;
use crate::now_ms;
use crate::store::{NewDeployment, StoreError};
use crate::transport::ssh::Connection;

/// One host's run in an exec-like run, with the recorder that stores it.
pub(crate) struct HostSlot {
    pub run: HostRun,
    recorder: Recorder,
}

impl HostSlot {
    /// One recorded step of this host (see [`Recorder::step`]).
    pub async fn record_step<T, E: std::fmt::Display>(
        &mut self,
        step: Step,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<Result<T, String>, StoreError> {
        self.recorder.step(&mut self.run, step, work).await
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a run does on one reachable host. It gets the host's connection and
/// gives it back, with the host's run as it ended.
pub(crate) type HostWork = Arc<
    dyn Fn(HostMeta, Connection, HostSlot) -> BoxFuture<Result<(HostSlot, Connection), StoreError>>
        + Send
        + Sync,
>;

/// Record a run of `kind` over `hosts` and do `work` on each reachable
/// one, at most `parallel_limit` at once; `cancel` stops starting hosts.
/// Returns the run's recorder and its host runs; the caller ends it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_on_hosts(
    cx: FleetContext<'_>,
    kind: RunKind,
    exec: Option<&ExecSpec>,
    hosts: Vec<HostMeta>,
    parallel_limit: usize,
    trigger: &str,
    requested_by: &str,
    sink: Option<mpsc::UnboundedSender<Event>>,
    cancel: CancellationToken,
    work: HostWork,
) -> Result<(Recorder, Vec<HostRun>), EngineError> {
    let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    let parallel_limit = parallel_limit.max(1);
    let id = cx
        .store
        .create_run(
            &NewDeployment {
                trigger: trigger.to_string(),
                requested_by: requested_by.to_string(),
                flake: cx.config.flake.clone(),
                flake_rev: None,
                strategy: kind.as_str().to_string(),
                options: DeployOptions {
                    parallel_limit,
                    ..DeployOptions::default()
                },
                hosts: names.clone(),
                queued: false,
                source: None,
            },
            kind,
            exec,
        )
        .await?;
    let recorder = Recorder::new(cx.store.clone(), id, sink);
    recorder
        .emit(
            None,
            EventKind::DeploymentStarted {
                hosts: names,
                strategy: kind.as_str().to_string(),
            },
        )
        .await?;
    for host in &hosts {
        recorder.save(&HostRun::new(id, &host.name)).await?;
    }
    // `nix-deploy cancel` (or the API) asks through the store.
    let watcher = {
        let store = cx.store.clone();
        let cancel = cancel.clone();
        AbortOnDrop(tokio::spawn(async move {
            while !cancel.is_cancelled() {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                if store.cancel_requested(id).await.unwrap_or(false) {
                    cancel.cancel();
                }
            }
        }))
    };
    let semaphore = Arc::new(Semaphore::new(parallel_limit));
    let mut tasks = JoinSet::new();
    for host in hosts {
        let semaphore = semaphore.clone();
        let recorder = recorder.clone();
        let cancel = cancel.clone();
        let work = work.clone();
        let ssh = cx.config.ssh.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let mut slot = HostSlot {
                run: HostRun::new(recorder.deployment_id(), &host.name),
                recorder: recorder.clone(),
            };
            slot.run.time.started_at = Some(now_ms());
            if cancel.is_cancelled() {
                slot.run.status = HostStatus::Cancelled;
                slot.run.reason = Some("cancelled before this host started".into());
            } else {
                slot.run.status = HostStatus::Running;
                recorder.save(&slot.run).await?;
                match Connection::connect(&host.name, &host.target, &ssh).await {
                    Err(e) => {
                        slot.run.status = HostStatus::Unreachable;
                        slot.run.error = Some(e.to_string());
                    }
                    Ok(connection) => {
                        let (done, connection) = work(host, connection, slot).await?;
                        slot = done;
                        connection.close().await;
                    }
                }
            }
            finish(&recorder, &mut slot.run).await?;
            Ok::<HostRun, StoreError>(slot.run)
        });
    }
    let mut runs = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let run = joined.map_err(|e| EngineError::Internal(format!("host task failed: {e}")))??;
        runs.push(run);
    }
    drop(watcher);
    runs.sort_by(|a, b| a.host.cmp(&b.host));
    Ok((recorder, runs))
}

/// A background task that stops with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A host of an exec-like run is done: stored, then told. (Not a
/// deployment: the host's last known system and result stay as they were.)
async fn finish(recorder: &Recorder, run: &mut HostRun) -> Result<(), StoreError> {
    if run.time.finished_at.is_none() {
        run.time.finished_at = Some(now_ms());
    }
    if run.status == HostStatus::Running {
        run.status = HostStatus::Failed;
    }
    run.step = None;
    recorder.save(run).await?;
    recorder
        .emit(
            Some(&run.host),
            EventKind::HostFinished {
                status: run.status,
                from: run.from.clone(),
                to: run.to.clone(),
                duration_ms: run.duration_ms().unwrap_or(0).max(0) as u64,
                error: run.error.clone(),
                after: None,
            },
        )
        .await
}
