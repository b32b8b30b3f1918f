//! A daemon that stops hands its deployments over instead of cancelling
//! them, when another daemon will take them over: an operator restarting
//! the daemons of a cluster one by one expects the deployments to go on.
//!
//! On SIGTERM ([`begin`]), before its deployments are cancelled, a daemon on
//! PostgreSQL stops taking deployments over itself (its row says it is
//! stopping) and looks for another live daemon that takes deployments over
//! and is not stopping. With one, it asks each deployment it runs to be
//! handed over: cancelled, the deployment starts no host any more, its hosts
//! in the middle of their pipeline finish it, and it lets its lease go at
//! once, saying so in its events (`engine::fleet::handoff`); a peer takes it
//! over at its next heartbeat and resumes it (`takeover`). Without one (or
//! on SQLite), the deployments are cancelled as before: hosts finish or roll
//! back. [`wait`] gives the hosts `[cluster] stop-timeout`; past it, the
//! requests are taken back and the deployments end cancelled.

use super::AppState;
use crate::store::Backend;

/// Ask every deployment this daemon runs to be handed over at its next safe
/// point, when another daemon takes deployments over. Returns how many
/// were asked (none: they are cancelled as before).
pub(crate) async fn begin(state: &AppState) -> usize {
    let store = state.store();
    if store.backend() != Backend::Postgres {
        return 0;
    }
    let peers = match store.stop_taking_over().await {
        Ok(peers) => peers,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot look for a daemon to hand deployments over to: cancelling them");
            return 0;
        }
    };
    if peers.is_empty() {
        tracing::info!(
            "no other daemon takes deployments over: this daemon's deployments are cancelled"
        );
        return 0;
    }
    let running: Vec<i64> = state
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .copied()
        .collect();
    let asked = running
        .into_iter()
        .filter(|id| store.ask_hand_over(*id))
        .count();
    tracing::info!(
        asked,
        ?peers,
        "stopping: deployments are handed over at their next safe point"
    );
    asked
}

/// Wait for this daemon's deployment tasks to end. Deployments asked to be
/// handed over get `[cluster] stop-timeout` to reach their safe point (their
/// hosts finishing their pipeline); past it, they are cancelled as without
/// another daemon.
pub(crate) async fn wait(state: &AppState) {
    if state.store().handing_over().is_empty() {
        state.tasks.wait().await;
        return;
    }
    let timeout = state.config.cluster.stop_timeout;
    if tokio::time::timeout(timeout, state.tasks.wait())
        .await
        .is_err()
    {
        for id in state.store().handing_over() {
            tracing::warn!(
                deployment = id,
                "its hosts are still in their pipeline after the stop timeout ({}s): cancelled instead of handed over",
                timeout.as_secs()
            );
            state.store().withdraw_hand_over(id);
        }
        state.tasks.wait().await;
    }
}
