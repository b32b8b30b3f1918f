//! `nix-deploy exec`: one command on many hosts at once, over the same SSH
//! layer as deployments, with one summary. And the runner it shares with
//! `upload-keys`: every selected host in parallel (bounded), each recorded
//! as a host run of the same history as deployments, stored before anyone
//! is told.
//!
//! A host that cannot be reached (refused, frozen, gone) is `unreachable`
//! within the connect timeout while the others finish; a command that exits
//! non-zero or runs past its timeout is `failed`; exit 0 is `succeeded`. The
//! command is an argument vector, never pasted into a shell. Exec takes no
//! lease: it may look at a host another deployment is changing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{Event, EventKind, HostStatus, Step};
use nix_deploy_core::exec::{CommandOutput, ExecSpec};
use nix_deploy_core::fleet::{Host, Selection};
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::run::{Deployment, HostRun, RunKind};

use super::recorder::Recorder;
use super::{Engine, EngineError};
use crate::now_ms;
use crate::store::{NewDeployment, StoreError};
use crate::transport::ssh::{Connection, SshError, Streamed};

/// One host's run in an exec-like run, with the recorder that stores it.
pub(super) struct HostSlot {
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
pub(super) type HostWork = Arc<
    dyn Fn(Host, Connection, HostSlot) -> BoxFuture<Result<(HostSlot, Connection), StoreError>>
        + Send
        + Sync,
>;

/// An `exec` request, resolved.
#[derive(Clone, Debug)]
pub struct ExecJob {
    pub selection: Selection,
    pub spec: ExecSpec,
    pub trigger: String,
    pub requested_by: String,
}

impl Engine {
    /// Run the job's command on every selected host. Bad input (flake,
    /// selection) is an error before anything is recorded or touched.
    pub async fn exec(
        &self,
        job: ExecJob,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<Deployment, EngineError> {
        self.store.mark_interrupted().await?;
        if let Some(config) = &self.config.ssh.config_file
            && !config.is_file()
        {
            return Err(EngineError::BadOption(format!(
                "--ssh-config {} does not exist",
                config.display()
            )));
        }
        let hosts = self.selected_hosts(&job.selection).await?;
        let spec = job.spec.clone();
        // A command still running when the run is cancelled (or the daemon
        // stops) is stopped on its host.
        let stop = cancel.clone();
        let work: HostWork = Arc::new(move |_host, connection, slot| {
            let spec = spec.clone();
            let stop = stop.clone();
            Box::pin(async move { run_command(spec, connection, slot, &stop).await })
        });
        self.run_on_hosts(
            RunKind::Exec,
            Some(&job.spec),
            hosts,
            job.spec.parallel_limit,
            &job.trigger,
            &job.requested_by,
            sink,
            cancel,
            work,
        )
        .await
    }

    /// Record a run of `kind` over `hosts` and do `work` on each reachable
    /// one, at most `parallel_limit` at once; `cancel` stops starting hosts.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run_on_hosts(
        &self,
        kind: RunKind,
        exec: Option<&ExecSpec>,
        hosts: Vec<Host>,
        parallel_limit: usize,
        trigger: &str,
        requested_by: &str,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
        work: HostWork,
    ) -> Result<Deployment, EngineError> {
        let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        let parallel_limit = parallel_limit.max(1);
        let id = self
            .store
            .create_run(
                &NewDeployment {
                    trigger: trigger.to_string(),
                    requested_by: requested_by.to_string(),
                    flake: self.config.flake.clone(),
                    flake_rev: None,
                    strategy: kind.as_str().to_string(),
                    options: DeployOptions {
                        parallel_limit,
                        ..DeployOptions::default()
                    },
                    hosts: names.clone(),
                    queued: false,
                },
                kind,
                exec,
            )
            .await?;
        let recorder = Recorder::new(self.store.clone(), id, sink);
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
            let store = self.store.clone();
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
            let ssh = self.config.ssh.clone();
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
            let run =
                joined.map_err(|e| EngineError::Internal(format!("host task failed: {e}")))??;
            runs.push(run);
        }
        drop(watcher);
        runs.sort_by(|a, b| a.host.cmp(&b.host));
        self.finish(&recorder, runs, None, &cancel).await
    }
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
            },
        )
        .await
}

/// Why a command did not succeed, in words.
fn verdict(spec: &ExecSpec, streamed: &Streamed) -> Result<(), String> {
    if streamed.cancelled {
        return Err(format!(
            "`{}` was stopped on the host: the run was cancelled",
            spec.display()
        ));
    }
    if streamed.timed_out {
        return Err(format!(
            "`{}` did not finish within {}: it was stopped on the host",
            spec.display(),
            nix_deploy_core::duration::format(spec.timeout)
        ));
    }
    match streamed.exit_code {
        Some(0) => Ok(()),
        Some(code) => Err(format!("`{}` exited with code {code}", spec.display())),
        None => Err(format!("`{}` was killed by a signal", spec.display())),
    }
}

/// Run the command on one host and record how it ended; `stop` stops it
/// there (the host is then `cancelled`, with what it printed).
async fn run_command(
    spec: ExecSpec,
    connection: Connection,
    mut slot: HostSlot,
    stop: &CancellationToken,
) -> Result<(HostSlot, Connection), StoreError> {
    let mut streamed: Option<Streamed> = None;
    let mut lost: Option<SshError> = None;
    let verdict = slot
        .record_step(Step::Exec, async {
            match connection
                .run_streaming("exec", &spec.command, spec.timeout, stop)
                .await
            {
                Ok(result) => {
                    let verdict = verdict(&spec, &result);
                    streamed = Some(result);
                    verdict
                }
                Err(e) => {
                    let message = e.to_string();
                    lost = Some(e);
                    Err(message)
                }
            }
        })
        .await?;
    let run = &mut slot.run;
    let cancelled = streamed.as_ref().is_some_and(|s| s.cancelled);
    if let Some(result) = streamed {
        run.output = Some(CommandOutput {
            exit_code: result.exit_code,
            stdout: result.stdout.text(),
            stderr: result.stderr.text(),
            withheld: false,
        });
    }
    match verdict {
        Ok(()) => run.status = HostStatus::Succeeded,
        Err(message) if cancelled => {
            run.status = HostStatus::Cancelled;
            run.reason = Some(message);
        }
        Err(message) => {
            run.status = match lost {
                Some(e) if e.is_connection() => HostStatus::Unreachable,
                _ => HostStatus::Failed,
            };
            run.error = Some(message);
        }
    }
    Ok((slot, connection))
}
