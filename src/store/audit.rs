//! The audit trail: entries appended in a hash chain (the core's `audit`
//! decides the hashes), read back by time, and verified.

use sqlx::Row;

use nix_deploy_core::audit::{self, AuditEntry, AuditRecord, Verification};

use super::{Store, StoreError, query_error, to_json};
use crate::now_ms;

impl Store {
    /// Append one entry: its id and hash follow the newest one, in one
    /// transaction that holds the write lock from its first statement (so
    /// two appends never chain to the same predecessor).
    pub async fn audit(&self, record: &AuditRecord) -> Result<AuditEntry, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(query_error("appending to the audit trail"))?;
        // A write first: the transaction takes the lock now, not later.
        sqlx::query("UPDATE audit_head SET one = one WHERE one = 1")
            .execute(&mut *tx)
            .await
            .map_err(query_error("locking the audit trail"))?;
        let head = sqlx::query("SELECT last_id, hash FROM audit_head WHERE one = 1")
            .fetch_one(&mut *tx)
            .await
            .map_err(query_error("reading the audit trail's head"))?;
        let prev_id: i64 = head.get("last_id");
        let prev_hash: String = head.get("hash");
        let id = prev_id + 1;
        let at = now_ms();
        let hash = audit::entry_hash(&prev_hash, id, at, record);
        sqlx::query(
            "INSERT INTO audit_log (id, at, actor, origin, action, target, detail, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(id)
        .bind(at)
        .bind(&record.actor)
        .bind(&record.origin)
        .bind(&record.action)
        .bind(&record.target)
        .bind(to_json(&record.detail))
        .bind(&prev_hash)
        .bind(&hash)
        .execute(&mut *tx)
        .await
        .map_err(query_error("appending to the audit trail"))?;
        sqlx::query("UPDATE audit_head SET last_id = $1, hash = $2 WHERE one = 1")
            .bind(id)
            .bind(&hash)
            .execute(&mut *tx)
            .await
            .map_err(query_error("advancing the audit trail's head"))?;
        tx.commit()
            .await
            .map_err(query_error("appending to the audit trail"))?;
        Ok(AuditEntry {
            id,
            at,
            record: record.clone(),
            prev_hash,
            hash,
        })
    }

    /// Entries at or after `since` (Unix ms), oldest first.
    pub async fn audit_entries(&self, since: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query("SELECT * FROM audit_log WHERE at >= $1 ORDER BY id")
            .bind(since)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("reading the audit trail"))?;
        rows.iter().map(entry_from_row).collect()
    }

    /// Check the whole chain against the head kept apart.
    pub async fn verify_audit(&self) -> Result<Verification, StoreError> {
        let entries = self.audit_entries(i64::MIN).await?;
        let head = sqlx::query("SELECT last_id, hash FROM audit_head WHERE one = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading the audit trail's head"))?
            .map(|row| (row.get::<i64, _>("last_id"), row.get::<String, _>("hash")));
        Ok(audit::verify(
            &entries,
            head.as_ref()
                .filter(|(id, _)| *id > 0)
                .map(|(id, hash)| (*id, hash.as_str())),
        ))
    }
}

fn entry_from_row(row: &sqlx::any::AnyRow) -> Result<AuditEntry, StoreError> {
    let detail: String = row.get("detail");
    Ok(AuditEntry {
        id: row.get("id"),
        at: row.get("at"),
        record: AuditRecord {
            actor: row.get("actor"),
            origin: row.get("origin"),
            action: row.get("action"),
            target: row.get("target"),
            detail: serde_json::from_str(&detail).map_err(|source| StoreError::Json {
                context: "audit_log.detail",
                source,
            })?,
        },
        prev_hash: row.get("prev_hash"),
        hash: row.get("hash"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(action: &str) -> AuditRecord {
        AuditRecord {
            actor: "token:ci".into(),
            origin: "api".into(),
            action: action.into(),
            target: "deployment #1".into(),
            detail: serde_json::json!({ "hosts": ["a"] }),
        }
    }

    #[tokio::test]
    async fn appends_chain_and_an_edited_row_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        assert!(store.verify_audit().await.unwrap().ok);
        // Concurrent appends still make one chain.
        let mut tasks = Vec::new();
        for i in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.audit(&record(&format!("deploy-{i}"))).await.unwrap()
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let v = store.verify_audit().await.unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.entries, 8);
        sqlx::query("UPDATE audit_log SET actor = 'token:mallory' WHERE id = 5")
            .execute(&store.pool)
            .await
            .unwrap();
        let v = store.verify_audit().await.unwrap();
        assert_eq!(v.first_bad_id, Some(5), "{v:?}");
        sqlx::query("UPDATE audit_log SET actor = 'token:ci' WHERE id = 5")
            .execute(&store.pool)
            .await
            .unwrap();
        sqlx::query("DELETE FROM audit_log WHERE id = 8")
            .execute(&store.pool)
            .await
            .unwrap();
        assert_eq!(store.verify_audit().await.unwrap().first_bad_id, Some(8));
    }
}
