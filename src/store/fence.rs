//! Fencing: the deployments this process holds, each at an epoch, and the
//! guard every write of a deployment's state passes.
//!
//! A deployment row carries its lease: `holder` (the coordinator running
//! it), `epoch` (raised by every taking: creation, resume, takeover) and
//! `lease_expires_at` (the database's clock). A process remembers the epoch
//! it took each deployment at ([`Ownership`]); every write of that
//! deployment's state runs in a transaction whose first statement is
//! [`guard`]: `UPDATE deployments … WHERE id = $1 AND epoch = $2`. It locks
//! the deployment's row (so a takeover waits for a write in progress, and a
//! write waits for a takeover in progress), and it matches no row once
//! another coordinator has raised the epoch: the write is refused with
//! [`StoreError::Superseded`], and the deployment is marked lost here, for
//! good. Event ids of one deployment are therefore handed out and committed
//! in order (each insert holds its deployment's row), which is what lets
//! readers on other coordinators follow a deployment by "events after the
//! last id I saw" without ever skipping one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::StoreError;

/// One deployment this process holds.
#[derive(Clone, Debug)]
struct Held {
    epoch: i64,
    /// Gone for good: superseded by another coordinator, or not renewed in
    /// time. Set once, never cleared.
    lost: Option<Lost>,
    /// Cancelled when the deployment is lost: whoever works on it stops at
    /// once and touches no host again.
    signal: CancellationToken,
    /// When the last taking or renewal that succeeded began (this process's
    /// monotonic clock): the lease lasts at least a TTL from then.
    renewed: Instant,
    /// Asked to be handed over to another coordinator at its next safe
    /// point (this daemon is stopping).
    hand_over: bool,
}

/// Why a deployment is no longer ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// Another coordinator took it (a higher epoch).
    Superseded,
    /// Its lease could not be renewed before it would expire (the database
    /// was unreachable): someone else may take it over.
    Expired,
}

/// The deployments this process holds, by id. A std mutex: held for map
/// operations only, never across `.await`.
#[derive(Debug, Default)]
pub(super) struct Ownership {
    held: Mutex<HashMap<i64, Held>>,
}

impl Ownership {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// We took deployment `id` at `epoch` (a new taking replaces an older one).
    pub fn took(&self, id: i64, epoch: i64) {
        let renewed = Instant::now();
        let mut map = self.map();
        if let Some(old) = map.get(&id)
            && old.epoch < epoch
        {
            old.signal.cancel();
        }
        map.insert(
            id,
            Held {
                epoch,
                lost: None,
                signal: CancellationToken::new(),
                renewed,
                hand_over: false,
            },
        );
    }

    /// Ask that `id` be handed over at its next safe point (`wanted`), or
    /// no longer; false when we do not hold it (or lost it).
    pub fn set_hand_over(&self, id: i64, wanted: bool) -> bool {
        match self.map().get_mut(&id) {
            Some(held) if held.lost.is_none() => {
                held.hand_over = wanted;
                true
            }
            _ => false,
        }
    }

    /// Whether `id` is to be handed over (held, not lost, asked).
    pub fn hand_over_wanted(&self, id: i64) -> bool {
        self.map()
            .get(&id)
            .is_some_and(|h| h.lost.is_none() && h.hand_over)
    }

    /// The deployments asked to be handed over, by id.
    pub fn handing_over(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .map()
            .iter()
            .filter(|(_, h)| h.lost.is_none() && h.hand_over)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// We let deployment `id` go (finished, or handed back).
    pub fn released(&self, id: i64) {
        self.map().remove(&id);
    }

    /// The epoch writes of `id` must carry, or why there is none.
    pub fn epoch(&self, id: i64) -> Result<i64, StoreError> {
        match self.map().get(&id) {
            Some(Held {
                epoch, lost: None, ..
            }) => Ok(*epoch),
            Some(Held {
                epoch,
                lost: Some(lost),
                ..
            }) => Err(StoreError::Superseded {
                deployment_id: id,
                epoch: *epoch,
                lost: *lost,
            }),
            None => Err(StoreError::NotHeld { deployment_id: id }),
        }
    }

    /// Mark `id` lost (if we still hold it at `epoch`) and tell its workers.
    pub fn lose(&self, id: i64, epoch: i64, why: Lost) {
        if let Some(held) = self.map().get_mut(&id)
            && held.epoch == epoch
            && held.lost.is_none()
        {
            held.lost = Some(why);
            held.signal.cancel();
        }
    }

    /// The leases of `renewed` (id, epoch) were renewed by a query that
    /// began `at`.
    pub fn renewed(&self, renewed: &[(i64, i64)], at: Instant) {
        let mut map = self.map();
        for (id, epoch) in renewed {
            if let Some(held) = map.get_mut(id)
                && held.epoch == *epoch
                && held.renewed < at
            {
                held.renewed = at;
            }
        }
    }

    /// Give up every deployment whose lease was not renewed for `valid_for`:
    /// it may expire any moment, and someone else may take it over. Returns
    /// their ids.
    pub fn expire(&self, valid_for: Duration) -> Vec<i64> {
        let mut expired = Vec::new();
        for (id, held) in self.map().iter_mut() {
            if held.lost.is_none() && held.renewed.elapsed() > valid_for {
                held.lost = Some(Lost::Expired);
                held.signal.cancel();
                expired.push(*id);
            }
        }
        expired.sort_unstable();
        expired
    }

    /// Cancelled when `id` is lost; `None` when we do not hold it.
    pub fn signal(&self, id: i64) -> Option<CancellationToken> {
        self.map().get(&id).map(|h| h.signal.clone())
    }

    /// Every deployment held and not lost, with its epoch.
    pub fn current(&self) -> Vec<(i64, i64)> {
        let mut held: Vec<(i64, i64)> = self
            .map()
            .iter()
            .filter(|(_, h)| h.lost.is_none())
            .map(|(id, h)| (*id, h.epoch))
            .collect();
        held.sort_unstable();
        held
    }
}

impl super::Store {
    /// The fence hosts check for deployment `id` (see
    /// `nix_deploy_core::remote::fence`): its id, its creation time and the
    /// epoch this process holds it at. Refused when this process does not
    /// hold it (any more).
    pub async fn host_fence(&self, id: i64) -> Result<nix_deploy_core::remote::Fence, StoreError> {
        let epoch = self.ownership.epoch(id)?;
        let (created_at,): (i64,) =
            sqlx::query_as("SELECT created_at FROM deployments WHERE id = $1")
                .bind(id)
                .fetch_one(&self.pool)
                .await
                .map_err(super::query_error("reading a deployment's fence"))?;
        // Rows always have a positive id and creation time; epochs are
        // never negative.
        nix_deploy_core::remote::Fence::new(id, created_at, epoch)
            .map_err(|_| StoreError::NotHeld { deployment_id: id })
    }

    /// A host refused deployment `id` at `epoch`: it has seen a newer one,
    /// so another coordinator took the deployment over. Lost here for good,
    /// as when the database refuses a write: later writes are refused and
    /// its workers are told ([`super::Store::lost_signal`]).
    pub fn fenced_out(&self, id: i64, epoch: i64) {
        self.ownership.lose(id, epoch, Lost::Superseded);
    }
}

/// The first statement of a fenced write: locks deployment `id`'s row and
/// checks it is still at `epoch`; `false` when it is not.
pub(super) async fn guard(
    conn: &mut sqlx::AnyConnection,
    id: i64,
    epoch: i64,
) -> Result<bool, sqlx::Error> {
    let rows = sqlx::query("UPDATE deployments SET epoch = epoch WHERE id = $1 AND epoch = $2")
        .bind(id)
        .bind(epoch)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(rows == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_deployment_stays_lost_and_says_why() {
        let ownership = Ownership::default();
        assert!(matches!(
            ownership.epoch(7),
            Err(StoreError::NotHeld { deployment_id: 7 })
        ));
        ownership.took(7, 3);
        assert_eq!(ownership.epoch(7).unwrap(), 3);
        let signal = ownership.signal(7).unwrap();
        // An older epoch's loss is not this one's.
        ownership.lose(7, 2, Lost::Superseded);
        assert!(!signal.is_cancelled());
        ownership.lose(7, 3, Lost::Expired);
        assert!(signal.is_cancelled());
        assert!(matches!(
            ownership.epoch(7),
            Err(StoreError::Superseded {
                epoch: 3,
                lost: Lost::Expired,
                ..
            })
        ));
        assert!(ownership.current().is_empty());
        // Not renewed for longer than it may be: lost.
        ownership.took(8, 1);
        assert!(ownership.expire(Duration::from_secs(60)).is_empty());
        std::thread::sleep(Duration::from_millis(5));
        ownership.renewed(&[(8, 1)], Instant::now());
        assert!(ownership.expire(Duration::from_millis(3)).is_empty());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(ownership.expire(Duration::from_millis(3)), [8]);
        assert!(ownership.epoch(8).is_err());
        // Taken again (a resume here): ours again, at the new epoch.
        ownership.took(7, 5);
        assert_eq!(ownership.epoch(7).unwrap(), 5);
        assert_eq!(ownership.current(), [(7, 5)]);
        // Asked to be handed over, and no longer; never one we lost.
        assert!(ownership.set_hand_over(7, true));
        assert!(ownership.hand_over_wanted(7));
        assert_eq!(ownership.handing_over(), [7]);
        assert!(ownership.set_hand_over(7, false));
        assert!(!ownership.hand_over_wanted(7) && ownership.handing_over().is_empty());
        assert!(!ownership.set_hand_over(8, true), "lost");
        assert!(!ownership.set_hand_over(9, true), "never held");
        ownership.released(7);
        assert!(ownership.signal(7).is_none());
    }
}
