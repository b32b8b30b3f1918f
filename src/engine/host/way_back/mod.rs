//! The way back, in one place. Every switch back goes through here: after a
//! failed step ([`recover`]), after an abort or a blue-green revert
//! ([`take_back`]), a rollback on request ([`roll_back`]), through the boot
//! generation after a failed reboot ([`roll_back_through_boot`]), and when
//! the history cannot be written ([`undo_unrecorded`]).
//!
//! Going back restores both things a host had before an activation
//! ([`Before`]): the system it ran and the boot default it had. Those two
//! differ after `--goal boot` or `--goal test`, and a host that ran g1 and
//! was staged to boot g2 goes back to running g1 and booting g2, never to
//! running g2. The coordinator's switch back runs on the host detached, with
//! the same script the host's watchdog and the settling of an abandoned
//! activation use ([`nix_deploy_core::remote::restorer_argv`]); then what the
//! host runs and boots is read ([`super::observe::systems`]) and must be what
//! it had, and the old system must be healthy. [`conclude`] records how it
//! ended, and what the host runs afterwards is recorded whatever the outcome
//! ([`record_after`]).
//!
//! A host that did not confirm over a new connection is not switched by us:
//! its watchdog reverts it by itself, and we wait for that and verify
//! ([`await_watchdog`]). A host without magic rollback (deploy-rs's
//! `magicRollback = false`) has no watchdog: its activation is decided
//! ("no watchdog") as soon as it ends, and the way back is ours alone.
//!
//! Keys follow the system ([`super::keys_back`]): whenever the host goes
//! back (or its system was never changed), the keys this deployment
//! replaced go back too, before the old system is activated again; when it
//! stays on the new system, they stay too. What happened to them is part of
//! the conclusion.

use std::time::Duration;

use nix_deploy_core::events::{HostStatus, Step};
use nix_deploy_core::remote::{self, Activation, Before, Decision, HostSystems};
use nix_deploy_core::render;
use nix_deploy_core::run::{HostRun, RebootRecord};

mod watchdog;

use watchdog::{Decided, await_watchdog, decide};

use super::context::{HostContext, HostJob};
use super::failure::{At, Recovery};
use super::fence::HostFence;
use super::observe::{self, Assessment};
use super::{activator, health, keys_back, reboot};
use crate::store::StoreError;
use crate::transport::ssh::{Connection, SshOptions};

/// Whether a host had anything to go back to: a generation of the system
/// profile (a host deployed for the first time has none).
fn has_way_back(before: &Before) -> bool {
    before.boot_generation.is_some()
}

/// `generation 3 (/nix/store/…)`, or `generation 3, booting it, running /nix/store/…`
/// when the two differed: what a host went back to, in words.
fn describe(before: &Before) -> String {
    let generation = before
        .boot_generation
        .map(|g| g.to_string())
        .unwrap_or_else(|| "-".into());
    match &before.running {
        Some(running) => format!("generation {generation} (running {running})"),
        None => format!("generation {generation}"),
    }
}

/// Restore what the host ran and booted before an activation of kind
/// `undone`, detached on the host (a dropped connection or a killed
/// coordinator cannot cut it short), then check it runs and boots that. A
/// host that has seen a newer holder of the deployment refuses (`fence`).
async fn switch_back(
    connection: &mut Connection,
    ssh: &SshOptions,
    fence: &HostFence,
    assessment: &Assessment,
    before: &Before,
    undone: Activation,
    timeout: Duration,
) -> Result<(), String> {
    let token = activator::token();
    let switch = activator::Switch {
        host: &assessment.host,
        step: "rollback",
        what: activator::What::Restore { undone, before },
        token: &token,
        systemd: assessment.probe.as_ref().is_some_and(|p| p.systemd),
        timeout,
        fence,
    };
    activator::run(connection, ssh, &switch).await?;
    verify_restored(connection, ssh, before).await
}

/// The host runs and boots what it did before.
async fn verify_restored(
    connection: &Connection,
    ssh: &SshOptions,
    before: &Before,
) -> Result<(), String> {
    let now = observe::systems(connection, "rollback", ssh.command_timeout).await?;
    if before.restored_in(&now) {
        return Ok(());
    }
    Err(format!(
        "{}: rollback: the host runs {} and boots generation {}, expected {}",
        connection.host(),
        now.running.as_deref().unwrap_or("no system"),
        now.boot_generation
            .map(|g| g.to_string())
            .unwrap_or_else(|| "-".into()),
        describe(before)
    ))
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
    keys_back::conclude(run);
}

/// Read what the host runs and boots now into the run, whatever happened
/// before: what is reported of it is then what it runs. A host that cannot
/// be read keeps `after` empty (and is reported as not known).
pub(crate) async fn record_after(
    context: &HostContext,
    connection: &Connection,
    run: &mut HostRun,
) {
    run.after = observe::systems(connection, "after", context.ssh.command_timeout)
        .await
        .ok();
}

/// Restore what the host ran and booted before an activation of kind
/// `undone`, as the run's rollback step; the old system must then be
/// healthy too.
pub(crate) async fn roll_back(
    context: &HostContext,
    run: &mut HostRun,
    connection: &mut Connection,
    assessment: &Assessment,
    before: &Before,
    undone: Activation,
) -> Result<Result<(), String>, StoreError> {
    let host = &assessment.host;
    let checks = context.checks(host);
    let health_timeout = context.options.health_timeout;
    let work = async {
        let timeout = context.options.activation_timeout;
        switch_back(
            connection,
            &context.ssh,
            &context.fence,
            assessment,
            before,
            undone,
            timeout,
        )
        .await?;
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
    record_after(context, connection, run).await;
    Ok(result)
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
            // Its system never changed: keys this deployment replaced
            // before it failed go back.
            let (assessment, connection, run) = job.parts();
            keys_back::go_back(context, connection, &assessment.host, run, false).await?;
            keys_back::conclude(run);
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
    let before = assessment.before.clone();
    let (decision, keep_note) = match (has_way_back(&before), host.rollback_on_failure) {
        (_, false) => (
            Decision::Confirmed,
            "(rollbackOnFailure is off: left as it is)",
        ),
        (false, true) => (
            Decision::Confirmed,
            "no previous generation to roll back to (first deployment)",
        ),
        (true, true) => (Decision::TakenBack, ""),
    };
    match decide(connection, context, run, decision).await {
        Decided::Ours => {}
        Decided::Elsewhere(how) => {
            let error = format!("{error}\n{how}");
            return await_watchdog(context, job, error).await;
        }
    }
    if decision != Decision::TakenBack {
        run.status = HostStatus::Failed;
        run.error = Some(format!("{error}\n{keep_note}"));
        record_after(context, connection, run).await;
        // The new system stays, and its keys with it.
        keys_back::commit(context, connection, host, run).await?;
        keys_back::left(context, run, "the host keeps the new system").await?;
        keys_back::conclude(run);
        return Ok(());
    }
    keys_back::go_back(context, connection, host, run, false).await?;
    // The goal's activation is what is undone.
    let undone = context.goal(activation).activation().unwrap_or(activation);
    let result = roll_back(context, run, connection, assessment, &before, undone).await?;
    let note = format!("{error}\nrolled back to {}", describe(&before));
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
/// then run the old system (`test`-activated again when it was not the boot
/// default) and be healthy.
async fn roll_back_through_boot(
    context: &HostContext,
    job: &mut HostJob,
    error: String,
) -> Result<(), StoreError> {
    let (assessment, connection, run) = job.parts();
    let host = assessment.host.clone();
    let before = assessment.before.clone();
    if !host.rollback_on_failure || !has_way_back(&before) {
        run.status = HostStatus::Failed;
        run.error = Some(format!(
            "{error}\n{}",
            if host.rollback_on_failure {
                "no previous generation to roll back to (first deployment)"
            } else {
                "(rollbackOnFailure is off: left as it is)"
            }
        ));
        record_after(context, connection, run).await;
        keys_back::commit(context, connection, &host, run).await?;
        keys_back::left(context, run, "the host keeps the new system").await?;
        keys_back::conclude(run);
        return Ok(());
    }
    let checks = context.checks(&host);
    let health_timeout = context.options.health_timeout;
    let ssh = &context.ssh;
    let timeout = context.options.activation_timeout;
    let mut record = RebootRecord::default();
    let mut rebooted = false;
    // The keys go back once the old generation is booted (if it must be),
    // before the old system is activated again.
    let touched = keys_back::touched(run);
    let rebooted_forward = run
        .reboot
        .as_ref()
        .is_some_and(|r| r.boot_id_after.is_some());
    let mut changes = None;
    let work = async {
        // The connection we had may be to a host that has rebooted since.
        if observe::systems(connection, "rollback", ssh.command_timeout)
            .await
            .is_err()
        {
            let fresh = Connection::connect(&host.name, &host.target, ssh)
                .await
                .map_err(|e| render::host_error(&host.name, "rollback", &e.to_string()))?;
            let old = std::mem::replace(connection, fresh);
            old.close().await;
        }
        // The boot default first, without touching what runs.
        let boot_only = Before {
            running: None,
            boot_generation: before.boot_generation,
        };
        let token = activator::token();
        let switch = activator::Switch {
            host: &host,
            step: "rollback",
            what: activator::What::Restore {
                undone: Activation::Boot,
                before: &boot_only,
            },
            token: &token,
            systemd: assessment.probe.as_ref().is_some_and(|p| p.systemd),
            timeout,
            fence: &context.fence,
        };
        activator::run(connection, ssh, &switch).await?;
        let now = observe::systems(connection, "rollback", ssh.command_timeout).await?;
        if now.running != now.boot {
            rebooted = true;
            let boot = now.boot.clone().unwrap_or_default();
            reboot::reboot_and_wait(context, connection, &host, &boot, &mut record).await?;
        }
        // After a reboot, keys /run lost are uploaded again (this
        // deployment's: the old ones are gone), so that the old system's
        // services find them.
        if touched {
            let after_reboot = rebooted || rebooted_forward;
            changes = Some(keys_back::put_back(context, connection, &host, after_reboot).await);
        }
        // What ran before, when it was not the boot default (a host staged
        // to boot another generation).
        switch_back(
            connection,
            ssh,
            &context.fence,
            assessment,
            &before,
            Activation::Test,
            timeout,
        )
        .await?;
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
    record_after(context, connection, run).await;
    if rebooted {
        run.reboot = Some(record);
    }
    match changes {
        Some(changes) => keys_back::record(context, run, changes).await?,
        None => {
            keys_back::left(
                context,
                run,
                "the way back stopped before they could be put back (what they replaced stays kept on the host)",
            )
            .await?
        }
    }
    let note = format!(
        "{error}\nrolled back through the boot generation to {}{}",
        describe(&before),
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

/// Restore one host of a deployment (after an abort, or reverting
/// blue-green staging of kind `undone`) and record how it ended (`note` on
/// success; `missing` when it had nothing to go back to).
pub(crate) async fn take_back(
    context: &HostContext,
    mut run: HostRun,
    assessment: &Assessment,
    connection: &mut Connection,
    undone: Activation,
    note: String,
    missing: &str,
) -> Result<HostRun, StoreError> {
    let host = &assessment.host.name;
    let before = assessment.before.clone();
    let result = if has_way_back(&before) {
        keys_back::go_back(context, connection, &assessment.host, &mut run, false).await?;
        roll_back(context, &mut run, connection, assessment, &before, undone).await?
    } else {
        record_after(context, connection, &mut run).await;
        keys_back::left(context, &mut run, "the host keeps the new system").await?;
        Err(format!("{host}: rollback: {missing}"))
    };
    conclude(&mut run, result, HostStatus::RolledBack, Some(note), None);
    run.time.finished_at = Some(crate::now_ms());
    context.recorder.finish_host(&mut run).await?;
    Ok(run)
}

/// The history stopped accepting writes in the middle of a host: put the
/// host back on what it ran and booted, without recording (best effort; a
/// host we cannot reach is switched back by its watchdog). Only the host's
/// own files tell what happened; the error reported says so.
pub(crate) async fn undo_unrecorded(context: &HostContext, job: &mut HostJob) {
    let (assessment, connection, run) = job.parts();
    let before = assessment.before.clone();
    let host = &assessment.host;
    let profile_set = run
        .steps
        .iter()
        .any(|s| s.step == Step::SetProfile && s.ok == Some(true));
    let touched = keys_back::touched(run);
    if run.token.is_none() && !profile_set {
        // Its system never changed: its keys go back.
        if touched {
            keys_back::put_back(context, connection, host, false).await;
        }
        return;
    }
    if !has_way_back(&before) {
        return;
    }
    if let Decided::Ours = decide(connection, context, run, Decision::TakenBack).await {
        if touched {
            keys_back::put_back(context, connection, host, false).await;
        }
        // Staged with `test` (blue-green) when the profile was never set.
        let undone = if profile_set {
            Activation::Switch
        } else {
            Activation::Test
        };
        let timeout = context.options.activation_timeout;
        let _ = switch_back(
            connection,
            &context.ssh,
            &context.fence,
            assessment,
            &before,
            undone,
            timeout,
        )
        .await;
    }
}

/// What `generation` of the host's system profile is, as the way back to
/// it: the system it runs and the generation it boots.
pub(crate) async fn generation_target(
    connection: &Connection,
    ssh: &SshOptions,
    generation: u32,
) -> Result<Before, String> {
    let link = connection
        .run(
            "rollback",
            &[
                "readlink".to_string(),
                "-f".into(),
                remote::generation_link(generation),
            ],
            ssh.command_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
    let path = link.stdout.trim();
    if !nix_deploy_core::shell::is_valid_store_path(path) {
        return Err(format!(
            "{}: rollback: generation {generation} points at `{path}`, not a system",
            connection.host()
        ));
    }
    Ok(Before {
        running: Some(path.to_string()),
        boot_generation: Some(generation),
    })
}

/// Whether `systems` is exactly `target` already.
pub(crate) fn already_there(systems: &HostSystems, target: &Before) -> bool {
    target.restored_in(systems) && systems.boot == target.running
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_a_generation_has_nothing_to_go_back_to() {
        let before = Before {
            running: Some("/nix/store/x".into()),
            boot_generation: Some(3),
        };
        assert!(has_way_back(&before));
        assert_eq!(describe(&before), "generation 3 (running /nix/store/x)");
        assert!(!has_way_back(&Before::default()));
        let there = HostSystems {
            running: Some("/nix/store/x".into()),
            boot_generation: Some(3),
            boot: Some("/nix/store/x".into()),
        };
        assert!(already_there(&there, &before));
        let staged = HostSystems {
            boot: Some("/nix/store/y".into()),
            ..there
        };
        assert!(before.restored_in(&staged) && !already_there(&staged, &before));
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
            Some("why".into()),
            Some("e"),
        );
        assert_eq!(run.status, HostStatus::RollbackFailed);
        assert_eq!(run.error.as_deref(), Some("e\nboom"));
    }
}
