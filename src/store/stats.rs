//! Step durations as a histogram, kept as steps finish (see
//! `migrations/0006_step_stats.sql`), so that reading them costs a few rows.

use sqlx::Row;

use super::{Store, StoreError, query_error};

/// Upper bounds (seconds) of the step-duration buckets; a last bucket takes
/// the rest (+Inf).
pub const STEP_BUCKETS: [f64; 9] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0];

/// One step's durations.
#[derive(Clone, Debug, PartialEq)]
pub struct StepHistogram {
    pub step: String,
    pub count: u64,
    pub sum_seconds: f64,
    /// Per bucket (not cumulative), `STEP_BUCKETS.len() + 1` of them.
    pub buckets: Vec<u64>,
}

/// The bucket a duration falls in.
fn bucket_of(seconds: f64) -> usize {
    STEP_BUCKETS
        .iter()
        .position(|bound| seconds <= *bound)
        .unwrap_or(STEP_BUCKETS.len())
}

impl Store {
    /// Count one finished step on its own (the recorder counts inside its
    /// step's transaction, [`Store::save_host_run_with_event`]).
    #[cfg(test)]
    pub async fn record_step_duration(&self, step: &str, seconds: f64) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(query_error("counting a step"))?;
        count_step(&mut tx, step, seconds).await?;
        tx.commit().await.map_err(query_error("counting a step"))?;
        Ok(())
    }

    /// Every step's histogram, by step name.
    pub async fn step_histograms(&self) -> Result<Vec<StepHistogram>, StoreError> {
        let totals = sqlx::query("SELECT step, count, sum FROM step_totals ORDER BY step")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading step durations"))?;
        let buckets = sqlx::query("SELECT step, bucket, count FROM step_stats")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading step durations"))?;
        Ok(totals
            .iter()
            .map(|row| {
                let step: String = row.get(0);
                let mut counts = vec![0u64; STEP_BUCKETS.len() + 1];
                for b in buckets.iter().filter(|b| b.get::<String, _>(0) == step) {
                    let index = b.get::<i64, _>(1).clamp(0, STEP_BUCKETS.len() as i64) as usize;
                    counts[index] += b.get::<i64, _>(2).max(0) as u64;
                }
                StepHistogram {
                    step,
                    count: row.get::<i64, _>(1).max(0) as u64,
                    sum_seconds: row.get(2),
                    buckets: counts,
                }
            })
            .collect())
    }
}

/// Count one finished step, inside the caller's transaction.
pub(super) async fn count_step(
    tx: &mut sqlx::AnyConnection,
    step: &str,
    seconds: f64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO step_stats (step, bucket, count) VALUES ($1, $2, 1)
         ON CONFLICT (step, bucket) DO UPDATE SET count = step_stats.count + 1",
    )
    .bind(step)
    .bind(bucket_of(seconds) as i64)
    .execute(&mut *tx)
    .await
    .map_err(query_error("counting a step"))?;
    sqlx::query(
        "INSERT INTO step_totals (step, count, sum) VALUES ($1, 1, $2)
         ON CONFLICT (step) DO UPDATE SET count = step_totals.count + 1,
             sum = step_totals.sum + excluded.sum",
    )
    .bind(step)
    .bind(seconds)
    .execute(&mut *tx)
    .await
    .map_err(query_error("counting a step"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_their_bucket() {
        assert_eq!(bucket_of(0.05), 0);
        assert_eq!(bucket_of(0.1), 0);
        assert_eq!(bucket_of(0.4), 1);
        assert_eq!(bucket_of(700.0), STEP_BUCKETS.len());
    }
}
