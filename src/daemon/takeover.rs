//! Failover: deployments whose holder's lease expired (it died, froze, or
//! lost the database for longer than its lease) or that their holder handed
//! over as it stopped (`handoff`) are taken over by a daemon that takes
//! over (`[cluster] takeover`, PostgreSQL only) and resumed.
//!
//! Every heartbeat this daemon looks for running deployments whose lease
//! expired by the database's clock; for each it takes the lease (epoch + 1,
//! a compare-and-swap: of several daemons exactly one wins), then resumes
//! it through the engine's `resume` entry point, exactly as `nix-deploy
//! resume` would: armed watchdogs settle, every remaining host is probed,
//! and the deployment goes on (or rolls back) as its stored options say.
//! Whatever the old holder still writes is refused (its epoch is stale), and
//! its heartbeat tells it to stop. A run that is not a deployment (`exec`,
//! `upload-keys`), or a resume that cannot start, ends `interrupted`.

use std::sync::atomic::Ordering;

use nix_deploy_core::run::RunKind;

use super::{AppState, Job};
use crate::engine::EngineError;
use crate::store::Released;

/// Look for expired deployments every heartbeat until the daemon stops.
pub(crate) fn spawn(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = state.store().lease_timing().heartbeat;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = state.shutdown.cancelled() => return,
            }
            let expired = match state.store().expired_deployments().await {
                Ok(expired) => expired,
                Err(e) => {
                    tracing::warn!(cause = %e, "looking for deployments to take over");
                    continue;
                }
            };
            for (id, epoch) in expired {
                match state.store().take_over_from(id, epoch).await {
                    Ok(Some(released)) => {
                        state.takeovers.fetch_add(1, Ordering::SeqCst);
                        if released == Released::HandedOver {
                            state.handoffs_received.fetch_add(1, Ordering::SeqCst);
                            tracing::info!(
                                deployment = id,
                                "took over a deployment its holder handed over as it stopped"
                            );
                        } else {
                            tracing::warn!(
                                deployment = id,
                                "took over a deployment whose holder's lease expired"
                            );
                        }
                        // Resumed beside this loop: an evaluation may take a while.
                        let state = state.clone();
                        tokio::spawn(async move { resume(&state, id).await });
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(cause = %e, deployment = id, "taking over a deployment")
                    }
                }
            }
        }
    })
}

/// Resume deployment `id`, taken over; end it `interrupted` when it cannot be.
async fn resume(state: &AppState, id: i64) {
    let deployment = match state.store().deployment(id).await {
        Ok(Some(deployment)) => deployment,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(cause = %e, deployment = id, "reading a deployment taken over");
            return;
        }
    };
    if deployment.kind != RunKind::Deploy {
        let reason = format!(
            "its coordinator stopped; an {} run is not resumed: run it again",
            deployment.kind.as_str()
        );
        give_up(state, id, &reason).await;
        return;
    }
    let engine = state.engine_with_flake(&deployment.flake);
    let done = move |result: Result<_, EngineError>| {
        if let Err(e) = result
            && !is_lost(&e)
        {
            tracing::warn!(cause = %e, deployment = id, "a deployment taken over ended with an error");
        }
    };
    let job = Job::Resume {
        id: Some(id),
        wait: true,
    };
    if let Err(e) = state.launch(engine, job, done).await {
        // Refused before it started (the flake no longer evaluates, ...).
        give_up(
            state,
            id,
            &format!("taken over, but could not be resumed: {e}"),
        )
        .await;
    }
}

/// End a deployment taken over without resuming it.
async fn give_up(state: &AppState, id: i64, reason: &str) {
    if let Err(e) = state.store().abandon_taken_over(id, reason).await {
        tracing::warn!(cause = %e, deployment = id, "ending a deployment taken over");
    }
}

/// Whether an engine error says this daemon lost the deployment.
fn is_lost(e: &EngineError) -> bool {
    matches!(e, EngineError::Store(s) if s.is_superseded())
}
