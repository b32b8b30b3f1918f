//! The way back, in one place. Every switch back goes through here: after a
//! failed step ([`recover`]), after an abort or a blue-green revert
//! ([`take_back`]), a rollback on request ([`roll_back`]), through the boot
//! generation after a failed reboot ([`roll_back_through_boot`]), and when
//! the history cannot be written ([`undo_unrecorded`]). Each switches the
//! host to the earlier system, checks that `/run/current-system` is that
//! system, checks that it is healthy, and records the step; [`conclude`]
//! records how it ended.
//!
//! A host that did not confirm over a new connection is not switched by us:
//! its watchdog reverts it by itself, and we wait for that and verify
//! ([`await_watchdog`]).

use std::time::{Duration, Instant};

use nix_deploy_core::events::{HostStatus, Step, SystemRef};
use nix_deploy_core::remote::{self, Activation, Decision};
use nix_deploy_core::run::{HostRun, RebootRecord};

use super::context::{HostContext, HostJob};
use super::failure::{At, Recovery};
use super::observe::Assessment;
use super::{activator, health, keys, reboot};
use crate::store::StoreError;
use crate::transport::ssh::{Connection, SshError, SshOptions};

/// Deadline of one switch of the boot default.
const BOOT_SWITCH_TIMEOUT: Duration = Duration::from_secs(600);

/// The system a host goes back to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Previous {
    pub generation: u32,
    pub path: String,
}

impl Previous {
    /// What a host ran before we touched it, if it ran anything.
    pub fn of(current: &SystemRef) -> Option<Previous> {
        Some(Previous {
            generation: current.generation?,
            path: current.path.clone()?,
        })
    }
}

/// How a host gets back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Back {
    /// Point the profile back at the generation and `switch` to it.
    Switch,
    /// Blue-green staging never touched the profile: `test`-activate the old
    /// generation, which stays the boot default.
    Test,
    /// The `boot` goal never changed the running system: point the profile
    /// back at the generation and make it the boot default again.
    Boot,
}

impl Back {
    pub fn after(activation: Activation) -> Back {
        match activation {
            Activation::Test => Back::Test,
            Activation::Boot => Back::Boot,
            Activation::Switch => Back::Switch,
        }
    }
}

/// Switch the host back to `to` and check it runs it. The switch runs
/// detached on the host (like an activation, without a watchdog): a dropped
/// connection or a killed coordinator cannot cut it short.
async fn switch_back(
    connection: &mut Connection,
    ssh: &SshOptions,
    assessment: &Assessment,
    to: &Previous,
    how: Back,
    timeout: Duration,
) -> Result<(), String> {
    if how != Back::Test {
        connection
            .run_privileged(
                "rollback",
                &remote::switch_generation_argv(to.generation),
                ssh.command_timeout,
            )
            .await
            .map_err(|e| e.to_string())?;
    }
    let link = remote::generation_link(to.generation);
    let token = activator::token();
    let switch = activator::Switch {
        host: &assessment.host,
        step: "rollback",
        system: &link,
        action: match how {
            Back::Switch => Activation::Switch,
            Back::Test => Activation::Test,
            Back::Boot => Activation::Boot,
        },
        watchdog: None,
        token: &token,
        systemd: assessment.probe.as_ref().is_some_and(|p| p.systemd),
        timeout,
    };
    activator::run(connection, ssh, &switch).await?;
    verify_current(connection, &to.path).await
}

/// `/run/current-system` must be `expected`.
pub(crate) async fn verify_current(connection: &Connection, expected: &str) -> Result<(), String> {
    let current = connection
        .run(
            "rollback",
            &remote::current_system_argv(),
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| e.to_string())?;
    let current = current.stdout.trim();
    if current != expected {
        return Err(format!(
            "{}: rollback: /run/current-system is {current}, expected the old system {expected}",
            connection.host()
        ));
    }
    Ok(())
}

/// Record how a switch back ended: on success the host is `ok_status` (with
/// `ok_note` as its record); on failure it is `rollback-failed`, with
/// `context` (what led here) before the error.
pub(crate) fn conclude(
    run: &mut HostRun,
    result: Result<(), String>,
    ok_status: HostStatus,
    ok_note: Option<String>,
    context: Option<&str>,
) {
    match result {
        Ok(()) => {
            run.status = ok_status;
            run.error = ok_note;
        }
        Err(e) => {
            run.status = HostStatus::RollbackFailed;
            run.error = Some(match context {
                Some(context) => format!("{context}\n{e}"),
                None => e,
            });
        }
    }
}

/// Switch `host` back to `to` as the run's rollback step; the old system
/// must then be healthy too.
pub(crate) async fn roll_back(
    context: &HostContext,
    run: &mut HostRun,
    connection: &mut Connection,
    assessment: &Assessment,
    to: &Previous,
    how: Back,
) -> Result<Result<(), String>, StoreError> {
    let host = &assessment.host;
    let checks = context.checks(host);
    let health_timeout = context.options.health_timeout;
    let work = async {
        let timeout = context.options.activation_timeout;
        switch_back(connection, &context.ssh, assessment, to, how, timeout).await?;
        health::validate(connection, &checks, health_timeout)
            .await
            .map(|_| ())
            .map_err(|(message, _)| {
                format!(
                    "{}: rollback: the old system is not healthy: {message}",
                    host.name
                )
            })
    };
    context.recorder.step(run, Step::Rollback, work).await
}

/// After a failed step: what the host needs (decided by the step, see
/// [`At::recovery`]).
pub(crate) async fn recover(
    context: &HostContext,
    job: &mut HostJob,
    activation: Activation,
    at: At,
    error: String,
) -> Result<(), StoreError> {
    match at.recovery() {
        Recovery::Untouched => {
            job.run.status = HostStatus::Failed;
            job.run.error = Some(error);
            Ok(())
        }
        Recovery::Unhealthy => {
            job.run.status = HostStatus::Unhealthy;
            job.run.error = Some(error);
            Ok(())
        }
        Recovery::RollBack => roll_back_failed(context, job, activation, error).await,
        Recovery::AwaitWatchdog => await_watchdog(context, job, error).await,
        Recovery::RollBackThroughBoot => roll_back_through_boot(context, job, error).await,
    }
}

/// Activation or validation failed: roll back if allowed and possible. The
/// activation is decided first, atomically against its watchdog, so the two
/// never switch the host at the same time: if the watchdog decided first
/// (or the host cannot be reached to decide), the watchdog is the one
/// switching back, and we wait for it.
async fn roll_back_failed(
    context: &HostContext,
    job: &mut HostJob,
    activation: Activation,
    error: String,
) -> Result<(), StoreError> {
    let (assessment, connection, run) = job.parts();
    let host = &assessment.host;
    let previous = Previous::of(&assessment.current);
    let (decision, keep_note) = match (&previous, host.rollback_on_failure) {
        (_, false) => (
            Decision::Confirmed,
            "(rollbackOnFailure is off: left as it is)",
        ),
        (None, true) => (
            Decision::Confirmed,
            "no previous generation to roll back to (first deployment)",
        ),
        (Some(_), true) => (Decision::TakenBack, ""),
    };
    match decide(connection, run, decision).await {
        Decided::Ours => {}
        Decided::Elsewhere(how) => {
            let error = format!("{error}\n{how}");
            return await_watchdog(context, job, error).await;
        }
    }
    let Some(previous) = previous.filter(|_| decision == Decision::TakenBack) else {
        run.status = HostStatus::Failed;
        run.error = Some(format!("{error}\n{keep_note}"));
        return Ok(());
    };
    // How the goal's activation is undone.
    let how = Back::after(context.goal(activation).activation().unwrap_or(activation));
    let result = roll_back(context, run, connection, assessment, &previous, how).await?;
    let note = format!(
        "{error}\nrolled back to generation {} ({})",
        previous.generation, previous.path
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

/// The host's watchdog switches it back by itself (the new system did not
/// let us in, or the watchdog decided first): wait for its result and
/// report what the host runs afterwards.
async fn await_watchdog(
    context: &HostContext,
    job: &mut HostJob,
    error: String,
) -> Result<(), StoreError> {
    let (assessment, connection, run) = job.parts();
    let host = &assessment.host.name;
    let old = assessment.current.clone();
    let Some(token) = run.token.clone() else {
        run.status = HostStatus::Failed;
        run.error = Some(error);
        return Ok(());
    };
    let old_generation = old.generation.map(|g| g.to_string()).unwrap_or("-".into());
    // It decides one confirm window after the last extension, then runs
    // the old system's activation.
    let patience = context.options.confirm_timeout
        + context.options.activation_timeout
        + Duration::from_secs(60);
    let work = async {
        let deadline = Instant::now() + patience;
        loop {
            let result = connection
                .run(
                    "watchdog",
                    &remote::watchdog_result_argv(&token),
                    Duration::from_secs(10),
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
                Ok(out) if matches!(out.stdout.trim(), "confirmed" | "taken-back") => {
                    return Err(format!(
                        "{host}: watchdog: the activation was decided `{}` elsewhere",
                        out.stdout.trim()
                    ));
                }
                Err(e) if e.is_connection() => {
                    return Err(format!(
                        "{host}: watchdog: cannot reach the host to verify ({e}); its watchdog reverts it to generation {old_generation} by itself"
                    ));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(format!("{host}: watchdog: did not revert in time"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match &old.path {
            Some(path) => verify_current(connection, path).await,
            None => Ok(()),
        }
    };
    let result = context.recorder.step(run, Step::Rollback, work).await?;
    let note = format!(
        "{error}\nthe host's watchdog reverted it to generation {old_generation} by itself"
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

/// After a failed reboot or validation after it: the old generation
/// becomes the boot default again and the host reboots into it; it must
/// then run the old system and be healthy.
async fn roll_back_through_boot(
    context: &HostContext,
    job: &mut HostJob,
    error: String,
) -> Result<(), StoreError> {
    let (assessment, connection, run) = job.parts();
    let host = assessment.host.clone();
    if !host.rollback_on_failure {
        run.status = HostStatus::Failed;
        run.error = Some(format!(
            "{error}\n(rollbackOnFailure is off: left as it is)"
        ));
        return Ok(());
    }
    let Some(previous) = Previous::of(&assessment.current) else {
        run.status = HostStatus::Failed;
        run.error = Some(format!(
            "{error}\nno previous generation to roll back to (first deployment)"
        ));
        return Ok(());
    };
    let checks = context.checks(&host);
    let health_timeout = context.options.health_timeout;
    let mut record = RebootRecord::default();
    let mut rebooted = false;
    let work = async {
        // The connection we had may be to a host that has rebooted since.
        if connection
            .run(
                "rollback",
                &remote::current_system_argv(),
                Duration::from_secs(30),
            )
            .await
            .is_err()
        {
            let fresh = Connection::connect(&host.name, &host.target, &context.ssh)
                .await
                .map_err(|e| format!("{}: rollback: cannot reach the host: {e}", host.name))?;
            let old = std::mem::replace(connection, fresh);
            old.close().await;
        }
        connection
            .run_privileged(
                "rollback",
                &remote::switch_generation_argv(previous.generation),
                BOOT_SWITCH_TIMEOUT,
            )
            .await
            .map_err(|e| e.to_string())?;
        connection
            .run_privileged(
                "rollback",
                &remote::switch_argv(
                    &remote::generation_link(previous.generation),
                    Activation::Boot,
                ),
                BOOT_SWITCH_TIMEOUT,
            )
            .await
            .map_err(|e| e.to_string())?;
        let current = connection
            .run(
                "rollback",
                &remote::current_system_argv(),
                Duration::from_secs(30),
            )
            .await
            .map_err(|e| e.to_string())?;
        if current.stdout.trim() != previous.path {
            rebooted = true;
            reboot::reboot_and_wait(context, connection, &host, &previous.path, &mut record)
                .await?;
            // Best effort: the old system's services find their keys (as
            // the flake describes them now) in the emptied /run.
            let all: Vec<_> = host.keys.iter().collect();
            let _ = keys::upload(connection, &context.keys, &host, &all, false).await;
        }
        health::validate(connection, &checks, health_timeout)
            .await
            .map(|_| ())
            .map_err(|(message, _)| {
                format!(
                    "{}: rollback: the old system is not healthy: {message}",
                    host.name
                )
            })
    };
    let result = context.recorder.step(run, Step::Rollback, work).await?;
    if rebooted {
        run.reboot = Some(record);
    }
    let note = format!(
        "{error}\nrolled back through the boot generation to generation {} ({}){}",
        previous.generation,
        previous.path,
        if rebooted { ", rebooted into it" } else { "" }
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

/// Switch one host of a deployment back to what it ran before (after an
/// abort, or reverting blue-green staging) and record how it ended (`note`
/// on success; `missing` when it ran nothing before).
pub(crate) async fn take_back(
    context: &HostContext,
    mut run: HostRun,
    assessment: &Assessment,
    connection: &mut Connection,
    how: Back,
    note: String,
    missing: &str,
) -> Result<HostRun, StoreError> {
    let host = &assessment.host.name;
    let result = match Previous::of(&assessment.current) {
        Some(previous) => {
            roll_back(context, &mut run, connection, assessment, &previous, how).await?
        }
        None => Err(format!("{host}: rollback: {missing}")),
    };
    conclude(&mut run, result, HostStatus::RolledBack, Some(note), None);
    run.time.finished_at = Some(crate::now_ms());
    context.recorder.finish_host(&mut run).await?;
    Ok(run)
}

/// The history stopped accepting writes in the middle of a host: put the
/// host back on what it ran, without recording (best effort; a host we
/// cannot reach is switched back by its watchdog). Only the host's own
/// files tell what happened; the error reported says so.
pub(crate) async fn undo_unrecorded(context: &HostContext, job: &mut HostJob) {
    let (assessment, connection, run) = job.parts();
    let Some(previous) = Previous::of(&assessment.current) else {
        return;
    };
    let profile_set = run
        .steps
        .iter()
        .any(|s| s.step == Step::SetProfile && s.ok == Some(true));
    if run.token.is_some() {
        // Staged with `test` (blue-green) when the profile was never set.
        let how = if profile_set {
            Back::Switch
        } else {
            Back::Test
        };
        if let Decided::Ours = decide(connection, run, Decision::TakenBack).await {
            let timeout = context.options.activation_timeout;
            let _ = switch_back(
                connection,
                &context.ssh,
                assessment,
                &previous,
                how,
                timeout,
            )
            .await;
        }
    } else if profile_set {
        // The new generation is the boot default but never ran.
        let _ = connection
            .run_privileged(
                "rollback",
                &remote::switch_generation_argv(previous.generation),
                context.ssh.command_timeout,
            )
            .await;
    }
}

/// Who decided an activation.
enum Decided {
    /// We did: its watchdog will not switch the host.
    Ours,
    /// Its watchdog did first, or the host could not be reached to decide
    /// (then the watchdog will): why.
    Elsewhere(String),
}

/// Decide the run's activation atomically against its watchdog. A run
/// without an activation has nothing to decide.
async fn decide(connection: &Connection, run: &HostRun, decision: Decision) -> Decided {
    let Some(token) = &run.token else {
        return Decided::Ours;
    };
    match connection
        .run_privileged(
            "rollback",
            &remote::decide_argv(token, decision),
            Duration::from_secs(30),
        )
        .await
    {
        Ok(_) => Decided::Ours,
        Err(SshError::Exit { code, stderr, .. }) if code == remote::DECIDED_BY_WATCHDOG => {
            Decided::Elsewhere(format!(
                "its watchdog had already decided to switch back ({})",
                stderr.trim()
            ))
        }
        Err(e) => Decided::Elsewhere(format!("cannot decide the activation: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_a_generation_has_nothing_to_go_back_to() {
        let current = SystemRef {
            path: Some("/nix/store/x".into()),
            generation: Some(3),
        };
        assert_eq!(
            Previous::of(&current),
            Some(Previous {
                generation: 3,
                path: "/nix/store/x".into()
            })
        );
        assert_eq!(Previous::of(&SystemRef::default()), None);
        assert_eq!(Back::after(Activation::Test), Back::Test);
        assert_eq!(Back::after(Activation::Switch), Back::Switch);
    }

    #[test]
    fn conclusions_say_what_the_host_runs() {
        let mut run = HostRun::new(1, "h");
        conclude(
            &mut run,
            Ok(()),
            HostStatus::RolledBack,
            Some("why".into()),
            Some("e"),
        );
        assert_eq!(run.status, HostStatus::RolledBack);
        assert_eq!(run.error.as_deref(), Some("why"));
        conclude(
            &mut run,
            Err("boom".into()),
            HostStatus::RolledBack,
            None,
            Some("e"),
        );
        assert_eq!(run.status, HostStatus::RollbackFailed);
        assert_eq!(run.error.as_deref(), Some("e\nboom"));
    }
}
