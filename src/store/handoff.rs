//! Handing deployments over when a daemon stops (PostgreSQL only): the
//! stopping daemon takes nothing over any more and says so
//! ([`Store::stop_taking_over`], which also names the live daemons that take
//! deployments over: whom it may hand its own to); each of its deployments,
//! asked to ([`Store::ask_hand_over`]), stops at a safe point and lets its
//! lease go at once ([`Store::hand_over`]): expired by the database's clock,
//! held by nobody, so a peer takes it over at its next heartbeat through
//! the takeover path (`Store::take_over`), which resumes it.
//!
//! The request lives with the deployment's ownership in this process
//! (`fence::Ownership`): it is this process's intent, read by the engine at
//! its safe points ([`Store::hand_over_wanted`]).

use super::{Store, StoreError, query_error};

impl Store {
    /// This coordinator stops: from now on it takes no deployment over, and
    /// its row says it is stopping. Returns the other live daemons that
    /// take deployments over (and are not stopping): whom this one may hand
    /// its deployments to.
    pub async fn stop_taking_over(&self) -> Result<Vec<String>, StoreError> {
        let context = "handing deployments over";
        sqlx::query("UPDATE coordinators SET takeover = 0, stopping = 1 WHERE id = $1")
            .bind(self.holder())
            .execute(&self.pool)
            .await
            .map_err(query_error(context))?;
        let peers: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM coordinators
             WHERE id <> $1 AND kind = 'daemon' AND takeover = 1 AND stopping = 0
               AND heartbeat_at > (SELECT now_ms FROM db_clock) - $2
             ORDER BY id",
        )
        .bind(self.holder())
        .bind(self.ttl_ms())
        .fetch_all(&self.pool)
        .await
        .map_err(query_error(context))?;
        Ok(peers.into_iter().map(|(id,)| id).collect())
    }

    /// Ask that deployment `id` be handed over at its next safe point; false
    /// when this process does not hold it.
    pub fn ask_hand_over(&self, id: i64) -> bool {
        self.ownership.set_hand_over(id, true)
    }

    /// Take the request back: `id` ends as it would have without it.
    pub fn withdraw_hand_over(&self, id: i64) {
        self.ownership.set_hand_over(id, false);
    }

    /// Whether deployment `id` is to be handed over (asked, and still held).
    pub fn hand_over_wanted(&self, id: i64) -> bool {
        self.ownership.hand_over_wanted(id)
    }

    /// The deployments this process was asked to hand over and still holds.
    pub fn handing_over(&self) -> Vec<i64> {
        self.ownership.handing_over()
    }

    /// Let deployment `id` go for another coordinator to take over now:
    /// still `running`, its lease expired by the database's clock and held
    /// by nobody, counted in this coordinator's row; a fenced write (refused
    /// when another coordinator took it meanwhile). This process holds it
    /// no more.
    pub async fn hand_over(&self, id: i64) -> Result<(), StoreError> {
        let context = "handing a deployment over";
        let mut tx = self.fenced(id, context).await?;
        sqlx::query(
            "UPDATE deployments SET holder = NULL, lease_expires_at = (SELECT now_ms FROM db_clock) - 1
             WHERE id = $1 AND status = 'running'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(query_error(context))?;
        sqlx::query("UPDATE coordinators SET handed_over = handed_over + 1 WHERE id = $1")
            .bind(self.holder())
            .execute(&mut *tx)
            .await
            .map_err(query_error(context))?;
        tx.commit().await.map_err(query_error(context))?;
        self.ownership.released(id);
        Ok(())
    }
}
