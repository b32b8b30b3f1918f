//! The fleet as the watch sees it: `GET /api/v1/fleet` (every host's
//! desired, running, booted and boot-default systems, drift kinds with their
//! times, health, reachability, last sight) and `GET /api/v1/fleet/events`,
//! a Server-Sent-Event stream of its changes.
//!
//! The stream starts with a `snapshot` event (the whole fleet document, with
//! the id of the last change it includes), then one `host` event per change
//! (a `FleetEvent`: the host, what appeared and cleared, its whole new
//! state). With `Last-Event-ID`, it replays the changes after that id
//! instead of the snapshot, or sends a snapshot when they are no longer
//! kept.

use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;

use nix_deploy_core::watch::{FleetEvent, FleetReport};

use crate::daemon::auth::authorize;
use crate::daemon::config::Scope;
use crate::daemon::{ApiError, AppState};

/// Changes replayed or caught up per read of the store.
const REPLAY_BATCH: i64 = 500;

pub async fn fleet(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<FleetReport>, ApiError> {
    authorize(&headers, &state.tokens, Scope::Read)?;
    Ok(Json(state.fleet.snapshot()))
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

pub async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&headers, &state.tokens, Scope::Read)?;
    let after: Option<i64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    // Subscribe before reading the store, so nothing falls between the two.
    let mut live = state.fleet.subscribe();
    let store = state.store().clone();
    let stop = state.shutdown.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(256);
    tokio::spawn(async move {
        let send = |event: SseEvent| tx.send(Ok(event));
        let (oldest, newest) = store.watch_event_ids().await.unwrap_or((0, 0));
        // Replay from `after` when everything after it is still kept.
        let mut last = match after {
            Some(after) if after + 1 >= oldest => after,
            _ => {
                // The snapshot holds every change stored before it was taken.
                if send(snapshot_event(&state.fleet.snapshot(), newest))
                    .await
                    .is_err()
                {
                    return;
                }
                newest
            }
        };
        if catch_up(&store, &mut last, &send).await.is_err() {
            return;
        }
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => return,
                received = live.recv() => received,
            };
            match received {
                Ok(event) if event.id <= last => {}
                Ok(event) => {
                    last = event.id;
                    if send(host_event(&event)).await.is_err() {
                        return;
                    }
                }
                // Fell behind: the store has everything.
                Err(RecvError::Lagged(_)) => {
                    if catch_up(&store, &mut last, &send).await.is_err() {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Send the stored changes after `last`; `Err` when the client is gone.
async fn catch_up<F, Fut>(store: &crate::store::Store, last: &mut i64, send: &F) -> Result<(), ()>
where
    F: Fn(SseEvent) -> Fut,
    Fut: Future<
        Output = Result<(), tokio::sync::mpsc::error::SendError<Result<SseEvent, Infallible>>>,
    >,
{
    loop {
        let batch = store.watch_events(*last, REPLAY_BATCH).await.map_err(|e| {
            tracing::warn!(cause = %e, "replaying fleet events");
        })?;
        for event in &batch {
            *last = event.id;
            send(host_event(event)).await.map_err(|_| ())?;
        }
        if (batch.len() as i64) < REPLAY_BATCH {
            return Ok(());
        }
    }
}
