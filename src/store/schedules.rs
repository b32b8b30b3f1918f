//! Scheduled deployments' progress (`schedule_runs`): the last occurrence
//! each `[[schedule]]` accounted for, and the deployment it started. An
//! occurrence is claimed by a compare-and-swap on that time before anything
//! starts, so it runs at most once, however many daemons share the history.

use sqlx::Row;

use super::{Store, StoreError, query_error};

/// Where a schedule stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleRun {
    pub name: String,
    /// The last occurrence accounted for (Unix ms): run, or passed over.
    pub accounted_until: i64,
    /// The deployment its last run started.
    pub deployment_id: Option<i64>,
}

impl Store {
    /// Every schedule that was ever seen.
    pub async fn schedule_runs(&self) -> Result<Vec<ScheduleRun>, StoreError> {
        let rows =
            sqlx::query("SELECT name, last_run_at, deployment_id FROM schedule_runs ORDER BY name")
                .fetch_all(&self.pool)
                .await
                .map_err(query_error("reading schedules"))?;
        Ok(rows
            .iter()
            .map(|r| ScheduleRun {
                name: r.get("name"),
                accounted_until: r.get("last_run_at"),
                deployment_id: r.get("deployment_id"),
            })
            .collect())
    }

    /// A schedule seen for the first time counts from `at` (nothing before
    /// it runs). Nothing changes for a schedule seen before.
    pub async fn schedule_baseline(&self, name: &str, at: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO schedule_runs (name, last_run_at, deployment_id) VALUES ($1, $2, NULL)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(at)
        .execute(&self.pool)
        .await
        .map_err(query_error("recording a new schedule"))?;
        Ok(())
    }

    /// Claim `occurrence` of schedule `name`: true for the one caller that
    /// moved it forward (it then starts the deployment), false when it was
    /// claimed already.
    pub async fn claim_schedule(&self, name: &str, occurrence: i64) -> Result<bool, StoreError> {
        let changed = sqlx::query(
            "UPDATE schedule_runs SET last_run_at = $1, deployment_id = NULL
             WHERE name = $2 AND last_run_at < $1",
        )
        .bind(occurrence)
        .bind(name)
        .execute(&self.pool)
        .await
        .map_err(query_error("claiming a scheduled run"))?
        .rows_affected();
        Ok(changed == 1)
    }

    /// The deployment that the claimed `occurrence` of `name` started.
    pub async fn schedule_started(
        &self,
        name: &str,
        occurrence: i64,
        deployment_id: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE schedule_runs SET deployment_id = $1 WHERE name = $2 AND last_run_at = $3",
        )
        .bind(deployment_id)
        .bind(name)
        .bind(occurrence)
        .execute(&self.pool)
        .await
        .map_err(query_error("recording a scheduled deployment"))?;
        Ok(())
    }
}
