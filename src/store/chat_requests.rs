//! Chat deployments waiting for a Confirm button (`chat_requests`): a
//! deployment from chat that would touch more hosts than
//! `chat.confirm-above` is kept here with the plan it showed, and runs
//! only once someone allowed confirms it before it expires. Deciding is
//! one compare-and-swap on the state: a request is confirmed or cancelled
//! once.

use sqlx::Row;

use super::{Store, StoreError, query_error};

/// A pending (or decided) chat request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatRequest {
    pub id: i64,
    pub created_at: i64,
    pub expires_at: i64,
    /// The Slack identity that asked (`slack:U1`).
    pub requester: String,
    pub channel: String,
    /// The request as JSON, its hosts pinned to the plan that was shown.
    pub request: String,
    /// `pending`, `confirmed`, `cancelled`.
    pub state: String,
    pub deployment_id: Option<i64>,
    pub response_url: Option<String>,
}

/// A request to keep.
pub struct NewChatRequest<'a> {
    pub created_at: i64,
    pub expires_at: i64,
    pub requester: &'a str,
    pub channel: &'a str,
    pub request: &'a str,
    pub response_url: Option<&'a str>,
}

/// What became of a Confirm or Cancel.
#[derive(Debug, PartialEq, Eq)]
pub enum ChatDecision {
    /// Decided now; the request as it was.
    Done(Box<ChatRequest>),
    /// Nothing changed: why.
    Refused(String),
}

impl Store {
    pub async fn create_chat_request(&self, new: &NewChatRequest<'_>) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "INSERT INTO chat_requests (created_at, expires_at, requester, channel, request, state, response_url)
             VALUES ($1, $2, $3, $4, $5, 'pending', $6) RETURNING id",
        )
        .bind(new.created_at)
        .bind(new.expires_at)
        .bind(new.requester)
        .bind(new.channel)
        .bind(new.request)
        .bind(new.response_url)
        .fetch_one(&self.pool)
        .await
        .map_err(query_error("keeping a chat request"))?;
        Ok(row.get(0))
    }

    pub async fn chat_request(&self, id: i64) -> Result<Option<ChatRequest>, StoreError> {
        let row = sqlx::query("SELECT * FROM chat_requests WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a chat request"))?;
        Ok(row.map(|r| ChatRequest {
            id: r.get("id"),
            created_at: r.get("created_at"),
            expires_at: r.get("expires_at"),
            requester: r.get("requester"),
            channel: r.get("channel"),
            request: r.get("request"),
            state: r.get("state"),
            deployment_id: r.get("deployment_id"),
            response_url: r.get("response_url"),
        }))
    }

    /// Move pending request `id` to `state` (`confirmed` or `cancelled`) at
    /// `now`, unless it was decided already or expired.
    pub async fn decide_chat_request(
        &self,
        id: i64,
        state: &str,
        now: i64,
    ) -> Result<ChatDecision, StoreError> {
        let Some(request) = self.chat_request(id).await? else {
            return Ok(ChatDecision::Refused(format!("no chat request #{id}")));
        };
        if request.state != "pending" {
            return Ok(ChatDecision::Refused(format!(
                "chat request #{id} was {} already{}",
                request.state,
                request
                    .deployment_id
                    .map(|d| format!(" (deployment #{d})"))
                    .unwrap_or_default()
            )));
        }
        if now >= request.expires_at {
            return Ok(ChatDecision::Refused(format!(
                "chat request #{id} expired; ask again"
            )));
        }
        let changed = sqlx::query(
            "UPDATE chat_requests SET state = $1 WHERE id = $2 AND state = 'pending' AND expires_at > $3",
        )
        .bind(state)
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(query_error("deciding a chat request"))?
        .rows_affected();
        if changed != 1 {
            return Ok(ChatDecision::Refused(format!(
                "chat request #{id} was decided meanwhile"
            )));
        }
        Ok(ChatDecision::Done(Box::new(request)))
    }

    /// The deployment a confirmed request started.
    pub async fn chat_request_started(
        &self,
        id: i64,
        deployment_id: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE chat_requests SET deployment_id = $1 WHERE id = $2")
            .bind(deployment_id)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(query_error("recording a chat request's deployment"))?;
        Ok(())
    }
}
