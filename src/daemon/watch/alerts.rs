//! Sending the watch's alerts, on the leader: each stored alert is claimed
//! (compare-and-swap: of several coordinators exactly one gets it), goes to
//! every channel (e-mail, Slack, JSON webhooks; retried with backoff) in
//! order, then is marked sent, so it is sent once — also across a restart
//! or a leader change, after which the new sender sends what was stored but
//! not sent yet (with the same delivery id, for receivers to recognise a
//! repeat if a sender died between sending and marking).
//! A channel that still fails after its retries is logged and not retried
//! again: alerts are never held back behind a dead receiver.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::daemon::AppState;
use crate::daemon::notify::Notice;

/// How often unsent alerts are looked for without being woken.
const POLL: Duration = Duration::from_secs(30);

pub(super) async fn run(state: AppState, stop: CancellationToken) {
    loop {
        send_pending(&state, &stop).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = state.alerts_ready.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Send every unsent alert, oldest first, until none is left or `stop`.
async fn send_pending(state: &AppState, stop: &CancellationToken) {
    let alerts = match state.store().unsent_alerts().await {
        Ok(alerts) => alerts,
        Err(e) => {
            tracing::warn!(cause = %e, "reading alerts to send");
            return;
        }
    };
    for alert in alerts {
        if stop.is_cancelled() {
            return;
        }
        let id = alert.id;
        // Only the leader sends, and each alert only once it is ours.
        if !state.is_leader() {
            return;
        }
        match state.store().claim_alert(id).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(cause = %e, alert = id, "claiming an alert");
                return;
            }
        }
        for result in state.notifier.send_and_wait(Notice::Alert(alert)).await {
            if let Err(e) = result {
                tracing::warn!(cause = %e, alert = id, "alert not delivered");
            }
        }
        if let Err(e) = state.store().mark_alert_sent(id).await {
            // Sent again later rather than lost.
            tracing::warn!(cause = %e, alert = id, "marking an alert sent");
            return;
        }
    }
}
