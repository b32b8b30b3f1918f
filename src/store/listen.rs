//! New events, as the database announces them (PostgreSQL): every insert
//! into `events` notifies `nix_deploy_events` with `DEPLOYMENT:EVENT` at
//! commit (a trigger, see the migrations). A notification only says "look":
//! readers take the events from the table, after the last id they saw, so a
//! notification lost while the connection was down loses nothing
//! ([`Notice::Reconnected`] tells them to catch up).

use sqlx::postgres::PgListener;

use super::{Backend, Database, Store, StoreError, query_error};

/// The channel the events trigger notifies.
const CHANNEL: &str = "nix_deploy_events";

/// What the listener heard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Event `event` of deployment `deployment` was committed.
    Event { deployment: i64, event: i64 },
    /// The connection was lost and made again: anything may have happened
    /// meanwhile.
    Reconnected,
}

/// A connection listening for new events.
pub struct EventListener {
    listener: PgListener,
}

impl Store {
    /// Listen for new events; `None` on SQLite, which has no notifications
    /// (its writers are on this machine: the daemon hears its own, and
    /// follows other processes' by reading).
    pub async fn listen_events(&self) -> Result<Option<EventListener>, StoreError> {
        let Database::Postgres(url) = &self.database else {
            return Ok(None);
        };
        debug_assert_eq!(self.backend(), Backend::Postgres);
        let context = "listening for events";
        let mut listener = PgListener::connect(url.expose())
            .await
            .map_err(query_error(context))?;
        listener
            .listen(CHANNEL)
            .await
            .map_err(query_error(context))?;
        Ok(Some(EventListener { listener }))
    }
}

impl EventListener {
    /// The next notice. An error means the database cannot be reached right
    /// now (the caller waits and asks again: the listener reconnects).
    pub async fn next(&mut self) -> Result<Notice, StoreError> {
        match self.listener.try_recv().await {
            Ok(Some(notification)) => {
                Ok(parse(notification.payload()).unwrap_or(Notice::Reconnected))
            }
            Ok(None) => Ok(Notice::Reconnected),
            Err(source) => Err(StoreError::Query {
                context: "listening for events",
                source,
            }),
        }
    }
}

/// `DEPLOYMENT:EVENT`.
fn parse(payload: &str) -> Option<Notice> {
    let (deployment, event) = payload.split_once(':')?;
    Some(Notice::Event {
        deployment: deployment.parse().ok()?,
        event: event.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_a_deployment_and_an_event() {
        assert_eq!(
            parse("12:345"),
            Some(Notice::Event {
                deployment: 12,
                event: 345
            })
        );
        assert_eq!(parse("12"), None);
        assert_eq!(parse("x:1"), None);
    }
}
