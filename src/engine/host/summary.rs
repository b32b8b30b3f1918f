//! Change summaries: what changes on a host, from the closure it runs (read
//! on the host) to the closure of its new system (read on the coordinator,
//! or on the host when the host built it). Informational: a summary that
//! cannot be made is never a failure.

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
    closure_on_host(connection, "/run/current-system")
        .await
        .unwrap_or_default()
}

/// The closure of `path`, read on the host.
async fn closure_on_host(connection: &Connection, path: &str) -> Result<Vec<String>, String> {
    let out = connection
        .run(
            "summary",
            &remote::closure_argv(path),
            CLOSURE_QUERY_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(summary::closure_paths(&out.stdout))
}

/// What changes from the closure `old` to `path`'s, which the host built
/// itself (`buildOnTarget`): both read on the host, whose store alone holds
/// it.
pub(crate) async fn host_closure_summary(
    connection: &Connection,
    old: &[String],
    path: &str,
) -> Result<ChangeSummary, String> {
    let new = closure_on_host(connection, path).await?;
    Ok(summary::summarize(old, &new))
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
