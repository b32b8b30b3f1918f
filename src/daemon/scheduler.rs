//! Scheduled deployments: one loop, owned by the daemon's task tracker and
//! stopped by its shutdown token, that starts each `[[schedule]]`'s
//! deployment when it is due. When is decided by the core
//! (`nix_deploy_core::scheduled`, which takes "now"); this reads the clock,
//! claims each occurrence in the store (at most once, whoever else shares
//! the history) and starts the deployment as any caller would: recorded
//! with trigger `schedule` and requester `schedule:NAME`, queued behind busy
//! hosts, obeying windows and approval rules.
//!
//! The loop runs once per fleet: only the elected leader of the daemons
//! sharing the history ticks (`AppState::is_leader`); the compare-and-swap
//! on each occurrence stays as a second guard, for a leader whose term
//! ends while it starts one. A follower looks again every heartbeat, so a
//! new leader takes over the schedules within one.
//!
//! Missed occurrences (the daemon was down, or no daemon led) run once
//! when a leader looks again, not in a burst. An occurrence that comes while the schedule's previous
//! deployment has not ended is passed over (recorded in the audit trail):
//! a slow deployment never piles up a queue of its own successors.

use std::time::Duration;

use nix_deploy_core::events::EventKind;
use nix_deploy_core::render;
use nix_deploy_core::scheduled::{Due, ScheduleState, SchedulesReport, Timer};
use nix_deploy_core::window::{Schedule, parse_zone};

use super::config::ScheduleConfig;
use super::{ApiError, AppState};
use crate::engine::DeployRequest;
use crate::now_ms;

/// The longest the loop sleeps: a clock that jumps, or a deployment that
/// ends, is noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// A schedule's timing (checked when the config was loaded).
pub(crate) fn timer(schedule: &ScheduleConfig) -> Option<Timer> {
    let cron = Schedule::parse(&schedule.cron).ok()?;
    let zone = parse_zone(&schedule.timezone).ok()?;
    Some(Timer::new(cron, zone))
}

/// Start the loop (nothing to do without schedules).
pub(crate) fn spawn(state: &AppState) {
    if state.config.schedules.is_empty() {
        return;
    }
    state.tasks.spawn(run(state.clone()));
}

async fn run(state: AppState) {
    let schedules: Vec<(&ScheduleConfig, Timer)> = state
        .config
        .schedules
        .iter()
        .filter_map(|s| timer(s).map(|t| (s, t)))
        .collect();
    let follower_sleep = state.store().lease_timing().heartbeat.min(MAX_SLEEP);
    loop {
        if !state.is_leader() {
            tokio::select! {
                _ = tokio::time::sleep(follower_sleep) => continue,
                _ = state.shutdown.cancelled() => break,
            }
        }
        let now = now_ms();
        let mut wake = now + MAX_SLEEP.as_millis() as i64;
        for (schedule, timer) in &schedules {
            match tick(&state, schedule, timer, now).await {
                Ok(Some(next)) => wake = wake.min(next),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(schedule = %schedule.name, cause = %e, "scheduled deployment")
                }
            }
        }
        let left = Duration::from_millis((wake - now_ms()).max(0) as u64);
        tokio::select! {
            _ = tokio::time::sleep(left.min(MAX_SLEEP)) => {}
            _ = state.shutdown.cancelled() => break,
        }
    }
}

/// Do what `schedule` wants at `now`; returns when to look again.
async fn tick(
    state: &AppState,
    schedule: &ScheduleConfig,
    timer: &Timer,
    now: i64,
) -> Result<Option<i64>, ApiError> {
    let store = state.store();
    let run = store
        .schedule_runs()
        .await?
        .into_iter()
        .find(|r| r.name == schedule.name);
    let (occurrence, missed) = match timer.due(run.as_ref().map(|r| r.accounted_until), now) {
        Due::Baseline => {
            store.schedule_baseline(&schedule.name, now).await?;
            return Ok(timer.next_after(now));
        }
        Due::Wait { next } => return Ok(next),
        Due::Run { occurrence, missed } => (occurrence, missed),
    };
    if !store.claim_schedule(&schedule.name, occurrence).await? {
        // Another daemon on the same history took it.
        return Ok(timer.next_after(now));
    }
    let actor = format!("schedule:{}", schedule.name);
    let previous = run.and_then(|r| r.deployment_id);
    if let Some(id) = previous
        && let Some(deployment) = store.deployment(id).await?
        && deployment.status.is_active()
    {
        store
            .schedule_started(&schedule.name, occurrence, id)
            .await?;
        state
            .audit(
                &actor,
                "schedule",
                "schedule-skipped",
                &format!("deployment #{id}"),
                serde_json::json!({
                    "occurrence": occurrence,
                    "why": format!("deployment #{id} of this schedule is still {}", deployment.status),
                }),
            )
            .await?;
        return Ok(timer.next_after(now));
    }
    let id = start(state, schedule, &actor).await;
    let detail = serde_json::json!({
        "occurrence": occurrence,
        "missed": missed,
        "request": &schedule.request,
    });
    match id {
        Ok(id) => {
            store
                .schedule_started(&schedule.name, occurrence, id)
                .await?;
            state
                .audit(
                    &actor,
                    "schedule",
                    "deploy",
                    &format!("deployment #{id}"),
                    detail,
                )
                .await?;
            let mut message = format!(
                "started by schedule `{}` for {}",
                schedule.name,
                render::timestamp(occurrence)
            );
            if missed > 0 {
                message.push_str(&format!(
                    " ({missed} earlier occurrence(s) missed while the daemon was down were not run)"
                ));
            }
            store
                .append_event(id, None, EventKind::Log { message })
                .await?;
        }
        Err(e) => {
            let mut detail = detail;
            detail["error"] = serde_json::json!(e.to_string());
            state
                .audit(
                    &actor,
                    "schedule",
                    "deploy-refused",
                    "scheduled deployment",
                    detail,
                )
                .await?;
        }
    }
    Ok(timer.next_after(now))
}

/// Record the schedule's deployment (queued behind busy hosts) and run it.
async fn start(state: &AppState, schedule: &ScheduleConfig, actor: &str) -> Result<i64, ApiError> {
    let request = &schedule.request;
    let engine = match &request.revision {
        Some(revision) => {
            let pinned = super::github::flake_at_revision(&state.config.flake, revision)
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            state.engine_with_flake(&pinned)
        }
        None => state.engine(),
    };
    let deploy = DeployRequest {
        selection: request.selection(),
        wait: true,
        options: state.resolve(request)?,
        trigger: "schedule".into(),
        requested_by: actor.to_string(),
        source: None,
    };
    state.launch_queued(engine, deploy, |_| {}).await
}

/// Every configured schedule: the last occurrence accounted for, its
/// deployment, and its next run (`GET /api/v1/schedules`).
pub(crate) async fn report(state: &AppState) -> Result<SchedulesReport, ApiError> {
    let now = now_ms();
    let runs = state.store().schedule_runs().await?;
    let schedules = state
        .config
        .schedules
        .iter()
        .map(|schedule| {
            let run = runs.iter().find(|r| r.name == schedule.name);
            let accounted = run.map(|r| r.accounted_until);
            ScheduleState {
                name: schedule.name.clone(),
                cron: schedule.cron.clone(),
                timezone: schedule.timezone.clone(),
                accounted_until: accounted,
                last_deployment_id: run.and_then(|r| r.deployment_id),
                next_run: timer(schedule)
                    .and_then(|t| t.next_after(accounted.unwrap_or(now).max(now))),
            }
        })
        .collect();
    Ok(SchedulesReport { now, schedules })
}
