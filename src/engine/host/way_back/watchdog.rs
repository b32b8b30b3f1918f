//! Who decides an activation, the coordinator or the host's watchdog
//! ([`decide`], atomically on the host), and waiting for a watchdog that
//! switches its host back by itself ([`await_watchdog`]).

use std::time::{Duration, Instant};

use nix_deploy_core::events::{HostStatus, Step};
use nix_deploy_core::remote::{self, Decision};
use nix_deploy_core::run::HostRun;

use super::{conclude, describe, record_after, verify_restored};
use crate::engine::host::context::{HostContext, HostJob};
use crate::engine::host::keys_back;
use crate::store::StoreError;
use crate::transport::ssh::{Connection, SshError};

/// The host's watchdog switches it back by itself (the new system did not
/// let us in, or the watchdog decided first): wait for its result and
/// report what the host runs afterwards.
pub(super) async fn await_watchdog(
    context: &HostContext,
    job: &mut HostJob,
    error: String,
) -> Result<(), StoreError> {
    let (assessment, connection, run) = job.parts();
    let host = &assessment.host.name;
    let before = assessment.before.clone();
    let Some(token) = run.token.clone() else {
        run.status = HostStatus::Failed;
        run.error = Some(error);
        return Ok(());
    };
    // It decides one confirm window after the last extension, then runs
    // the old system's activation.
    let patience = context.options.confirm_timeout
        + context.options.activation_timeout
        + Duration::from_secs(60);
    let ssh = &context.ssh;
    let work = async {
        let deadline = Instant::now() + patience;
        loop {
            let result = connection
                .run(
                    "watchdog",
                    &remote::watchdog_result_argv(&token),
                    ssh.command_timeout,
                )
                .await;
            match result {
                Ok(out) if out.stdout.trim().starts_with("reverted") => break,
                Ok(out) if out.stdout.trim().starts_with("unconfirmed") => {
                    return Err(format!(
                        "{host}: watchdog: {} (nothing to switch back to)",
                        out.stdout.trim()
                    ));
                }
                Ok(out) if out.stdout.trim() == remote::NO_WATCHDOG => {
                    return Err(format!(
                        "{host}: watchdog: the host has no watchdog (magic rollback is off), so nothing switches it back by itself"
                    ));
                }
                Ok(out) if matches!(out.stdout.trim(), "confirmed" | "taken-back") => {
                    return Err(format!(
                        "{host}: watchdog: the activation was decided `{}` elsewhere",
                        out.stdout.trim()
                    ));
                }
                Err(e) if e.is_connection() => {
                    return Err(format!(
                        "{host}: watchdog: cannot reach the host to verify ({e}); its watchdog restores {} by itself",
                        describe(&before)
                    ));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(format!("{host}: watchdog: did not revert in time"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        verify_restored(connection, ssh, &before).await
    };
    let result = context.recorder.step(run, Step::Rollback, work).await?;
    record_after(context, connection, run).await;
    if result.is_ok() {
        keys_back::go_back(context, connection, &assessment.host, run, false).await?;
    } else {
        keys_back::left(
            context,
            run,
            "the host was not seen back on its old system (what they replaced stays kept on the host)",
        )
        .await?;
    }
    let note = format!(
        "{error}\nthe host's watchdog reverted it to {} by itself",
        describe(&before)
    );
    conclude(
        run,
        result,
        HostStatus::RolledBack,
        Some(note),
        Some(&error),
    );
    Ok(())
}

/// Who decided an activation.
pub(super) enum Decided {
    /// We did: its watchdog will not switch the host.
    Ours,
    /// Its watchdog did first, or the host could not be reached to decide
    /// (then the watchdog will): why.
    Elsewhere(String),
}

/// Decide the run's activation atomically against its watchdog. A run
/// without an activation has nothing to decide. A host refusing our epoch
/// leaves it to the deployment's new holder: then the deployment is lost
/// here, and the caller's next write (before it touches the host again) is
/// refused.
pub(super) async fn decide(
    connection: &Connection,
    context: &HostContext,
    run: &HostRun,
    decision: Decision,
) -> Decided {
    let Some(token) = &run.token else {
        return Decided::Ours;
    };
    match connection
        .run_privileged(
            "rollback",
            &remote::decide_argv(token, decision, context.fence.fence()),
            context.ssh.command_timeout,
        )
        .await
    {
        Ok(_) => Decided::Ours,
        Err(e) if context.fence.refused(connection.host(), &e) => {
            Decided::Elsewhere(format!("another coordinator holds the deployment: {e}"))
        }
        // Activated without a watchdog (magic rollback off): decided when
        // it ended, and nobody switches it back but us.
        Err(SshError::Exit { code, stderr, .. })
            if code == remote::DECIDED_BY_WATCHDOG && stderr.trim() == remote::NO_WATCHDOG =>
        {
            Decided::Ours
        }
        Err(SshError::Exit { code, stderr, .. }) if code == remote::DECIDED_BY_WATCHDOG => {
            Decided::Elsewhere(format!(
                "its watchdog had already decided to switch back ({})",
                stderr.trim()
            ))
        }
        Err(e) => Decided::Elsewhere(format!("cannot decide the activation: {e}")),
    }
}
