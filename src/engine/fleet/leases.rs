//! Leases: one run per host at a time. A run takes the leases of all its
//! hosts or none (compare-and-swap rows in the store), one heartbeat renews
//! them for as long as it holds them, and a lease is taken over only when
//! its holder's process is gone.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::engine::EngineError;
use crate::engine::host::recorder::Recorder;
use crate::store::Store;

/// The leases one run holds on its hosts, renewed by one heartbeat for as
/// long as it holds them (whatever the run is doing: deploying, settling,
/// rolling back).
pub(crate) struct Leases {
    store: Store,
    owner: String,
    renewal: Background,
}

impl Leases {
    /// Take the leases of `hosts`, all or none. With `wait`, wait for busy
    /// hosts to be released (until `cancel`, or a cancel request for the
    /// queued deployment `queued` records, which is told what it waits for).
    pub async fn acquire(
        store: &Store,
        hosts: &[String],
        wait: bool,
        cancel: &CancellationToken,
        queued: Option<&Recorder>,
    ) -> Result<Leases, EngineError> {
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let mut told = false;
        loop {
            // A recorded, queued deployment waits its turn: first come,
            // first served per host; one a newer push superseded never
            // starts.
            let ahead = match queued {
                Some(recorder) => {
                    let id = recorder.deployment_id();
                    if let Some(why) = store.superseded_by(id).await? {
                        return Err(EngineError::Superseded(why));
                    }
                    store.queued_ahead(id, hosts).await?
                }
                None => None,
            };
            let mut refused = ahead.map(|ahead| {
                (
                    hosts.first().cloned().unwrap_or_default(),
                    format!("deployment #{ahead}, queued before it"),
                )
            });
            if refused.is_none() {
                for host in hosts {
                    if let Err(holder) = store.try_lease(host, &owner, None).await? {
                        refused = Some((host.clone(), holder.to_string()));
                        break;
                    }
                }
            }
            let Some((host, holder)) = refused else {
                let renewal = {
                    let store = store.clone();
                    let owner = owner.clone();
                    Background(tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(store.lease_timing().heartbeat).await;
                            let _ = store.renew_leases(&owner, None).await;
                        }
                    }))
                };
                return Ok(Leases {
                    store: store.clone(),
                    owner,
                    renewal,
                });
            };
            store.release_leases(&owner).await?;
            if let Some(recorder) = queued {
                if store.cancel_requested(recorder.deployment_id()).await? {
                    cancel.cancel();
                }
                if wait && !told {
                    told = true;
                    recorder
                        .log(None, format!("queued: {host} is busy ({holder})"))
                        .await?;
                }
            }
            if !wait || cancel.is_cancelled() {
                return Err(EngineError::Busy { host, holder });
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }

    /// Name deployment `id` on the leases, and listen for `nix-deploy
    /// cancel` while it runs: stopped when the returned guard drops.
    pub async fn watch_cancel(&self, id: i64, cancel: &CancellationToken) -> Background {
        let _ = self.store.renew_leases(&self.owner, Some(id)).await;
        let store = self.store.clone();
        let cancel = cancel.clone();
        Background(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if !cancel.is_cancelled() && store.cancel_requested(id).await.unwrap_or(false) {
                    cancel.cancel();
                }
            }
        }))
    }

    pub async fn release(self) {
        self.renewal.0.abort();
        let _ = self.store.release_leases(&self.owner).await;
    }
}

/// A background task of a run; stops when dropped.
pub(crate) struct Background(JoinHandle<()>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}
