//! The evaluation cache (`eval_cache`) and what evaluating one host of a
//! flake costs in memory (`eval_memory`). Keys are computed by the core
//! (`nix_deploy_core::eval`); this module only stores and finds them.

use std::collections::BTreeMap;

use sqlx::Row;

use super::{Store, StoreError, query_error};
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
        // One parameter whatever the number of keys: a JSON array.
        let keys_json = serde_json::to_string(keys).unwrap_or_else(|_| "[]".into());
        let rows = sqlx::query(
            "SELECT key, value FROM eval_cache WHERE key IN (SELECT value FROM json_each(?))",
        )
        .bind(&keys_json)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("reading the evaluation cache"))?;
        let found: BTreeMap<String, String> = rows
            .into_iter()
            .map(|row| (row.get::<String, _>("key"), row.get::<String, _>("value")))
            .collect();
        sqlx::query(
            "UPDATE eval_cache SET used_at = ? WHERE key IN (SELECT value FROM json_each(?))",
        )
        .bind(now_ms())
        .bind(&keys_json)
        .execute(&self.pool)
        .await
        .map_err(query_error("marking evaluation cache entries used"))?;
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
                 VALUES (?, ?, ?, ?, ?, ?)
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
                 (SELECT key FROM eval_cache ORDER BY used_at DESC LIMIT -1 OFFSET ?)",
        )
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
        let row = sqlx::query("SELECT host_kib FROM eval_memory WHERE flake = ?")
            .bind(flake)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading the evaluation memory"))?;
        Ok(row.map(|r| r.get::<i64, _>("host_kib").max(0) as u64))
    }

    /// Remember what evaluating one host of `flake` cost (the latest measurement wins).
    pub async fn record_eval_host_memory(&self, flake: &str, kib: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO eval_memory (flake, host_kib, measured_at) VALUES (?, ?, ?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn results_are_found_by_key_only_and_pruned_by_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let entry = |key: &str, value: &str| CachedEvaluation {
            key: key.into(),
            host: Some("web1".into()),
            value: value.into(),
        };
        store
            .cache_evaluations(".", &[entry("k1", "{\"a\":1}"), entry("k2", "2")])
            .await
            .unwrap();
        let keys = ["k1".to_string(), "k3".to_string()];
        let found = store.cached_evaluations(&keys).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found["k1"], "{\"a\":1}");
        // Writing a key again keeps its value: a key has one value.
        store
            .cache_evaluations(".", &[entry("k1", "other")])
            .await
            .unwrap();
        assert_eq!(
            store.cached_evaluations(&keys).await.unwrap()["k1"],
            "{\"a\":1}"
        );
        // More keys than a query could bind one by one.
        let many: Vec<String> = (0..1200).map(|i| format!("m{i}")).collect();
        let entries: Vec<_> = many.iter().map(|k| entry(k, "1")).collect();
        store.cache_evaluations(".", &entries).await.unwrap();
        assert_eq!(store.cached_evaluations(&many).await.unwrap().len(), 1200);

        assert_eq!(store.eval_host_memory("f").await.unwrap(), None);
        store.record_eval_host_memory("f", 40_000).await.unwrap();
        store.record_eval_host_memory("f", 50_000).await.unwrap();
        assert_eq!(store.eval_host_memory("f").await.unwrap(), Some(50_000));
    }
}
