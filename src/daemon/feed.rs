//! Event streams fed from the database, so that every daemon serves every
//! deployment's events, whoever runs it.
//!
//! A stream reads the events after the last id it sent from the history,
//! then waits for a wake-up: this daemon's own deployments announce their
//! events as the recorder hands them over; on PostgreSQL, the database
//! announces every committed event (`LISTEN/NOTIFY`, see
//! `store::EventListener`), and a lost connection wakes every stream to
//! catch up; a stream also looks on its own every [`POLL`] (on SQLite this
//! is how a deployment run by a CLI is followed). Event ids of a deployment
//! are committed in order (see `store::fence`), so "after the last id"
//! never skips one.

use std::time::Duration;

use tokio::sync::broadcast;

use crate::store::{Notice, Store};

/// How often a stream looks for events when nothing woke it.
const POLL: Duration = Duration::from_millis(500);

/// Wake-ups for event streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Deployment `0` has new events.
    Deployment(i64),
    /// Anything may have happened (the listener reconnected).
    All,
}

/// The daemon's wake-ups, shared by every stream.
#[derive(Clone, Debug)]
pub struct EventFeed {
    wakes: broadcast::Sender<Wake>,
}

impl EventFeed {
    /// The feed; on PostgreSQL with a listener that runs until the daemon
    /// stops (its task is aborted with the runtime).
    pub fn start(store: &Store) -> Self {
        let (wakes, _) = broadcast::channel(1024);
        let feed = EventFeed { wakes };
        if store.backend() == crate::store::Backend::Postgres {
            let store = store.clone();
            let feed = feed.clone();
            tokio::spawn(async move { feed.listen(store).await });
        }
        feed
    }

    /// Follow the database's notifications, reconnecting when it is lost.
    async fn listen(&self, store: Store) {
        loop {
            match store.listen_events().await {
                Ok(Some(mut listener)) => {
                    // Connected (again): whatever happened meanwhile is read now.
                    let _ = self.wakes.send(Wake::All);
                    loop {
                        match listener.next().await {
                            Ok(Notice::Event { deployment, .. }) => {
                                let _ = self.wakes.send(Wake::Deployment(deployment));
                            }
                            Ok(Notice::Reconnected) => {
                                let _ = self.wakes.send(Wake::All);
                            }
                            Err(e) => {
                                tracing::warn!(cause = %e, "listening for events; retrying");
                                break;
                            }
                        }
                    }
                }
                Ok(None) => return,
                Err(e) => tracing::warn!(cause = %e, "listening for events; retrying"),
            }
            let _ = self.wakes.send(Wake::All);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// This daemon recorded an event of `deployment`.
    pub fn announce(&self, deployment: i64) {
        let _ = self.wakes.send(Wake::Deployment(deployment));
    }

    /// Wake-ups from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            wakes: self.wakes.subscribe(),
        }
    }
}

/// One stream's wake-ups.
pub struct Subscription {
    wakes: broadcast::Receiver<Wake>,
}

impl Subscription {
    /// Until `deployment` may have new events: a wake-up for it (or for
    /// all), or [`POLL`]. False when the poll timed out (nothing woke it).
    pub async fn wait(&mut self, deployment: i64) -> bool {
        let woken = async {
            loop {
                match self.wakes.recv().await {
                    Ok(Wake::Deployment(d)) if d != deployment => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return true,
                    Err(broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        tokio::time::timeout(POLL, woken).await.unwrap_or(false)
    }
}
