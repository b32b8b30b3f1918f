//! The watch's state: each host's last observed state, the fleet-wide part
//! of the view (the flake it compares with, its last evaluation, pull
//! mode's branch), the changes of hosts' states (the fleet's event stream)
//! and the alerts they raised (an outbox: sent after a restart or a leader
//! change if they were not before). A host's change, its event and its
//! alerts are one transaction: nothing is told that is not stored.
//!
//! Only the elected leader watches. Every write here is a transaction whose
//! first statement checks that this coordinator still holds an unexpired
//! term ([`super::cluster`]'s `lead`), so a deposed leader (frozen, cut off
//! from the database) writes nothing: [`StoreError::NotLeader`]. Reads are
//! for every coordinator: followers answer the API from them.
//!
//! Alerts are sent exactly once across coordinators: a sender claims each
//! by compare-and-swap ([`Store::claim_alert`]) before sending it, and marks
//! it sent after; a claim is taken over only when its claimant's heartbeat
//! is older than the lease TTL (it died, maybe mid-send: the alert then goes
//! out again with the same delivery id).
//!
//! Also the reads the watch needs from the rest of the history: what our
//! runs did to a host, which hosts a live deployment holds, and each host's
//! last successful deployment.

use sqlx::Row;

use nix_deploy_core::drift::{AlertKind, DriftKind, PastRun};
use nix_deploy_core::events::HostStatus;
use nix_deploy_core::goal::Goal;
use nix_deploy_core::watch::{Alert, FleetEvent, FleetReport, HostWatch};

use super::{Lease, Store, StoreError, query_error, to_json};
use crate::now_ms;

/// How many fleet events are kept for `Last-Event-ID` replays.
const KEEP_EVENTS: i64 = 10_000;
/// How long sent alerts are kept (ms).
const KEEP_SENT_ALERTS_MS: i64 = 30 * 24 * 3600 * 1000;

/// A host's stored state.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchRow {
    pub state: HostWatch,
    /// An `unreachable` alert stands for the host's current outage.
    pub unreachable_alerted: bool,
}

/// An alert to record.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAlert {
    pub kind: AlertKind,
    pub host: Option<String>,
    pub drift: Vec<DriftKind>,
    pub detail: Option<String>,
}

/// What one observation changed about a host.
#[derive(Clone, Debug)]
pub struct WatchChange<'a> {
    pub row: &'a WatchRow,
    /// Its drift changed: `(appeared, cleared)`, recorded as a fleet event.
    pub drift: Option<(Vec<DriftKind>, Vec<DriftKind>)>,
    pub alerts: Vec<NewAlert>,
}

fn json<T: serde::de::DeserializeOwned>(
    text: &str,
    context: &'static str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Json { context, source })
}

/// The stored form of an event or alert: everything but its id.
fn without_id(mut value: serde_json::Value) -> String {
    if let Some(object) = value.as_object_mut() {
        object.remove("id");
    }
    value.to_string()
}

fn with_id<T: serde::de::DeserializeOwned>(
    id: i64,
    data: &str,
    context: &'static str,
) -> Result<T, StoreError> {
    let mut value: serde_json::Value = json(data, context)?;
    if let Some(object) = value.as_object_mut() {
        object.insert("id".into(), id.into());
    }
    serde_json::from_value(value).map_err(|source| StoreError::Json { context, source })
}

type Transaction = sqlx::Transaction<'static, sqlx::Any>;

impl Store {
    /// A transaction for the watch's writes: refused unless this
    /// coordinator leads (its term unexpired by the database's clock), and
    /// holding the term's row until it ends, so no other coordinator can be
    /// elected before it commits.
    async fn led(&self, context: &'static str) -> Result<Transaction, StoreError> {
        let mut tx = self.pool.begin().await.map_err(query_error(context))?;
        if !self.lead(&mut tx).await.map_err(query_error(context))? {
            return Err(StoreError::NotLeader);
        }
        Ok(tx)
    }

    /// Every host's stored state, by name.
    pub async fn watch_hosts(&self) -> Result<Vec<WatchRow>, StoreError> {
        let rows = sqlx::query("SELECT state, unreachable_alerted FROM watch_hosts ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading the watched hosts"))?;
        rows.iter()
            .map(|row| {
                Ok(WatchRow {
                    state: json(&row.get::<String, _>(0), "watch_hosts.state")?,
                    unreachable_alerted: row.get::<i64, _>(1) != 0,
                })
            })
            .collect()
    }

    /// The fleet as the watch last stored it: the leader's view as every
    /// coordinator can read it. `watching` is true while the coordinator
    /// that stored it still leads.
    pub async fn stored_fleet(&self) -> Result<FleetReport, StoreError> {
        let context = "reading the watched fleet";
        let row = sqlx::query(
            "SELECT w.data, w.watched_by, CASE WHEN EXISTS (
                 SELECT 1 FROM leader l WHERE l.leader_id = w.watched_by
                   AND l.expires_at >= (SELECT now_ms FROM db_clock)) THEN 1 ELSE 0 END
               FROM watch_fleet w WHERE w.one = 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error(context))?;
        let mut report = match row {
            Some(row) => {
                let mut report: FleetReport = json(&row.get::<String, _>(0), "watch_fleet.data")?;
                report.watched_by = Some(row.get(1));
                report.watching = report.watching && row.get::<i64, _>(2) == 1;
                report
            }
            None => FleetReport::default(),
        };
        report.hosts = self
            .watch_hosts()
            .await?
            .into_iter()
            .map(|row| row.state)
            .collect();
        report.generated_at = now_ms();
        Ok(report)
    }

    /// Store the fleet-wide part of the leader's view (`report` without its
    /// hosts), naming this coordinator as the one watching.
    pub async fn save_watch_fleet(&self, report: &FleetReport) -> Result<(), StoreError> {
        let context = "saving the watched fleet";
        let header = FleetReport {
            hosts: Vec::new(),
            watched_by: None,
            ..report.clone()
        };
        let mut tx = self.led(context).await?;
        sqlx::query(
            "INSERT INTO watch_fleet (one, data, watched_by, updated_at) VALUES (1, $1, $2, $3)
             ON CONFLICT (one) DO UPDATE SET data = excluded.data,
                 watched_by = excluded.watched_by, updated_at = excluded.updated_at",
        )
        .bind(to_json(&header))
        .bind(self.holder())
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(query_error(context))?;
        tx.commit().await.map_err(query_error(context))?;
        Ok(())
    }

    /// Store a host's new state with the event and the alerts it raised,
    /// in one transaction; returns them with their ids.
    pub async fn record_watch(
        &self,
        change: &WatchChange<'_>,
    ) -> Result<(Option<FleetEvent>, Vec<Alert>), StoreError> {
        let context = "recording a host's watched state";
        let now = now_ms();
        let mut tx = self.led(context).await?;
        upsert_host(&mut tx, change.row, now).await?;
        let mut event = None;
        if let Some((appeared, cleared)) = &change.drift {
            let mut fleet_event = FleetEvent {
                id: 0,
                at: now,
                host: change.row.state.name.clone(),
                appeared: appeared.clone(),
                cleared: cleared.clone(),
                state: change.row.state.clone(),
            };
            let data = without_id(serde_json::to_value(&fleet_event).unwrap_or_default());
            fleet_event.id = sqlx::query(
                "INSERT INTO watch_events (at, host, data) VALUES ($1, $2, $3) RETURNING id",
            )
            .bind(now)
            .bind(&fleet_event.host)
            .bind(data)
            .fetch_one(&mut *tx)
            .await
            .map_err(query_error(context))?
            .get(0);
            sqlx::query("DELETE FROM watch_events WHERE id <= $1")
                .bind(fleet_event.id - KEEP_EVENTS)
                .execute(&mut *tx)
                .await
                .map_err(query_error(context))?;
            event = Some(fleet_event);
        }
        let mut alerts = Vec::new();
        for new in &change.alerts {
            alerts.push(insert_alert(&mut tx, new, now).await?);
        }
        tx.commit().await.map_err(query_error(context))?;
        Ok((event, alerts))
    }

    /// Store hosts' states as they are (their last sight), in one
    /// transaction: the watch flushes them every minute.
    pub async fn save_watch_hosts(&self, rows: &[WatchRow]) -> Result<(), StoreError> {
        let context = "saving the watched hosts";
        let now = now_ms();
        let mut tx = self.led(context).await?;
        for row in rows {
            upsert_host(&mut tx, row, now).await?;
        }
        tx.commit().await.map_err(query_error(context))?;
        Ok(())
    }

    /// Fleet events after `after` (oldest first, at most `limit`).
    pub async fn watch_events(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<FleetEvent>, StoreError> {
        let rows =
            sqlx::query("SELECT id, data FROM watch_events WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(query_error("reading fleet events"))?;
        rows.iter()
            .map(|row| with_id(row.get(0), &row.get::<String, _>(1), "watch_events.data"))
            .collect()
    }

    /// The ids of the oldest fleet event still kept and of the newest
    /// (0 without any).
    pub async fn watch_event_ids(&self) -> Result<(i64, i64), StoreError> {
        let row =
            sqlx::query("SELECT COALESCE(MIN(id), 0), COALESCE(MAX(id), 0) FROM watch_events")
                .fetch_one(&self.pool)
                .await
                .map_err(query_error("reading fleet events"))?;
        Ok((row.get(0), row.get(1)))
    }

    /// Record an alert on its own (the fleet's, not a host's).
    pub async fn record_alert(&self, new: &NewAlert) -> Result<Alert, StoreError> {
        let context = "recording an alert";
        let mut tx = self.led(context).await?;
        let alert = insert_alert(&mut tx, new, now_ms()).await?;
        tx.commit().await.map_err(query_error(context))?;
        Ok(alert)
    }

    /// The newest of the fleet's own alerts (its evaluation failing or
    /// recovering): whether the fleet was last said to evaluate, across
    /// restarts and leader changes.
    pub async fn last_fleet_alert(&self) -> Result<Option<Alert>, StoreError> {
        let row = sqlx::query(
            "SELECT id, data FROM watch_alerts WHERE host IS NULL ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("reading the fleet's alerts"))?;
        row.map(|row| with_id(row.get(0), &row.get::<String, _>(1), "watch_alerts.data"))
            .transpose()
    }

    /// Forget a host that left the flake.
    pub async fn forget_watch_host(&self, name: &str) -> Result<(), StoreError> {
        let context = "forgetting a watched host";
        let mut tx = self.led(context).await?;
        sqlx::query("DELETE FROM watch_hosts WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(query_error(context))?;
        tx.commit().await.map_err(query_error(context))?;
        Ok(())
    }

    /// Alerts not sent yet, oldest first (claimed by a live sender or not:
    /// see [`Store::claim_alert`]).
    pub async fn unsent_alerts(&self) -> Result<Vec<Alert>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, data FROM watch_alerts WHERE sent_at IS NULL ORDER BY id LIMIT 1000",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading unsent alerts"))?;
        rows.iter()
            .map(|row| with_id(row.get(0), &row.get::<String, _>(1), "watch_alerts.data"))
            .collect()
    }

    /// Claim alert `id` for this coordinator to send: by compare-and-swap,
    /// so of several coordinators exactly one gets it. True when it is
    /// ours: unsent, and unclaimed, claimed by us, or claimed by a
    /// coordinator whose heartbeat is older than the lease TTL.
    pub async fn claim_alert(&self, id: i64) -> Result<bool, StoreError> {
        let claimed = sqlx::query(
            "UPDATE watch_alerts SET claimed_by = $1, claimed_at = (SELECT now_ms FROM db_clock)
             WHERE id = $2 AND sent_at IS NULL AND (claimed_by IS NULL OR claimed_by = $1
                 OR NOT EXISTS (SELECT 1 FROM coordinators c WHERE c.id = watch_alerts.claimed_by
                     AND c.heartbeat_at >= (SELECT now_ms FROM db_clock) - $3))",
        )
        .bind(self.holder())
        .bind(id)
        .bind(self.ttl_ms())
        .execute(&self.pool)
        .await
        .map_err(query_error("claiming an alert"))?
        .rows_affected();
        Ok(claimed == 1)
    }

    /// An alert this coordinator claimed went out (or was given up on):
    /// never again. Old sent alerts are forgotten.
    pub async fn mark_alert_sent(&self, id: i64) -> Result<(), StoreError> {
        let context = "marking an alert sent";
        let now = now_ms();
        sqlx::query("UPDATE watch_alerts SET sent_at = $1 WHERE id = $2 AND claimed_by = $3")
            .bind(now)
            .bind(id)
            .bind(self.holder())
            .execute(&self.pool)
            .await
            .map_err(query_error(context))?;
        sqlx::query("DELETE FROM watch_alerts WHERE sent_at IS NOT NULL AND sent_at < $1")
            .bind(now - KEEP_SENT_ALERTS_MS)
            .execute(&self.pool)
            .await
            .map_err(query_error("forgetting sent alerts"))?;
        Ok(())
    }

    /// A host's finished runs of deployments (not `exec` or `upload-keys`),
    /// newest first: what drift compares against.
    pub async fn past_runs(&self, host: &str, limit: i64) -> Result<Vec<PastRun>, StoreError> {
        let rows = sqlx::query(
            "SELECT r.status, r.goal, r.old_path, r.new_path, r.reboot
               FROM host_runs r JOIN deployments d ON d.id = r.deployment_id
              WHERE r.host = $1 AND d.kind = 'deploy' AND r.finished_at IS NOT NULL
              ORDER BY r.finished_at DESC LIMIT $2",
        )
        .bind(host)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading a host's past runs"))?;
        Ok(rows
            .iter()
            .map(|row| PastRun {
                status: HostStatus::parse(&row.get::<String, _>(0)).unwrap_or(HostStatus::Failed),
                goal: row
                    .get::<Option<String>, _>(1)
                    .and_then(|g| Goal::parse(&g).ok())
                    .unwrap_or_default(),
                from: row.get(2),
                to: row.get(3),
                rebooted: row.get::<Option<String>, _>(4).is_some(),
            })
            .collect())
    }

    /// How `host`'s reconciling deployments (trigger `reconcile`) went
    /// lately: the failures since its last success, newest first, and when
    /// the newest of them ended. What a new leader (or a restarted daemon)
    /// keeps backing off from.
    pub async fn reconcile_failures(&self, host: &str) -> Result<(u32, Option<i64>), StoreError> {
        let rows = sqlx::query(
            "SELECT r.status, r.finished_at
               FROM host_runs r JOIN deployments d ON d.id = r.deployment_id
              WHERE r.host = $1 AND d.trigger = 'reconcile' AND r.finished_at IS NOT NULL
              ORDER BY r.finished_at DESC LIMIT 20",
        )
        .bind(host)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading a host's reconciling deployments"))?;
        let failed: Vec<i64> = rows
            .iter()
            .take_while(|row| row.get::<String, _>(0) != HostStatus::Deployed.as_str())
            .map(|row| row.get(1))
            .collect();
        Ok((failed.len() as u32, failed.first().copied()))
    }

    /// The host leases whose holder is alive (on SQLite its flock is held,
    /// on PostgreSQL its lease unexpired by the database's clock): hosts a
    /// deployment holds now. A dead holder's lease is no deployment.
    pub async fn live_leases(&self) -> Result<Vec<Lease>, StoreError> {
        let leases = self.leases().await?;
        if !self.liveness_by_lease() {
            return Ok(leases
                .into_iter()
                .filter(|l| self.holder_alive(l.holder.as_deref(), Some(l.pid)))
                .collect());
        }
        let (now,): (i64,) = sqlx::query_as("SELECT now_ms FROM db_clock")
            .fetch_one(&self.pool)
            .await
            .map_err(query_error("reading the database's clock"))?;
        Ok(leases.into_iter().filter(|l| l.expires_at >= now).collect())
    }

    /// When each host's last successful deployment ended (Unix ms).
    pub async fn last_deployed(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT r.host, MAX(r.finished_at)
               FROM host_runs r JOIN deployments d ON d.id = r.deployment_id
              WHERE d.kind = 'deploy' AND r.status = 'deployed' AND r.finished_at IS NOT NULL
              GROUP BY r.host ORDER BY r.host",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading the last deployments"))?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }
}

async fn upsert_host(tx: &mut Transaction, row: &WatchRow, now: i64) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO watch_hosts (name, state, unreachable_alerted, updated_at)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET state = excluded.state,
             unreachable_alerted = excluded.unreachable_alerted,
             updated_at = excluded.updated_at",
    )
    .bind(&row.state.name)
    .bind(to_json(&row.state))
    .bind(i64::from(row.unreachable_alerted))
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(query_error("storing a watched host"))?;
    Ok(())
}

async fn insert_alert(tx: &mut Transaction, new: &NewAlert, now: i64) -> Result<Alert, StoreError> {
    let mut alert = Alert {
        id: 0,
        created_at: now,
        kind: new.kind,
        host: new.host.clone(),
        drift: new.drift.clone(),
        detail: new.detail.clone(),
    };
    let data = without_id(serde_json::to_value(&alert).unwrap_or_default());
    alert.id = sqlx::query(
        "INSERT INTO watch_alerts (created_at, host, data) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(now)
    .bind(&alert.host)
    .bind(data)
    .fetch_one(&mut **tx)
    .await
    .map_err(query_error("recording an alert"))?
    .get(0);
    Ok(alert)
}
