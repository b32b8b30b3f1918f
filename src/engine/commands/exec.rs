//! `exec`: one command on many hosts at once, over the same SSH layer as
//! deployments, with one summary; and `upload-keys`: every key of the
//! selected hosts again, without deploying. Both are runs of the fleet's
//! runner, recorded like deployments.
//!
//! A command that exits non-zero or runs past its timeout is `failed`; exit
//! 0 is `succeeded`. The command is an argument vector, never pasted into a
//! shell. Exec takes no lease: it may look at a host another deployment is
//! changing.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{Event, HostStatus, Step};
use nix_deploy_core::exec::{CommandOutput, ExecSpec};
use nix_deploy_core::fleet::Selection;
use nix_deploy_core::keys::{Keep, Key};
use nix_deploy_core::run::{Deployment, RunKind};

use super::Engine;
use crate::engine::EngineError;
use crate::engine::fleet::evaluate;
use crate::engine::fleet::leases::Leases;
use crate::engine::fleet::runner::{self, HostSlot, HostWork};
use crate::engine::host::keys::{self, KeyTexts};
use crate::store::StoreError;
use crate::transport::ssh::{Connection, SshError, Streamed};

/// An `exec` request, resolved.
#[derive(Clone, Debug)]
pub struct ExecJob {
    pub selection: Selection,
    pub spec: ExecSpec,
    pub trigger: String,
    pub requested_by: String,
}

/// Who asked for an `upload-keys` run.
#[derive(Clone, Debug, Default)]
pub struct UploadKeysRequest {
    pub selection: Selection,
    pub parallel_limit: usize,
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
        self.preamble().await?;
        let (hosts, _) = evaluate::selected_hosts(self.fleet(), &job.selection).await?;
        let spec = job.spec.clone();
        // A command still running when the run is cancelled (or the daemon
        // stops) is stopped on its host.
        let stop = cancel.clone();
        let work: HostWork = Arc::new(move |_host, connection, slot| {
            let spec = spec.clone();
            let stop = stop.clone();
            Box::pin(async move { run_command(spec, connection, slot, &stop).await })
        });
        let (recorder, runs) = runner::run_on_hosts(
            self.fleet(),
            RunKind::Exec,
            Some(&job.spec),
            hosts,
            job.spec.parallel_limit,
            &job.trigger,
            &job.requested_by,
            sink,
            cancel.clone(),
            work,
        )
        .await?;
        self.finish(&recorder, runs, None, &cancel).await
    }

    /// `nix-deploy upload-keys`: every key of the selected hosts, again,
    /// without deploying. Hosts are leased (no deployment touches them
    /// meanwhile); a host without keys is skipped. Recorded as a run of kind
    /// `upload-keys`.
    pub async fn upload_keys(
        &self,
        request: UploadKeysRequest,
        sink: Option<mpsc::UnboundedSender<Event>>,
        cancel: CancellationToken,
    ) -> Result<Deployment, EngineError> {
        self.preamble().await?;
        let (hosts, source) = evaluate::selected_hosts(self.fleet(), &request.selection).await?;
        let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        let leases = Leases::acquire(&self.store, &names, false, &cancel, None).await?;
        let texts = std::sync::Arc::new(KeyTexts::new(
            &self.config.flake,
            source,
            &self.config.nix,
            &hosts.iter().collect::<Vec<_>>(),
        ));
        let work: HostWork = std::sync::Arc::new(move |host, connection, mut slot| {
            let texts = texts.clone();
            Box::pin(async move {
                if host.keys.is_empty() {
                    slot.run.status = HostStatus::Skipped;
                    slot.run.reason = Some("no deployment.keys".into());
                    return Ok((slot, connection));
                }
                let all: Vec<&Key> = host.keys.iter().collect();
                // It changes no system: nothing is kept to undo.
                let mut done = Vec::new();
                let work = keys::upload(
                    &connection,
                    &texts,
                    &host,
                    &all,
                    true,
                    Keep::Nothing,
                    &mut done,
                );
                let result = slot.record_step(Step::Keys, work).await?;
                // What was uploaded, also before a key that failed.
                slot.run.output = Some(CommandOutput {
                    exit_code: result.is_ok().then_some(0),
                    stdout: done.join("\n"),
                    stderr: String::new(),
                    withheld: false,
                });
                match result {
                    Ok(()) => slot.run.status = HostStatus::Succeeded,
                    Err(e) => {
                        slot.run.status = HostStatus::Failed;
                        slot.run.error = Some(e);
                    }
                }
                Ok((slot, connection))
            })
        });
        let result = match runner::run_on_hosts(
            self.fleet(),
            RunKind::UploadKeys,
            None,
            hosts,
            request.parallel_limit,
            &request.trigger,
            &request.requested_by,
            sink,
            cancel.clone(),
            work,
        )
        .await
        {
            Ok((recorder, runs)) => self.finish(&recorder, runs, None, &cancel).await,
            Err(e) => Err(e),
        };
        leases.release().await;
        result
    }
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
