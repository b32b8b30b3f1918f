//! The audit trail: every action that changes or reveals something,
//! appended with who, when, from where and what, in a tamper-evident chain.
//!
//! Each entry carries the hash of the one before it (SHA-256 over the
//! previous hash and the entry's own fields, in a fixed order), so editing
//! an entry breaks its own hash and removing one breaks its successor's
//! link and leaves a gap in the ids (which are never reused). The store
//! also keeps the newest hash and count apart from the entries, so that
//! cutting off the end is noticed too. Whoever can rewrite the whole
//! database can rewrite the whole chain: export it (`audit --json`) and
//! keep the newest hash elsewhere to make that evident as well.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What was done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// An identity (`token:ci`, `slack:U1`, `user:alice`, `github:bob`), or
    /// `unknown` for a failed authentication.
    pub actor: String,
    /// Where from: `cli`, `api`, `slack`, `github`, `schedule`, and
    /// details (the token's name, a chat channel, a delivery id, a peer).
    pub origin: String,
    /// `deploy`, `approve`, `reject`, `override-window`, `cancel`,
    /// `rollback`, `exec`, `upload-keys`, `promote`, `auth-failed`, …
    pub action: String,
    /// What it was about: `deployment #12`, host names, …
    pub target: String,
    /// Anything else worth keeping (a reason, the options, an error).
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// One entry as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    /// Unix ms.
    pub at: i64,
    #[serde(flatten)]
    pub record: AuditRecord,
    pub prev_hash: String,
    pub hash: String,
}

/// The hash of an entry with `id` and `at` after `prev_hash`.
pub fn entry_hash(prev_hash: &str, id: i64, at: i64, record: &AuditRecord) -> String {
    let mut hasher = Sha256::new();
    // Fields separated by a byte no field's JSON contains unescaped.
    for part in [
        prev_hash.to_string(),
        id.to_string(),
        at.to_string(),
        record.actor.clone(),
        record.origin.clone(),
        record.action.clone(),
        record.target.clone(),
        serde_json::to_string(&record.detail).unwrap_or_default(),
    ] {
        hasher.update(serde_json::to_string(&part).unwrap_or_default().as_bytes());
        hasher.update([0u8]);
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What verifying the chain found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub entries: usize,
    pub ok: bool,
    /// The first entry that was changed, or the first after a removed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_bad_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The newest hash (keep it elsewhere to notice a rewrite of all).
    pub head: String,
}

/// Check a chain, in id order, against the head the store kept apart
/// (`head`: the newest id and hash, if any entry was ever written).
pub fn verify(entries: &[AuditEntry], head: Option<(i64, &str)>) -> Verification {
    let mut prev = GENESIS.to_string();
    let mut expected_id: Option<i64> = None;
    let bad = |id: i64, problem: String, count: usize, head: &str| Verification {
        entries: count,
        ok: false,
        first_bad_id: Some(id),
        problem: Some(problem),
        head: head.to_string(),
    };
    for entry in entries {
        if let Some(expected) = expected_id
            && entry.id != expected
        {
            return bad(
                entry.id,
                format!(
                    "entries {expected}..{} are missing (removed) before entry {}",
                    entry.id - 1,
                    entry.id
                ),
                entries.len(),
                &prev,
            );
        }
        if entry.prev_hash != prev {
            return bad(
                entry.id,
                format!(
                    "entry {} does not follow the entry before it (that one was changed or removed)",
                    entry.id
                ),
                entries.len(),
                &prev,
            );
        }
        let hash = entry_hash(&entry.prev_hash, entry.id, entry.at, &entry.record);
        if hash != entry.hash {
            return bad(
                entry.id,
                format!("entry {} was changed after it was written", entry.id),
                entries.len(),
                &prev,
            );
        }
        prev = hash;
        expected_id = Some(entry.id + 1);
    }
    if let Some((head_id, head_hash)) = head {
        let last = entries.last().map(|e| e.id).unwrap_or(0);
        if last != head_id || prev != head_hash {
            return bad(
                last + 1,
                format!(
                    "the chain ends at entry {last}, but entry {head_id} was written (entries after {last} were removed, or the chain rewritten)"
                ),
                entries.len(),
                &prev,
            );
        }
    }
    Verification {
        entries: entries.len(),
        ok: true,
        first_bad_id: None,
        problem: None,
        head: prev,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditEntry> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|id| {
                let record = AuditRecord {
                    actor: format!("token:t{id}"),
                    origin: "api".into(),
                    action: "deploy".into(),
                    target: format!("deployment #{id}"),
                    detail: serde_json::json!({ "hosts": ["a"] }),
                };
                let hash = entry_hash(&prev, id, id * 10, &record);
                let entry = AuditEntry {
                    id,
                    at: id * 10,
                    record,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                entry
            })
            .collect()
    }

    fn head(entries: &[AuditEntry]) -> Option<(i64, String)> {
        entries.last().map(|e| (e.id, e.hash.clone()))
    }

    #[test]
    fn an_intact_chain_verifies() {
        let entries = chain(5);
        let h = head(&entries);
        let v = verify(&entries, h.as_ref().map(|(i, s)| (*i, s.as_str())));
        assert!(v.ok, "{v:?}");
        assert_eq!(v.head, entries[4].hash);
        assert!(verify(&[], None).ok);
    }

    #[test]
    fn an_edited_entry_is_the_first_bad_one() {
        let mut entries = chain(5);
        let h = head(&entries).unwrap();
        entries[2].record.actor = "token:mallory".into();
        let v = verify(&entries, Some((h.0, &h.1)));
        assert!(!v.ok);
        assert_eq!(v.first_bad_id, Some(3));
        assert!(v.problem.unwrap().contains("changed"));
        // Rehashing the edited entry only moves the break to the next one.
        entries[2].hash = entry_hash(&entries[2].prev_hash, 3, 30, &entries[2].record);
        assert_eq!(verify(&entries, Some((h.0, &h.1))).first_bad_id, Some(4));
    }

    #[test]
    fn removed_entries_are_found_in_the_middle_and_at_the_end() {
        let mut entries = chain(5);
        let h = head(&entries).unwrap();
        entries.remove(1);
        let v = verify(&entries, Some((h.0, &h.1)));
        assert_eq!(v.first_bad_id, Some(3));
        assert!(v.problem.unwrap().contains("missing"), "removed");
        let mut entries = chain(5);
        entries.pop();
        let v = verify(&entries, Some((h.0, &h.1)));
        assert!(!v.ok);
        assert_eq!(v.first_bad_id, Some(5));
    }
}
