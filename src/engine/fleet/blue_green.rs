//! Blue-green: every host was staged with `switch-to-configuration test` (the
//! old generation stays the boot default). When all are healthy, each is
//! committed (new profile generation, `switch-to-configuration boot`); if any
//! failed, every staged host goes back to its old system, and its keys with
//! it. All or nothing.

use std::collections::BTreeMap;

use nix_deploy_core::events::{HostStatus, Step};
use nix_deploy_core::remote::{self, Activation};
use nix_deploy_core::run::HostRun;

use crate::engine::host::activator;
use crate::engine::host::keys_back;
use crate::engine::host::observe::Assessment;
use crate::engine::host::pipeline::HostContext;
use crate::engine::host::way_back;
use crate::now_ms;
use crate::store::StoreError;
use crate::transport::ssh::Connection;

/// Commit every staged host if all are healthy and the deployment ran to its
/// end; else (a failure, a host not started, a cancel) revert all. `runs`
/// are the deployment's host runs, `done` the hosts that ran their pipeline
/// with their probe and connection.
pub(crate) async fn settle(
    context: &HostContext,
    runs: &mut BTreeMap<String, HostRun>,
    done: &mut BTreeMap<String, (Assessment, Connection)>,
    cancelled: bool,
) -> Result<(), StoreError> {
    let recorder = &context.recorder;
    let staged: Vec<String> = runs
        .values()
        .filter(|r| r.status == HostStatus::Running)
        .map(|r| r.host.clone())
        .collect();
    let failed: Vec<String> = runs
        .values()
        .filter(|r| {
            r.status.is_failure()
                || r.status == HostStatus::Cancelled
                || r.status == HostStatus::Skipped
                    && r.changed == Some(true)
                    && r.reason
                        .as_deref()
                        .is_some_and(|x| x.starts_with("not started"))
        })
        .map(|r| r.host.clone())
        .collect();
    let commit_all = failed.is_empty() && !cancelled;
    if cancelled {
        recorder
            .log(
                None,
                "blue-green: cancelled; every staged host goes back to its old system".into(),
            )
            .await?;
    } else if !commit_all {
        recorder
            .log(
                None,
                format!(
                    "blue-green: {} did not pass; every staged host goes back to its old system",
                    failed.join(", ")
                ),
            )
            .await?;
    }
    for host in staged {
        let (Some(run), Some((assessment, connection))) = (runs.remove(&host), done.get_mut(&host))
        else {
            continue;
        };
        let run = if commit_all {
            commit(context, run, assessment, connection).await?
        } else {
            let note = if cancelled {
                "blue-green: reverted to its old system because the deployment was cancelled"
                    .to_string()
            } else {
                format!(
                    "blue-green: reverted to its old system because {} failed",
                    failed.join(", ")
                )
            };
            way_back::take_back(
                context,
                run,
                assessment,
                connection,
                Activation::Test,
                note,
                "no previous system to return to",
            )
            .await?
        };
        runs.insert(host, run);
    }
    Ok(())
}

/// Make a staged host's system its profile's new generation and boot
/// default (`switch-to-configuration boot`, detached like every switch).
async fn commit(
    context: &HostContext,
    mut run: HostRun,
    assessment: &Assessment,
    connection: &mut Connection,
) -> Result<HostRun, StoreError> {
    let path = assessment.host.toplevel().to_string();
    let ssh = &context.ssh;
    let timeout = context.options.activation_timeout;
    let work = async {
        let link = connection
            .run_privileged(
                "commit",
                &remote::set_profile_argv(&path),
                ssh.command_timeout,
            )
            .await
            .map_err(|e| e.to_string())?;
        let token = activator::token();
        let switch = activator::Switch {
            host: &assessment.host,
            step: "commit",
            what: activator::What::Activate {
                system: &path,
                action: Activation::Boot,
                watchdog: None,
            },
            token: &token,
            systemd: assessment.probe.as_ref().is_some_and(|p| p.systemd),
            timeout,
            fence: &context.fence,
        };
        activator::run(connection, ssh, &switch).await?;
        Ok::<_, String>(remote::parse_generation_link(&link.stdout))
    };
    let result = context.recorder.step(&mut run, Step::Commit, work).await?;
    match result {
        Ok(generation) => {
            run.to.generation = generation;
            run.status = HostStatus::Deployed;
            // What its keys replaced is kept for `rollback`.
            keys_back::commit(context, connection, &assessment.host, &run).await?;
        }
        Err(e) => {
            run.status = HostStatus::Failed;
            run.error = Some(e);
        }
    }
    way_back::record_after(context, connection, &mut run).await;
    run.time.finished_at = Some(now_ms());
    context.recorder.finish_host(&mut run).await?;
    Ok(run)
}
