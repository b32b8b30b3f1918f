//! What the signed hooks have seen: deliveries (so a replayed one is
//! refused) and the newest push deployed from each branch (so an older one
//! is never deployed over it).

use sqlx::Row;

use super::{Store, StoreError, query_error};
use crate::now_ms;

/// The push last deployed from a branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchHead {
    pub commit: String,
    /// Unix seconds.
    pub committed_at: i64,
}

impl Store {
    /// Remember a delivery; false if it was seen before (a replay). Entries
    /// older than `keep_ms` are forgotten.
    pub async fn remember_delivery(
        &self,
        source: &str,
        delivery: &str,
        keep_ms: i64,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        sqlx::query("DELETE FROM hook_deliveries WHERE source = $1 AND received_at < $2")
            .bind(source)
            .bind(now - keep_ms)
            .execute(&self.pool)
            .await
            .map_err(query_error("forgetting old deliveries"))?;
        let inserted = sqlx::query(
            "INSERT INTO hook_deliveries (source, delivery, received_at) VALUES ($1, $2, $3)
             ON CONFLICT (source, delivery) DO NOTHING",
        )
        .bind(source)
        .bind(delivery)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(query_error("remembering a delivery"))?
        .rows_affected();
        Ok(inserted == 1)
    }

    pub async fn branch_head(&self, branch: &str) -> Result<Option<BranchHead>, StoreError> {
        let row = sqlx::query("SELECT commit_id, committed_at FROM branch_heads WHERE branch = $1")
            .bind(branch)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a branch head"))?;
        Ok(row.map(|r| BranchHead {
            commit: r.get(0),
            committed_at: r.get(1),
        }))
    }

    /// Record `head` as the newest push of `branch`, unless a newer one was
    /// recorded meanwhile (compare-and-swap on the time). False if refused.
    pub async fn advance_branch_head(
        &self,
        branch: &str,
        head: &BranchHead,
    ) -> Result<bool, StoreError> {
        let changed = sqlx::query(
            "INSERT INTO branch_heads (branch, commit_id, committed_at) VALUES ($1, $2, $3)
             ON CONFLICT (branch) DO UPDATE SET commit_id = excluded.commit_id,
                 committed_at = excluded.committed_at
             WHERE excluded.committed_at > branch_heads.committed_at",
        )
        .bind(branch)
        .bind(&head.commit)
        .bind(head.committed_at)
        .execute(&self.pool)
        .await
        .map_err(query_error("recording a branch head"))?
        .rows_affected();
        Ok(changed == 1)
    }
}
