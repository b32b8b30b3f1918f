//! Approval gates and pauses of deployments, and the approvals given. A
//! yes or a no is decided in one transaction against the gate as stored
//! (the core's `approval` decides who may), so two people approving at
//! once, or an approval racing the timeout, leave one consistent answer.

use sqlx::Row;

use nix_deploy_core::approval::{Approval, Gate, GateKind, GateState, Refusal};
use nix_deploy_core::events::DeploymentStatus;

use super::{Store, StoreError, query_error, to_json};
use crate::now_ms;

/// What became of a yes or a no.
#[derive(Debug)]
pub enum Decision {
    /// Recorded; the gate as it is now.
    Done(Box<Gate>),
    /// Refused; nothing changed.
    Refused(Refusal),
}

fn parse<T: serde::de::DeserializeOwned>(
    text: &str,
    context: &'static str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Json { context, source })
}

impl Store {
    /// Record a gate the deployment stopped at (state `open`).
    pub async fn open_gate(&self, deployment_id: i64, gate: &Gate) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO gates (deployment_id, number, kind, title, hosts, host_tags, requirements,
                 state, opened_at, deadline, summary)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'open', $8, $9, $10)",
        )
        .bind(deployment_id)
        .bind(gate.number as i64)
        .bind(match gate.kind {
            GateKind::Approval => "approval",
            GateKind::Pause => "pause",
        })
        .bind(&gate.title)
        .bind(to_json(&gate.hosts))
        .bind(to_json(&gate.host_tags))
        .bind(to_json(&gate.requirements))
        .bind(gate.opened_at)
        .bind(gate.deadline)
        .bind(&gate.summary)
        .execute(&self.pool)
        .await
        .map_err(query_error("opening a gate"))?;
        Ok(())
    }

    /// A deployment's gates, with their approvals, in order.
    pub async fn gates(&self, deployment_id: i64) -> Result<Vec<Gate>, StoreError> {
        let mut connection = self
            .pool
            .acquire()
            .await
            .map_err(query_error("reading gates"))?;
        read_gates(&mut connection, deployment_id).await
    }

    /// The open gate of a deployment, if it waits at one.
    pub async fn open_gate_of(&self, deployment_id: i64) -> Result<Option<Gate>, StoreError> {
        Ok(self
            .gates(deployment_id)
            .await?
            .into_iter()
            .find(|g| g.state == GateState::Open))
    }

    /// `who` (an identity) approves the open gate of deployment `id`
    /// (requested by `requester`); the gate is approved when satisfied.
    pub async fn approve(
        &self,
        id: i64,
        who: &str,
        requester: &str,
        via: &str,
        comment: Option<&str>,
    ) -> Result<Decision, StoreError> {
        let mut tx = self.pool.begin().await.map_err(query_error("approving"))?;
        lock(&mut tx, id).await?;
        let now = now_ms();
        let Some(mut gate) = open_gate(&mut tx, id).await? else {
            return Ok(Decision::Refused(not_awaiting(id)));
        };
        if let Err(refusal) = gate.check_approval(id, who, requester, now) {
            return Ok(Decision::Refused(refusal));
        }
        let approval = Approval {
            by: who.to_string(),
            at: now,
            via: via.to_string(),
            comment: comment.map(str::to_string),
            seen: gate.summary.clone(),
        };
        sqlx::query(
            "INSERT INTO approvals (deployment_id, number, by_identity, at, via, comment, seen)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(gate.number as i64)
        .bind(&approval.by)
        .bind(approval.at)
        .bind(&approval.via)
        .bind(&approval.comment)
        .bind(&approval.seen)
        .execute(&mut *tx)
        .await
        .map_err(query_error("recording an approval"))?;
        gate.approvals.push(approval);
        if gate.satisfied() {
            set_state(&mut tx, id, &mut gate, GateState::Approved, who, None).await?;
        }
        tx.commit().await.map_err(query_error("approving"))?;
        Ok(Decision::Done(Box::new(gate)))
    }

    /// Close the open gate of deployment `id` as `state` (rejected by
    /// someone, expired, closed because the deployment ended), with `by`
    /// and `reason`. Refused when no gate is open (or it timed out, for a
    /// rejection).
    pub async fn decide_gate(
        &self,
        id: i64,
        state: GateState,
        by: &str,
        reason: &str,
    ) -> Result<Decision, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(query_error("deciding a gate"))?;
        lock(&mut tx, id).await?;
        let Some(mut gate) = open_gate(&mut tx, id).await? else {
            return Ok(Decision::Refused(not_awaiting(id)));
        };
        if state == GateState::Rejected
            && let Err(refusal) = gate.check_open(id, now_ms())
        {
            return Ok(Decision::Refused(refusal));
        }
        set_state(&mut tx, id, &mut gate, state, by, Some(reason)).await?;
        tx.commit().await.map_err(query_error("deciding a gate"))?;
        Ok(Decision::Done(Box::new(gate)))
    }

    /// A started deployment waits (for a window, an approval) or goes on:
    /// its status, unless it already ended.
    pub async fn set_deployment_status(
        &self,
        id: i64,
        status: DeploymentStatus,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE deployments SET status = $1 WHERE id = $2
                 AND status IN ('running', 'waiting-for-window', 'awaiting-approval')",
        )
        .bind(status.as_str())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_error("updating a deployment's status"))?;
        Ok(())
    }
}

fn not_awaiting(id: i64) -> Refusal {
    Refusal::NotAwaiting {
        id,
        detail: String::new(),
    }
}

/// Take the write lock at the start of the transaction (see `audit`).
async fn lock(tx: &mut sqlx::Transaction<'_, sqlx::Any>, id: i64) -> Result<(), StoreError> {
    sqlx::query("UPDATE gates SET state = state WHERE deployment_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(query_error("locking a deployment's gates"))?;
    Ok(())
}

async fn open_gate(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: i64,
) -> Result<Option<Gate>, StoreError> {
    Ok(read_gates(tx, id)
        .await?
        .into_iter()
        .find(|g| g.state == GateState::Open))
}

async fn set_state(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: i64,
    gate: &mut Gate,
    state: GateState,
    by: &str,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    let now = now_ms();
    sqlx::query(
        "UPDATE gates SET state = $1, decided_by = $2, decided_at = $3, reason = $4
         WHERE deployment_id = $5 AND number = $6 AND state = 'open'",
    )
    .bind(state.as_str())
    .bind(by)
    .bind(now)
    .bind(reason)
    .bind(id)
    .bind(gate.number as i64)
    .execute(&mut **tx)
    .await
    .map_err(query_error("deciding a gate"))?;
    gate.state = state;
    gate.decided_by = Some(by.to_string());
    gate.decided_at = Some(now);
    gate.reason = reason.map(str::to_string);
    Ok(())
}

async fn read_gates(
    connection: &mut sqlx::AnyConnection,
    id: i64,
) -> Result<Vec<Gate>, StoreError> {
    let rows = sqlx::query("SELECT * FROM gates WHERE deployment_id = $1 ORDER BY number")
        .bind(id)
        .fetch_all(&mut *connection)
        .await
        .map_err(query_error("reading gates"))?;
    let approvals = sqlx::query(
        "SELECT * FROM approvals WHERE deployment_id = $1 ORDER BY number, at, by_identity",
    )
    .bind(id)
    .fetch_all(&mut *connection)
    .await
    .map_err(query_error("reading approvals"))?;
    let mut gates = Vec::new();
    for row in rows {
        let number: i64 = row.get("number");
        let kind: String = row.get("kind");
        let state: String = row.get("state");
        let hosts: String = row.get("hosts");
        let requirements: String = row.get("requirements");
        let host_tags: String = row.get("host_tags");
        gates.push(Gate {
            number: number as u32,
            kind: if kind == "pause" {
                GateKind::Pause
            } else {
                GateKind::Approval
            },
            title: row.get("title"),
            hosts: parse(&hosts, "gates.hosts")?,
            host_tags: parse(&host_tags, "gates.host_tags")?,
            requirements: parse(&requirements, "gates.requirements")?,
            state: GateState::parse(&state).unwrap_or(GateState::Closed),
            opened_at: row.get("opened_at"),
            deadline: row.get("deadline"),
            approvals: approvals
                .iter()
                .filter(|a| a.get::<i64, _>("number") == number)
                .map(|a| Approval {
                    by: a.get("by_identity"),
                    at: a.get("at"),
                    via: a.get("via"),
                    comment: a.get("comment"),
                    seen: a.get("seen"),
                })
                .collect(),
            decided_by: row.get("decided_by"),
            decided_at: row.get("decided_at"),
            reason: row.get("reason"),
            summary: row.get("summary"),
        });
    }
    Ok(gates)
}
