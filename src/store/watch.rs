//! The watch's state: each host's last observed state, the changes of it
//! (the fleet's event stream) and the alerts they raised (an outbox: sent
//! after a restart if they were not before). A host's change, its event and
//! its alerts are one transaction: nothing is told that is not stored.
//!
//! Also the reads the watch needs from the rest of the history: what our
//! runs did to a host, who holds which host, and each host's last
//! successful deployment.

use sqlx::Row;

use nix_deploy_core::drift::{AlertKind, DriftKind, PastRun};
use nix_deploy_core::events::HostStatus;
use nix_deploy_core::goal::Goal;
use nix_deploy_core::watch::{Alert, FleetEvent, HostWatch};

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
    /// An `unreachable` alert stands for its current outage.
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

impl Store {
    /// Every host's stored state, by name.
    pub async fn watch_hosts(&self) -> Result<Vec<WatchRow>, StoreError> {
        let rows = sqlx::query("SELECT state, unreachable_alerted FROM watch_hosts ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading the watched hosts"))?;
        rows.iter()
            .map(|row| {
                Ok(WatchRow {
                    state: json(row.get::<&str, _>(0), "watch_hosts.state")?,
                    unreachable_alerted: row.get::<i64, _>(1) != 0,
                })
            })
            .collect()
    }

    /// Store a host's new state with the event and the alerts it raised,
    /// in one transaction; returns them with their ids.
    pub async fn record_watch(
        &self,
        change: &WatchChange<'_>,
    ) -> Result<(Option<FleetEvent>, Vec<Alert>), StoreError> {
        let context = "recording a host's watched state";
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(query_error(context))?;
        upsert_host(change.row, now)
            .execute(&mut *tx)
            .await
            .map_err(query_error(context))?;
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
    /// transaction: the watch flushes them every few minutes.
    pub async fn save_watch_hosts(&self, rows: &[WatchRow]) -> Result<(), StoreError> {
        let context = "saving the watched hosts";
        let now = now_ms();
        let mut tx = self.pool.begin().await.map_err(query_error(context))?;
        for row in rows {
            upsert_host(row, now)
                .execute(&mut *tx)
                .await
                .map_err(query_error(context))?;
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
            .map(|row| with_id(row.get(0), row.get::<&str, _>(1), "watch_events.data"))
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
        let mut tx = self.pool.begin().await.map_err(query_error(context))?;
        let alert = insert_alert(&mut tx, new, now_ms()).await?;
        tx.commit().await.map_err(query_error(context))?;
        Ok(alert)
    }

    /// The newest of the fleet's own alerts (its evaluation failing or
    /// recovering): whether the fleet was last said to evaluate, across
    /// restarts.
    pub async fn last_fleet_alert(&self) -> Result<Option<Alert>, StoreError> {
        let row = sqlx::query(
            "SELECT id, data FROM watch_alerts WHERE host IS NULL ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("reading the fleet's alerts"))?;
        row.map(|row| with_id(row.get(0), row.get::<&str, _>(1), "watch_alerts.data"))
            .transpose()
    }

    /// Forget a host that left the flake.
    pub async fn forget_watch_host(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM watch_hosts WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(query_error("forgetting a watched host"))?;
        Ok(())
    }

    /// Alerts not sent yet, oldest first.
    pub async fn unsent_alerts(&self) -> Result<Vec<Alert>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, data FROM watch_alerts WHERE sent_at IS NULL ORDER BY id LIMIT 1000",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading unsent alerts"))?;
        rows.iter()
            .map(|row| with_id(row.get(0), row.get::<&str, _>(1), "watch_alerts.data"))
            .collect()
    }

    /// An alert went out (or was given up on): never again. Old sent alerts
    /// are forgotten.
    pub async fn mark_alert_sent(&self, id: i64) -> Result<(), StoreError> {
        let now = now_ms();
        sqlx::query("UPDATE watch_alerts SET sent_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_error("marking an alert sent"))?;
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
                status: HostStatus::parse(row.get::<&str, _>(0)).unwrap_or(HostStatus::Failed),
                goal: row
                    .get::<Option<&str>, _>(1)
                    .and_then(|g| Goal::parse(g).ok())
                    .unwrap_or_default(),
                from: row.get(2),
                to: row.get(3),
                rebooted: row.get::<Option<&str>, _>(4).is_some(),
            })
            .collect())
    }

    /// Every lease held now (their holders may have died: see
    /// [`Store::holder_alive`]).
    pub async fn leased_hosts(&self) -> Result<Vec<Lease>, StoreError> {
        let rows = sqlx::query("SELECT * FROM leases ORDER BY host")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading leases"))?;
        Ok(rows.iter().map(Self::lease_from_row).collect())
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

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

fn upsert_host(row: &WatchRow, now: i64) -> Query<'_> {
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
}

async fn insert_alert(
    tx: &mut sqlx::SqliteConnection,
    new: &NewAlert,
    now: i64,
) -> Result<Alert, StoreError> {
    let mut alert = Alert {
        id: 0,
        created_at: now,
        kind: new.kind,
        host: new.host.clone(),
        drift: new.drift.clone(),
        detail: new.detail.clone(),
    };
    let data = without_id(serde_json::to_value(&alert).unwrap_or_default());
    alert.id =
        sqlx::query("INSERT INTO watch_alerts (created_at, data) VALUES ($1, $2) RETURNING id")
            .bind(now)
            .bind(data)
            .fetch_one(&mut *tx)
            .await
            .map_err(query_error("recording an alert"))?
            .get(0);
    Ok(alert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix_deploy_core::drift::Drift;

    fn row(name: &str, kind: DriftKind) -> WatchRow {
        WatchRow {
            state: HostWatch {
                name: name.into(),
                drift: vec![Drift { kind, since: 5 }],
                last_seen: Some(7),
                ..HostWatch::default()
            },
            unreachable_alerted: false,
        }
    }

    #[tokio::test]
    async fn a_change_its_event_and_its_alerts_are_stored_together_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let sick = row("web1", DriftKind::Unhealthy);
        let (event, alerts) = store
            .record_watch(&WatchChange {
                row: &sick,
                drift: Some((vec![DriftKind::Unhealthy], vec![DriftKind::InSync])),
                alerts: vec![NewAlert {
                    kind: AlertKind::Unhealthy,
                    host: Some("web1".into()),
                    drift: Vec::new(),
                    detail: Some("service nginx (failed)".into()),
                }],
            })
            .await
            .unwrap();
        let event = event.unwrap();
        assert!(event.id > 0);
        assert_eq!(event.state, sick.state);
        assert_eq!(alerts.len(), 1);
        // A second change: only the state, no event, no alert.
        let mut seen = sick.clone();
        seen.state.last_seen = Some(9);
        seen.unreachable_alerted = true;
        store
            .record_watch(&WatchChange {
                row: &seen,
                drift: None,
                alerts: Vec::new(),
            })
            .await
            .unwrap();
        store.close().await;

        let store = Store::open(dir.path()).await.unwrap();
        assert_eq!(store.watch_hosts().await.unwrap(), vec![seen]);
        assert_eq!(
            store.watch_events(0, 10).await.unwrap(),
            vec![event.clone()]
        );
        assert!(store.watch_events(event.id, 10).await.unwrap().is_empty());
        assert_eq!(store.watch_event_ids().await.unwrap(), (event.id, event.id));
        // The alert waits until sent, also across the reopen.
        assert_eq!(store.unsent_alerts().await.unwrap(), alerts);
        store.mark_alert_sent(alerts[0].id).await.unwrap();
        assert!(store.unsent_alerts().await.unwrap().is_empty());
        let fleet = store
            .record_alert(&NewAlert {
                kind: AlertKind::EvaluationFailed,
                host: None,
                drift: Vec::new(),
                detail: Some("error: syntax error".into()),
            })
            .await
            .unwrap();
        assert!(fleet.id > alerts[0].id);
        assert_eq!(store.last_fleet_alert().await.unwrap(), Some(fleet.clone()));
        assert_eq!(store.unsent_alerts().await.unwrap(), vec![fleet]);
        // Flushing many hosts at once.
        store
            .save_watch_hosts(&[row("a", DriftKind::InSync), row("b", DriftKind::Behind)])
            .await
            .unwrap();
        assert_eq!(store.watch_hosts().await.unwrap().len(), 3);
        store.forget_watch_host("a").await.unwrap();
        assert_eq!(store.watch_hosts().await.unwrap().len(), 2);
    }
}
