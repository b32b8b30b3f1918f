//! The evaluation cache (`eval_cache`) and what evaluating one host of a
//! flake costs in memory (`eval_memory`). Keys are computed by the core
//! (`nix_deploy_core::eval`); this module only stores and finds them.

use std::collections::BTreeMap;

use sqlx::Row;

use sqlx::AssertSqlSafe;

use super::{IN_LIST, Store, StoreError, parameters, query_error};
use crate::now_ms;

/// Entries kept; the least recently used beyond this are dropped (a host's
/// entry is about a kilobyte).
pub const EVAL_CACHE_ENTRIES: i64 = 20_000;

/// One result to remember.
#[derive(Clone, Debug)]
pub struct CachedEvaluation {
    pub key: String,
    pub host: Option<String>,
    /// JSON text.
    pub value: String,
}

impl Store {
    /// The cached values of those `keys` that are known, by key; marks them used.
    pub async fn cached_evaluations(
        &self,
        keys: &[String],
    ) -> Result<BTreeMap<String, String>, StoreError> {
        let mut found = BTreeMap::new();
        let now = now_ms();
        // A bounded list of parameters per query (both backends limit them).
        for chunk in keys.chunks(IN_LIST) {
            let select = format!(
                "SELECT key, value FROM eval_cache WHERE key IN ({})",
                parameters(1, chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(select));
            for key in chunk {
                query = query.bind(key.clone());
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(query_error("reading the evaluation cache"))?;
            let hits: Vec<String> = rows.iter().map(|r| r.get::<String, _>("key")).collect();
            found.extend(
                rows.into_iter()
                    .map(|row| (row.get::<String, _>("key"), row.get::<String, _>("value"))),
            );
            if hits.is_empty() {
                continue;
            }
            let touch = format!(
                "UPDATE eval_cache SET used_at = $1 WHERE key IN ({})",
                parameters(2, hits.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(touch)).bind(now);
            for key in hits {
                query = query.bind(key);
            }
            query
                .execute(&self.pool)
                .await
                .map_err(query_error("marking evaluation cache entries used"))?;
        }
        Ok(found)
    }

    /// Remember evaluation results (one transaction), then drop the least
    /// recently used entries beyond [`EVAL_CACHE_ENTRIES`].
    pub async fn cache_evaluations(
        &self,
        flake: &str,
        entries: &[CachedEvaluation],
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(query_error("caching evaluations"))?;
        for entry in entries {
            sqlx::query(
                "INSERT INTO eval_cache (key, flake, host, value, created_at, used_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (key) DO UPDATE SET used_at = excluded.used_at",
            )
            .bind(&entry.key)
            .bind(flake)
            .bind(&entry.host)
            .bind(&entry.value)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(query_error("caching an evaluation"))?;
        }
        sqlx::query(
            "DELETE FROM eval_cache WHERE key IN
                 (SELECT key FROM eval_cache ORDER BY used_at DESC LIMIT $1 OFFSET $2)",
        )
        .bind(i64::MAX)
        .bind(EVAL_CACHE_ENTRIES)
        .execute(&mut *tx)
        .await
        .map_err(query_error("pruning the evaluation cache"))?;
        tx.commit()
            .await
            .map_err(query_error("caching evaluations"))?;
        Ok(())
    }

    /// The measured memory of evaluating one host of `flake`, in KiB.
    pub async fn eval_host_memory(&self, flake: &str) -> Result<Option<u64>, StoreError> {
        let row = sqlx::query("SELECT host_kib FROM eval_memory WHERE flake = $1")
            .bind(flake)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading the evaluation memory"))?;
        Ok(row.map(|r| r.get::<i64, _>("host_kib").max(0) as u64))
    }

    /// Remember what evaluating one host of `flake` cost (the latest measurement wins).
    pub async fn record_eval_host_memory(&self, flake: &str, kib: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO eval_memory (flake, host_kib, measured_at) VALUES ($1, $2, $3)
             ON CONFLICT (flake) DO UPDATE SET host_kib = excluded.host_kib,
                 measured_at = excluded.measured_at",
        )
        .bind(flake)
        .bind(i64::try_from(kib).unwrap_or(i64::MAX))
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(query_error("recording the evaluation memory"))?;
        Ok(())
    }
}
