//! Asking a git remote where a branch points (pull mode), through
//! [`crate::process`] with a timeout; the command and its parsing are the
//! core's (`nix_deploy_core::pull`).

use std::time::Duration;

use nix_deploy_core::pull;

use crate::process;

/// The commit `branch` points at on `remote`, or why it is not known.
pub async fn branch_head(remote: &str, branch: &str, timeout: Duration) -> Result<String, String> {
    let out = process::run(&pull::ls_remote_command(remote, branch), timeout, |_, _| {})
        .await
        .map_err(|e| format!("git ls-remote {remote}: {e}"))?;
    pull::parse_ls_remote(&out.stdout, branch).map_err(|e| format!("{remote}: {e}"))
}
