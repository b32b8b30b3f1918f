//! Several coordinators on one history: each process's heartbeat (its row
//! in `coordinators`, the leases of the deployments and hosts it holds),
//! the leader's election, and taking over a deployment whose holder's lease
//! expired.
//!
//! The election is River's: one table (`leader`), one query per transition
//! (elect, reelect, resign), the database's clock, a fixed TTL (the lease
//! TTL); nothing else writes that table. A fourth query, `lead`, fences the
//! leader's own writes (the watch's): it locks our unexpired term for the
//! length of a transaction.
//!
//! A holder that cannot renew (the database is unreachable) stops acting on
//! its deployments one heartbeat before their leases can expire, by its own
//! monotonic clock counted from the start of its last renewal: the database
//! counts the TTL from a later moment, so nobody else can have taken them
//! yet ([`super::LeaseTiming::valid_for`]). Only with PostgreSQL: on SQLite
//! every coordinator is on one machine and liveness is the holder's flock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use sqlx::Row;
use tokio::task::JoinHandle;

use nix_deploy_core::cluster::{ClusterReport, Coordinator, DeploymentLease};
use nix_deploy_core::events::EventKind;

use sqlx::AssertSqlSafe;

use super::{IN_LIST, Lost, Store, StoreError, parameters, query_error};

/// The election's one row.
const ELECTION: &str = "fleet";

/// How a deployment's previous holder let it go before it was taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// Its lease expired: it died, froze or lost the database.
    Expired,
    /// It handed the deployment over as it stopped (`Store::hand_over`).
    HandedOver,
}

/// What a coordinator process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `nix-deploy serve`: stands for leader; with `takeover`, resumes
    /// deployments whose holder's lease expired.
    Daemon { takeover: bool },
    /// A command working in-process.
    Cli,
}

impl Role {
    fn kind(self) -> &'static str {
        match self {
            Role::Daemon { .. } => "daemon",
            Role::Cli => "cli",
        }
    }

    fn takeover(self) -> bool {
        matches!(self, Role::Daemon { takeover: true })
    }
}

/// This process's heartbeat: renews its leases every
/// [`super::LeaseTiming::heartbeat`] until stopped (or dropped).
pub struct Heartbeat {
    store: Store,
    task: JoinHandle<()>,
    leader: Arc<Leadership>,
}

/// Whether this process leads, and until when it may act as leader.
#[derive(Debug, Default)]
struct Leadership {
    elected: AtomicBool,
    since: std::sync::Mutex<Option<Instant>>,
}

/// Whether this process leads: cheap to clone and ask.
#[derive(Clone, Debug)]
pub struct Leader {
    leadership: Arc<Leadership>,
    valid_for: std::time::Duration,
}

impl Leader {
    /// Whether this process is the elected leader now (its term renewed
    /// recently enough that nobody else can have been elected).
    pub fn is_leader(&self) -> bool {
        if !self.leadership.elected.load(Ordering::SeqCst) {
            return false;
        }
        let since = *self
            .leadership
            .since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        since.is_some_and(|s| s.elapsed() <= self.valid_for)
    }
}

impl Heartbeat {
    /// Whether this process is the elected leader now.
    pub fn is_leader(&self) -> bool {
        self.leader().is_leader()
    }

    /// A handle on this process's leadership.
    pub fn leader(&self) -> Leader {
        Leader {
            leadership: self.leader.clone(),
            valid_for: self.store.leases.valid_for(),
        }
    }

    /// Stop: resign the leadership and leave the coordinators table (the
    /// leases this process still holds expire by themselves).
    pub async fn stop(self) {
        self.task.abort();
        let store = self.store.clone();
        let _ = store.resign().await;
        let _ = sqlx::query("DELETE FROM coordinators WHERE id = $1")
            .bind(store.holder())
            .execute(&store.pool)
            .await;
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Store {
    /// Register this process as a coordinator and renew its leases from now
    /// on (a daemon also stands for leader).
    pub async fn start_heartbeat(&self, role: Role) -> Result<Heartbeat, StoreError> {
        let leader = Arc::new(Leadership::default());
        self.beat(role, &leader).await?;
        let store = self.clone();
        let shared = leader.clone();
        let task = tokio::spawn(async move {
            let timing = store.leases;
            // Checked between heartbeats too: a renewal stuck on an
            // unreachable database must not keep us acting past our lease.
            let mut check = tokio::time::interval(timing.heartbeat / 4);
            let mut next = tokio::time::Instant::now() + timing.heartbeat;
            let beat = store.beat(role, &shared);
            tokio::pin!(beat);
            let mut beating = false;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(next), if !beating => {
                        beat.set(store.beat(role, &shared));
                        beating = true;
                    }
                    result = &mut beat, if beating => {
                        beating = false;
                        next = tokio::time::Instant::now() + timing.heartbeat;
                        if let Err(e) = result {
                            tracing::warn!(cause = %e, "renewing this coordinator's leases");
                        }
                    }
                    _ = check.tick() => {
                        if store.liveness_by_lease() {
                            for id in store.ownership.expire(timing.valid_for()) {
                                tracing::error!(
                                    deployment = id,
                                    "the lease could not be renewed in time: this coordinator stops acting on the deployment"
                                );
                            }
                        }
                    }
                }
            }
        });
        Ok(Heartbeat {
            store: self.clone(),
            task,
            leader,
        })
    }

    /// One heartbeat: this coordinator's row, its deployments' and hosts'
    /// leases, and (a daemon) the election.
    async fn beat(&self, role: Role, leader: &Leadership) -> Result<(), StoreError> {
        let started = Instant::now();
        let context = "renewing this coordinator's leases";
        sqlx::query(
            "INSERT INTO coordinators (id, kind, hostname, pid, version, takeover, started_at, heartbeat_at)
             VALUES ($1, $2, $3, $4, $5, $6, (SELECT now_ms FROM db_clock), (SELECT now_ms FROM db_clock))
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(self.holder())
        .bind(role.kind())
        .bind(hostname())
        .bind(std::process::id() as i64)
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(i64::from(role.takeover()))
        .execute(&self.pool)
        .await
        .map_err(query_error(context))?;
        // Only what we hold and have not given up: a deployment lost here
        // (not renewed in time) must expire, so that it can be taken over.
        let held = self.ownership.current();
        let held_ids: Vec<i64> = held.iter().map(|(id, _)| *id).take(IN_LIST).collect();
        let mut renewed: Vec<(i64, i64)> = Vec::new();
        if !held_ids.is_empty() {
            let sql = format!(
                "UPDATE deployments SET lease_expires_at = (SELECT now_ms FROM db_clock) + $1
                 WHERE holder = $2 AND lease_expires_at IS NOT NULL
                   AND status IN ('queued', 'running', 'waiting-for-window', 'awaiting-approval', 'interrupted') AND id IN ({})
                 RETURNING id, epoch",
                parameters(3, held_ids.len())
            );
            let mut query = sqlx::query_as(AssertSqlSafe(sql))
                .bind(self.ttl_ms())
                .bind(self.holder());
            for id in &held_ids {
                query = query.bind(*id);
            }
            renewed = query
                .fetch_all(&self.pool)
                .await
                .map_err(query_error(context))?;
        }
        self.ownership.renewed(&renewed, started);
        for (id, epoch) in held {
            if !renewed.contains(&(id, epoch)) {
                self.settle_unrenewed(id, epoch).await?;
            }
        }
        // Host leases of runs not yet named, and of deployments held here at
        // the epoch they serve.
        let sql = format!(
            "UPDATE leases SET expires_at = (SELECT now_ms FROM db_clock) + $1
             WHERE holder = $2 AND (deployment_id IS NULL OR (deployment_id IN ({}) AND EXISTS (
                 SELECT 1 FROM deployments d WHERE d.id = leases.deployment_id AND d.epoch = leases.epoch)))",
            if held_ids.is_empty() {
                "NULL".to_string()
            } else {
                parameters(3, held_ids.len())
            }
        );
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .bind(self.ttl_ms())
            .bind(self.holder());
        for id in &held_ids {
            query = query.bind(*id);
        }
        query
            .execute(&self.pool)
            .await
            .map_err(query_error(context))?;
        if let Role::Daemon { .. } = role {
            let leads = if leader.elected.load(Ordering::SeqCst) {
                self.reelect().await?
            } else {
                self.elect().await?
            };
            if leads {
                *leader.since.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
                // Coordinators silent for a day are forgotten.
                sqlx::query(
                    "DELETE FROM coordinators WHERE heartbeat_at < (SELECT now_ms FROM db_clock) - 86400000",
                )
                .execute(&self.pool)
                .await
                .map_err(query_error(context))?;
            }
            leader.elected.store(leads, Ordering::SeqCst);
        }
        Ok(())
    }

    /// A deployment held here whose lease the heartbeat did not renew:
    /// finished (let go), or taken by another coordinator (lost).
    async fn settle_unrenewed(&self, id: i64, epoch: i64) -> Result<(), StoreError> {
        let row = sqlx::query(
            "SELECT epoch, holder, status, lease_expires_at FROM deployments WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("reading a deployment's lease"))?;
        let Some(row) = row else {
            self.ownership.released(id);
            return Ok(());
        };
        let theirs = row.get::<i64, _>("epoch") != epoch
            || row.get::<Option<String>, _>("holder").as_deref() != Some(self.holder());
        let status: String = row.get("status");
        let ended = row.get::<Option<i64>, _>("lease_expires_at").is_none()
            || !matches!(status.as_str(), "running" | "queued" | "interrupted");
        if theirs {
            tracing::error!(
                deployment = id,
                epoch,
                "another coordinator took this deployment: this one stops acting on it"
            );
            self.ownership.lose(id, epoch, Lost::Superseded);
        } else if ended {
            self.ownership.released(id);
        }
        // Otherwise taken after the renewal began: renewed next time.
        Ok(())
    }

    /// Elect: take the leadership if nobody holds an unexpired term.
    async fn elect(&self) -> Result<bool, StoreError> {
        let won = sqlx::query(
            "INSERT INTO leader (name, leader_id, elected_at, expires_at)
             VALUES ($1, $2, (SELECT now_ms FROM db_clock), (SELECT now_ms FROM db_clock) + $3)
             ON CONFLICT (name) DO UPDATE SET leader_id = excluded.leader_id,
                 elected_at = excluded.elected_at, expires_at = excluded.expires_at
             WHERE leader.expires_at < (SELECT now_ms FROM db_clock)",
        )
        .bind(ELECTION)
        .bind(self.holder())
        .bind(self.ttl_ms())
        .execute(&self.pool)
        .await
        .map_err(query_error("standing for leader"))?
        .rows_affected();
        Ok(won == 1)
    }

    /// Reelect: extend our own term; false when it is no longer ours.
    async fn reelect(&self) -> Result<bool, StoreError> {
        let kept = sqlx::query(
            "UPDATE leader SET expires_at = (SELECT now_ms FROM db_clock) + $1
             WHERE name = $2 AND leader_id = $3",
        )
        .bind(self.ttl_ms())
        .bind(ELECTION)
        .bind(self.holder())
        .execute(&self.pool)
        .await
        .map_err(query_error("renewing the leadership"))?
        .rows_affected();
        Ok(kept == 1)
    }

    /// Lead: within `tx`, lock our own unexpired term (a write that changes
    /// nothing), so that work only the leader may do (the watch's writes)
    /// commits only while we lead, and no other coordinator is elected
    /// before it does. False when the term is not ours (or expired).
    pub(super) async fn lead(&self, tx: &mut sqlx::AnyConnection) -> Result<bool, sqlx::Error> {
        let held = sqlx::query(
            "UPDATE leader SET expires_at = expires_at
             WHERE name = $1 AND leader_id = $2 AND expires_at >= (SELECT now_ms FROM db_clock)",
        )
        .bind(ELECTION)
        .bind(self.holder())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        Ok(held == 1)
    }

    /// Resign: give the leadership up at once (on shutdown).
    async fn resign(&self) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leader WHERE name = $1 AND leader_id = $2")
            .bind(ELECTION)
            .bind(self.holder())
            .execute(&self.pool)
            .await
            .map_err(query_error("resigning the leadership"))?;
        Ok(())
    }

    /// Running deployments whose holder's lease expired (by the database's
    /// clock), with the epoch they were held at: candidates for a takeover.
    pub async fn expired_deployments(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        sqlx::query_as(
            "SELECT id, epoch FROM deployments
             WHERE status = 'running' AND lease_expires_at < (SELECT now_ms FROM db_clock)
             ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("finding expired deployments"))
    }

    /// Take deployment `id` from the holder whose lease expired at `epoch`:
    /// held here at `epoch + 1`, `interrupted` until it is resumed (its
    /// host runs left unfinished are interrupted too). False when it was
    /// renewed or taken by someone else meanwhile.
    pub async fn take_over(&self, id: i64, epoch: i64) -> Result<bool, StoreError> {
        Ok(self.take_over_from(id, epoch).await?.is_some())
    }

    /// [`Store::take_over`], saying how the previous holder let it go.
    pub async fn take_over_from(
        &self,
        id: i64,
        epoch: i64,
    ) -> Result<Option<Released>, StoreError> {
        // A holder that hands a deployment over leaves it held by nobody
        // (`Store::hand_over`); read for the record only: the taking below
        // is what decides.
        let holder: Option<(Option<String>,)> =
            sqlx::query_as("SELECT holder FROM deployments WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(query_error("taking over a deployment"))?;
        let released = match holder {
            Some((None,)) => Released::HandedOver,
            _ => Released::Expired,
        };
        let message = format!(
            "taken over by coordinator {} on {} (pid {}): {}",
            self.holder(),
            hostname(),
            std::process::id(),
            match released {
                Released::HandedOver => "the previous holder handed it over as it stopped",
                Released::Expired => "the previous holder's lease expired",
            }
        );
        let taken: Option<(i64,)> = sqlx::query_as(
            "UPDATE deployments SET status = 'interrupted', error = $1, holder = $2, pid = $3,
                 epoch = epoch + 1, lease_expires_at = (SELECT now_ms FROM db_clock) + $4
             WHERE id = $5 AND epoch = $6 AND status = 'running'
               AND lease_expires_at < (SELECT now_ms FROM db_clock)
             RETURNING epoch",
        )
        .bind(&message)
        .bind(self.holder())
        .bind(std::process::id() as i64)
        .bind(self.ttl_ms())
        .bind(id)
        .bind(epoch)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("taking over a deployment"))?;
        let Some((epoch,)) = taken else {
            return Ok(None);
        };
        self.ownership.took(id, epoch);
        let context = "recording a takeover";
        let mut tx = self.fenced(id, context).await?;
        super::deployments::interrupt_host_runs(&mut tx, id, &message).await?;
        let event = super::runs::new_event(id, None, EventKind::Log { message });
        super::runs::insert_event(&mut tx, &event).await?;
        tx.commit().await.map_err(query_error(context))?;
        Ok(Some(released))
    }

    /// Give up a deployment taken over that cannot be resumed (not a
    /// deployment, or its resume failed before it started): it ends
    /// `interrupted`, and its event streams end.
    pub async fn abandon_taken_over(&self, id: i64, reason: &str) -> Result<(), StoreError> {
        let context = "ending a deployment taken over";
        let mut tx = self.fenced(id, context).await?;
        super::deployments::end_interrupted(&mut tx, id, reason).await?;
        tx.commit().await.map_err(query_error(context))?;
        self.ownership.released(id);
        Ok(())
    }

    /// The coordinators, the leader and who holds which deployment.
    pub async fn cluster(&self) -> Result<ClusterReport, StoreError> {
        let context = "reading the cluster";
        let (now,): (i64,) = sqlx::query_as("SELECT now_ms FROM db_clock")
            .fetch_one(&self.pool)
            .await
            .map_err(query_error(context))?;
        let leader: Option<(String,)> = sqlx::query_as(
            "SELECT leader_id FROM leader WHERE name = $1 AND expires_at >= (SELECT now_ms FROM db_clock)",
        )
        .bind(ELECTION)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error(context))?;
        let leader = leader.map(|(id,)| id);
        let ttl = self.ttl_ms();
        let coordinators = sqlx::query("SELECT * FROM coordinators ORDER BY started_at, id")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error(context))?
            .iter()
            .map(|row| {
                let id: String = row.get("id");
                let heartbeat_at: i64 = row.get("heartbeat_at");
                Coordinator {
                    leader: leader.as_deref() == Some(id.as_str()),
                    id,
                    kind: row.get("kind"),
                    hostname: row.get("hostname"),
                    pid: row.get("pid"),
                    version: row.get("version"),
                    takeover: row.get::<i64, _>("takeover") != 0,
                    stopping: row.get::<i64, _>("stopping") != 0,
                    handed_over: row.get("handed_over"),
                    started_at: row.get("started_at"),
                    heartbeat_at,
                    alive: heartbeat_at + ttl >= now,
                }
            })
            .collect();
        let deployments = sqlx::query(
            "SELECT id, status, holder, epoch, lease_expires_at FROM deployments
             WHERE status IN ('queued', 'running', 'waiting-for-window', 'awaiting-approval') OR lease_expires_at IS NOT NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error(context))?
        .iter()
        .map(|row| DeploymentLease {
            deployment_id: row.get("id"),
            status: row.get("status"),
            holder: row.get("holder"),
            epoch: row.get("epoch"),
            lease_expires_at: row.get("lease_expires_at"),
        })
        .collect();
        Ok(ClusterReport {
            backend: self.backend().as_str().to_string(),
            now,
            lease_ttl_ms: ttl,
            leader,
            coordinators,
            deployments,
        })
    }
}

/// This machine's name, for people reading the cluster.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
