//! Change summaries: what changes on a host, from the closure it runs (read
//! on the host) to the closure of its new system (read on the coordinator).
//! Informational: a summary that cannot be made is never a failure.

use std::time::Duration;

use nix_deploy_core::remote;
use nix_deploy_core::summary::{self, ChangeSummary};

use crate::nix::Nix;
use crate::transport::ssh::Connection;

/// Listing a closure on a host: a bounded query, however large the system.
const CLOSURE_QUERY_TIMEOUT: Duration = Duration::from_secs(120);

/// Compare the closure of `built` (the host's new toplevel, already built
/// locally) with the one the host runs (queried on the host; nothing is copied).
pub(crate) async fn change_summary(
    nix: &Nix,
    connection: &Connection,
    built: &str,
) -> Result<ChangeSummary, String> {
    let old = current_closure(connection).await;
    new_closure_summary(nix, &old, built).await
}

/// The closure of the system the host runs: empty when it has none yet (or
/// it cannot be read; the summary is informational).
pub(crate) async fn current_closure(connection: &Connection) -> Vec<String> {
    match connection
        .run(
            "summary",
            &remote::closure_argv("/run/current-system"),
            CLOSURE_QUERY_TIMEOUT,
        )
        .await
    {
        Ok(out) => out
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// What changes from the closure `old` to `built`'s.
pub(crate) async fn new_closure_summary(
    nix: &Nix,
    old: &[String],
    built: &str,
) -> Result<ChangeSummary, String> {
    let new = nix.closure(built).await.map_err(|e| e.to_string())?;
    Ok(summary::summarize(old, &new))
}
