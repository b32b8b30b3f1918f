//! One changed host's pipeline, top to bottom ([`pipeline`]):
//!
//! pre-flight → build, copy and summarise → keys → set-profile + activate
//! (one remote call) → keys → validate (while a new connection opens) →
//! confirm (which reads what the host runs after) → reboot → soak
//!
//! A host without magic rollback (deploy-rs's `magicRollback = false`) has
//! no watchdog: nothing waits for a confirmation, so none is sent.
//!
//! Each step is a function of [`super::steps`], [`super::prove`] or
//! [`super::reboot`] and fails with the step it is ([`super::failure::At`]);
//! what a failure means for the host is decided once
//! ([`super::failure::At::recovery`]) and carried out by [`super::way_back`].
//! The goal ([`nix_deploy_core::goal`]) decides which of the steps after the
//! copy run and how.

use std::sync::Arc;
use std::time::Duration;

use nix_deploy_core::events::HostStatus;
use nix_deploy_core::goal::Goal;
use nix_deploy_core::keys::UploadAt;
use nix_deploy_core::remote::{Activation, HostSystems};

pub(crate) use super::context::{HostContext, HostJob};
use super::failure::Stop;
use super::{keys_back, prove, reboot, steps, way_back};
use crate::now_ms;
use crate::store::StoreError;

/// How one host's part ended, as the scheduler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Deployed (or, in blue-green, staged) and healthy.
    Healthy,
    /// Failed, rolled back, unreachable, skipped or cancelled.
    NotHealthy,
}

/// One host's whole part: the pipeline (with the canary soak) and the way
/// back when a step fails. The host comes back with how it ended.
pub(crate) async fn run(
    context: Arc<HostContext>,
    mut job: HostJob,
    activation: Activation,
    soak: Option<Duration>,
) -> Result<(HostJob, Outcome), StoreError> {
    job.run.status = HostStatus::Running;
    job.run.time.started_at = Some(now_ms());
    context.recorder.save(&job.run).await?;

    let result = pipeline(&context, &mut job, activation, soak).await;
    job.run.time.finished_at = Some(now_ms());
    let outcome = match result {
        Ok(known) => {
            if let Some(status) = context.success_status(activation) {
                job.run.status = status;
                // What it runs and boots now, as the host says; what its
                // keys replaced is kept for `rollback`.
                if context.goal(activation).changes_host() {
                    match known {
                        Some(systems) => job.run.after = Some(systems),
                        None => {
                            way_back::record_after(&context, &job.connection, &mut job.run).await
                        }
                    }
                    let (assessment, connection, run) = job.parts();
                    keys_back::commit(&context, connection, &assessment.host, run).await?;
                }
            }
            Outcome::Healthy
        }
        Err(Stop::Store(e)) if e.is_superseded() => {
            // Another coordinator holds the deployment now (a higher
            // epoch): it settles this host; this one touches it no more.
            return Err(e);
        }
        Err(Stop::Store(e)) => {
            // The history cannot be written: leave no host between
            // generations, then say so.
            way_back::undo_unrecorded(&context, &mut job).await;
            return Err(e);
        }
        Err(Stop::Failed { at, message }) => {
            way_back::recover(&context, &mut job, activation, at, message).await?;
            Outcome::NotHealthy
        }
    };
    job.run.time.finished_at = Some(now_ms());
    if job.run.status != HostStatus::Running {
        job.run.step = None;
    }
    Ok((job, outcome))
}

/// The pipeline for one changed host, as its goal wants it. `Test`
/// activation (blue-green staging) leaves the profile alone. Returns what
/// the host runs and boots at the end when its last call said so (the
/// confirmation), sparing a round trip to read it again.
async fn pipeline(
    context: &HostContext,
    job: &mut HostJob,
    activation: Activation,
    soak: Option<Duration>,
) -> Result<Option<HostSystems>, Stop> {
    let goal = context.goal(activation);
    if activation == Activation::Switch {
        job.run.goal = Some(goal);
    }
    steps::refuse_unknown_profile(context, job).await?;
    steps::preflight(context, job).await?;
    reboot::refuse_self(context, job)?;
    let path = steps::build_copy_and_summarize(context, job).await?;
    if goal.stops_after_copy() {
        return Ok(None);
    }
    if goal == Goal::DryActivate {
        return steps::dry_activate(context, job, &path).await.map(|_| None);
    }
    steps::keys(context, job, UploadAt::PreActivation, goal).await?;
    // From here on the host boots (and runs, or may run) the new system.
    let profile = goal.sets_profile();
    let action = goal.activation().unwrap_or(activation);
    let runs = steps::activate(context, job, &path, action, profile).await?;
    steps::keys(context, job, UploadAt::PostActivation, goal).await?;
    let fresh = prove::validate_while_connecting(context, job, &path, goal, runs).await?;
    let mut after = None;
    if let Some(fresh) = fresh {
        after = prove::confirm(context, job, fresh).await?;
    }
    if reboot::wanted(context, job, &path).await? {
        reboot::reboot_into(context, job, &path).await?;
        after = None;
    }
    if let Some(soak) = soak {
        prove::soak(context, job, soak).await?;
        after = None;
    }
    Ok(after)
}
