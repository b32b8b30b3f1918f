//! One deployment at a time per host, across every coordinator and CLI using
//! this history: a lease row per host with an owner (one run), its holder
//! (the process), the epoch of the deployment it serves, and an expiry by
//! the database's clock, taken by compare-and-swap and renewed while the
//! owner works.
//!
//! A lease is taken over only when its holder is gone: on SQLite, when the
//! holder's flock in the state directory is free (every coordinator is on
//! this machine; a live holder is never overridden, however long it works);
//! on PostgreSQL, when the lease expired unrenewed (the coordinators may be
//! on different machines, so liveness is the heartbeat).

use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, query_error};

/// Who holds a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub host: String,
    pub owner: String,
    pub deployment_id: Option<i64>,
    pub pid: i64,
    /// The holder's coordinator id (and liveness lock, see `liveness`).
    pub holder: Option<String>,
    /// The epoch of its deployment this lease serves.
    pub epoch: i64,
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

fn lease_from_row(row: &AnyRow) -> Lease {
    Lease {
        host: row.get("host"),
        owner: row.get("owner"),
        deployment_id: row.get("deployment_id"),
        pid: row.get("pid"),
        holder: row.get("holder"),
        epoch: row.get("epoch"),
        expires_at: row.get("expires_at"),
    }
}

impl Store {
    pub async fn lease(&self, host: &str) -> Result<Option<Lease>, StoreError> {
        let row = sqlx::query("SELECT * FROM leases WHERE host = $1")
            .bind(host)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a lease"))?;
        Ok(row.as_ref().map(lease_from_row))
    }

    /// Every host lease, by host.
    pub async fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let rows = sqlx::query("SELECT * FROM leases ORDER BY host")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading leases"))?;
        Ok(rows.iter().map(lease_from_row).collect())
    }

    /// The epoch a lease of deployment `id` serves (0 before it has one).
    fn lease_epoch(&self, deployment_id: Option<i64>) -> i64 {
        deployment_id
            .and_then(|id| self.ownership.epoch(id).ok())
            .unwrap_or(0)
    }

    /// Take the lease of `host` for `owner`, or say who holds it. The lease
    /// lasts this store's TTL unless renewed. Compare-and-swap on the old
    /// row, so two racing owners cannot both win.
    pub async fn try_lease(
        &self,
        host: &str,
        owner: &str,
        deployment_id: Option<i64>,
    ) -> Result<Result<(), Lease>, StoreError> {
        let pid = std::process::id() as i64;
        let epoch = self.lease_epoch(deployment_id);
        let changed = match self.lease(host).await? {
            None => sqlx::query(
                "INSERT INTO leases (host, owner, deployment_id, pid, holder, epoch, acquired_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, (SELECT now_ms FROM db_clock),
                         (SELECT now_ms FROM db_clock) + $7)
                 ON CONFLICT (host) DO NOTHING",
            )
            .bind(host)
            .bind(owner)
            .bind(deployment_id)
            .bind(pid)
            .bind(self.holder())
            .bind(epoch)
            .bind(self.ttl_ms())
            .execute(&self.pool)
            .await
            .map_err(query_error("taking a lease"))?
            .rows_affected(),
            Some(held) => {
                let ours = held.owner == owner;
                // SQLite: the holder's flock says; PostgreSQL: the expiry,
                // checked by the database in the swap below.
                if !ours
                    && !self.liveness_by_lease()
                    && self.holder_alive(held.holder.as_deref(), Some(held.pid))
                {
                    return Ok(Err(held));
                }
                sqlx::query(
                    "UPDATE leases SET owner = $1, deployment_id = $2, pid = $3, holder = $4, epoch = $5,
                         acquired_at = (SELECT now_ms FROM db_clock),
                         expires_at = (SELECT now_ms FROM db_clock) + $6
                     WHERE host = $7 AND owner = $8 AND expires_at = $9
                       AND ($10 = 1 OR $11 = 0 OR expires_at < (SELECT now_ms FROM db_clock))",
                )
                .bind(owner)
                .bind(deployment_id)
                .bind(pid)
                .bind(self.holder())
                .bind(epoch)
                .bind(self.ttl_ms())
                .bind(host)
                .bind(&held.owner)
                .bind(held.expires_at)
                .bind(i64::from(ours))
                .bind(i64::from(self.liveness_by_lease()))
                .execute(&self.pool)
                .await
                .map_err(query_error("taking over a lease"))?
                .rows_affected()
            }
        };
        if changed == 1 {
            Ok(Ok(()))
        } else {
            // Somebody else holds it, or won the race: report them.
            Ok(Err(self.lease(host).await?.unwrap_or(Lease {
                host: host.to_string(),
                owner: "unknown".into(),
                deployment_id: None,
                pid: 0,
                holder: None,
                epoch: 0,
                expires_at: 0,
            })))
        }
    }

    /// Extend every lease of `owner` (and name its deployment once known,
    /// at the epoch this process holds it). A lease whose deployment another
    /// coordinator took since is not renewed.
    pub async fn renew_leases(
        &self,
        owner: &str,
        deployment_id: Option<i64>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE leases SET expires_at = (SELECT now_ms FROM db_clock) + $1,
                 deployment_id = COALESCE($2, deployment_id),
                 epoch = CASE WHEN $2 IS NULL THEN epoch ELSE $3 END
             WHERE owner = $4 AND (COALESCE($2, deployment_id) IS NULL OR EXISTS (
                 SELECT 1 FROM deployments d WHERE d.id = COALESCE($2, leases.deployment_id)
                   AND d.epoch = CASE WHEN $2 IS NULL THEN leases.epoch ELSE $3 END))",
        )
        .bind(self.ttl_ms())
        .bind(deployment_id)
        .bind(self.lease_epoch(deployment_id))
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(query_error("renewing leases"))?;
        Ok(())
    }

    pub async fn release_leases(&self, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(query_error("releasing leases"))?;
        Ok(())
    }

    /// The TTL of this process's leases, in the database's milliseconds.
    pub(super) fn ttl_ms(&self) -> i64 {
        i64::try_from(self.leases.ttl.as_millis()).unwrap_or(i64::MAX)
    }
}
