//! The fleet as the watch sees it: `GET /api/v1/fleet` (every host's
//! desired, running, booted and boot-default systems, drift kinds with their
//! times, health, reachability, last sight) and `GET /api/v1/fleet/events`,
//! a Server-Sent-Event stream of its changes. Every daemon serves both:
//! the leader from its watch, the others from what it stored.
//!
//! The stream starts with a `snapshot` event (the stored fleet document,
//! with the id of the last change it includes), then one `host` event per
//! change (a `FleetEvent`: the host, what appeared and cleared, its whole
//! new state). With `Last-Event-ID`, it replays the changes after that id
//! instead of the snapshot, or sends a snapshot when they are no longer
//! kept. Changes are read from the store after the last id sent: woken by
//! this daemon's watch when it stored one, and every [`POLL`] otherwise
//! (another daemon's).

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use nix_deploy_core::watch::{FleetEvent, FleetReport};

use crate::daemon::config::Scope;
use crate::daemon::{ApiError, AppState};
use crate::store::Store;

/// Changes replayed or caught up per read of the store.
const REPLAY_BATCH: i64 = 500;
/// How often a stream looks for changes nothing woke it for.
const POLL: Duration = Duration::from_millis(500);

pub async fn fleet(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<FleetReport>, ApiError> {
    state.authorize(&headers, Scope::Read).await?;
    Ok(Json(state.fleet_view().await?))
}

fn host_event(event: &FleetEvent) -> SseEvent {
    SseEvent::default()
        .id(event.id.to_string())
        .event("host")
        .data(serde_json::to_string(event).unwrap_or_default())
}

fn snapshot_event(report: &FleetReport, last: i64) -> SseEvent {
    SseEvent::default()
        .id(last.to_string())
        .event("snapshot")
        .data(serde_json::to_string(report).unwrap_or_default())
}

type Sender = mpsc::Sender<Result<SseEvent, Infallible>>;

pub async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, Scope::Read).await?;
    let after: Option<i64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let mut woken = state.fleet.subscribe();
    let store = state.store().clone();
    let stop = state.shutdown.clone();
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(256);
    tokio::spawn(async move {
        let Ok((oldest, newest)) = store.watch_event_ids().await else {
            return;
        };
        // Replay from `after` when everything after it is still kept.
        let mut last = match after {
            Some(after) if after + 1 >= oldest => after,
            _ => {
                // Read after the id: the snapshot holds every change up to
                // it (a later one is sent again, which changes nothing).
                let Ok(snapshot) = store.stored_fleet().await else {
                    return;
                };
                if tx
                    .send(Ok(snapshot_event(&snapshot, newest)))
                    .await
                    .is_err()
                {
                    return;
                }
                newest
            }
        };
        loop {
            if catch_up(&store, &mut last, &tx).await.is_err() {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tx.closed() => return,
                _ = woken.recv() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Send the stored changes after `last`; `Err` when the client is gone. A
/// store that cannot be read now is tried again at the next wake-up.
async fn catch_up(store: &Store, last: &mut i64, tx: &Sender) -> Result<(), ()> {
    loop {
        let batch = match store.watch_events(*last, REPLAY_BATCH).await {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(cause = %e, "reading fleet events");
                return Ok(());
            }
        };
        for event in &batch {
            *last = event.id;
            tx.send(Ok(host_event(event))).await.map_err(|_| ())?;
        }
        if (batch.len() as i64) < REPLAY_BATCH {
            return Ok(());
        }
    }
}
