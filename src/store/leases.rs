//! One deployment at a time per host: a lease row per host with an owner and
//! an expiry, taken by compare-and-swap, renewed while the owner works.

use std::time::Duration;

use serde::Serialize;
use sqlx::Row;

use super::{Store, StoreError, query_error};
use crate::now_ms;

/// Who holds a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub host: String,
    pub owner: String,
    pub deployment_id: Option<i64>,
    pub pid: i64,
    /// The holder's liveness lock (see `liveness`).
    pub holder: Option<String>,
    pub expires_at: i64,
}

impl std::fmt::Display for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.deployment_id {
            Some(id) => write!(f, "deployment #{id} (pid {})", self.pid),
            None => write!(f, "another nix-deploy run (pid {})", self.pid),
        }
    }
}

impl Store {
    pub(super) fn lease_from_row(row: &sqlx::sqlite::SqliteRow) -> Lease {
        Lease {
            host: row.get("host"),
            owner: row.get("owner"),
            deployment_id: row.get("deployment_id"),
            pid: row.get("pid"),
            holder: row.get("holder"),
            expires_at: row.get("expires_at"),
        }
    }

    pub async fn lease(&self, host: &str) -> Result<Option<Lease>, StoreError> {
        let row = sqlx::query("SELECT * FROM leases WHERE host = ?")
            .bind(host)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a lease"))?;
        Ok(row.as_ref().map(Self::lease_from_row))
    }

    /// Take the lease of `host` for `owner`, or say who holds it. A lease is
    /// taken over only when its holder's process is gone: a live holder is
    /// never overridden, however long it works (its expiry is informational,
    /// kept fresh by the holder's heartbeat). Compare-and-swap on the old row,
    /// so two racing owners cannot both win.
    pub async fn try_lease(
        &self,
        host: &str,
        owner: &str,
        deployment_id: Option<i64>,
        ttl: Duration,
    ) -> Result<Result<(), Lease>, StoreError> {
        let now = now_ms();
        let expires = now + ttl.as_millis() as i64;
        let pid = std::process::id() as i64;
        let changed = match self.lease(host).await? {
            None => sqlx::query(
                "INSERT INTO leases (host, owner, deployment_id, pid, holder, acquired_at, expires_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (host) DO NOTHING",
            )
            .bind(host)
            .bind(owner)
            .bind(deployment_id)
            .bind(pid)
            .bind(self.holder())
            .bind(now)
            .bind(expires)
            .execute(&self.pool)
            .await
            .map_err(query_error("taking a lease"))?
            .rows_affected(),
            Some(held) => {
                let ours = held.owner == owner;
                let dead = !self.holder_alive(held.holder.as_deref(), Some(held.pid));
                if !ours && !dead {
                    return Ok(Err(held));
                }
                sqlx::query(
                    "UPDATE leases SET owner = ?, deployment_id = ?, pid = ?, holder = ?, acquired_at = ?, expires_at = ?
                     WHERE host = ? AND owner = ? AND expires_at = ?",
                )
                .bind(owner)
                .bind(deployment_id)
                .bind(pid)
                .bind(self.holder())
                .bind(now)
                .bind(expires)
                .bind(host)
                .bind(&held.owner)
                .bind(held.expires_at)
                .execute(&self.pool)
                .await
                .map_err(query_error("taking over a lease"))?
                .rows_affected()
            }
        };
        if changed == 1 {
            Ok(Ok(()))
        } else {
            // Somebody else won the race; report them.
            Ok(Err(self.lease(host).await?.unwrap_or(Lease {
                host: host.to_string(),
                owner: "unknown".into(),
                deployment_id: None,
                pid: 0,
                holder: None,
                expires_at: now,
            })))
        }
    }

    /// Extend every lease of `owner` (and name its deployment once known).
    pub async fn renew_leases(
        &self,
        owner: &str,
        deployment_id: Option<i64>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE leases SET expires_at = ?, deployment_id = COALESCE(?, deployment_id) WHERE owner = ?",
        )
        .bind(now_ms() + ttl.as_millis() as i64)
        .bind(deployment_id)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(query_error("renewing leases"))?;
        Ok(())
    }

    pub async fn release_leases(&self, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE owner = ?")
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(query_error("releasing leases"))?;
        Ok(())
    }
}
