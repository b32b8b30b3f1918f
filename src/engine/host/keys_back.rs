//! Keys follow the system. A deployment's uploads keep what they replace
//! on the host, in the deployment's undo set ([`keep`]; the scripts are
//! [`nix_deploy_core::keys::undo`]'s). When the host goes back to what it
//! ran before ([`super::way_back`], for every way back), its keys go back
//! too ([`go_back`]): replaced keys get their old contents, owner and mode,
//! keys it created are removed. After a reboot on the way back, keys whose
//! directory lost them (a tmpfs like `/run/keys`, and the set with them) are
//! uploaded again with this deployment's contents, and the result says so.
//! On success the set is kept as `previous` ([`commit`]), which `rollback`
//! on request, or the settling of an activation a dead coordinator left,
//! puts back when the host runs again the system it was made for
//! ([`return_to`]).
//!
//! What happened is recorded in the host run ([`KeyChanges`]) and said in
//! its result ([`conclude`]): a key that could not be put back makes the way
//! back a failure naming the key.

use std::time::Duration;

use nix_deploy_core::events::{HostStatus, Step};
use nix_deploy_core::fleet::Host;
use nix_deploy_core::keys::{self, Keep, Key, KeyChanges, UndoAction, UndoReport};
use nix_deploy_core::remote::Before;
use nix_deploy_core::render;
use nix_deploy_core::run::HostRun;

use super::context::HostContext;
use super::keys as upload;
use crate::store::StoreError;
use crate::transport::ssh::{Connection, SshError};

/// Whether this run's keys step ran: it may have replaced keys (a failed
/// upload may have replaced the keys before the one that failed).
pub(crate) fn touched(run: &HostRun) -> bool {
    run.steps.iter().any(|s| s.step == Step::Keys)
}

/// Where this deployment's uploads keep what they replace: its undo set,
/// made for the system the host ran before it.
pub(crate) fn keep<'a>(context: &HostContext, before: &'a Before) -> Keep<'a> {
    Keep::Set {
        deployment: context.recorder.deployment_id(),
        system: before.running.as_deref(),
    }
}

/// Run `action` over `host`'s keys; `None` when it has none.
async fn undo(
    connection: &Connection,
    host: &Host,
    action: UndoAction<'_>,
    timeout: Duration,
) -> Result<Option<UndoReport>, String> {
    let all: Vec<&Key> = host.keys.iter().collect();
    let Some(argv) = keys::undo_argv(action, &all) else {
        return Ok(None);
    };
    let name = &host.name;
    let out = connection
        .run_privileged("keys", &argv, timeout)
        .await
        .map_err(|e| match e {
            // The script's text is no use in an error: what failed is.
            SshError::Exit { code, stderr, .. } => format!(
                "{name}: keys: the undo script failed (exit code {code}){}",
                crate::process::format_tail(&stderr)
            ),
            SshError::Timeout { timeout, .. } => format!(
                "{name}: keys: the undo script did not finish within {}s",
                timeout.as_secs()
            ),
            e => e.to_string(),
        })?;
    keys::parse_undo(&out.stdout)
        .map(Some)
        .map_err(|e| format!("{name}: keys: the undo script's report: {e}"))
}

/// Every key of `host` as failed for `why` (the undo could not run).
fn all_failed(host: &Host, why: &str) -> Vec<String> {
    let paths: Vec<String> = host.keys.iter().map(Key::path).collect();
    vec![format!("{}: {why}", paths.join(", "))]
}

/// Put this deployment's keys on `host` back as they were before it. With
/// `after_reboot`, keys that are missing and were not kept (their directory
/// was emptied by a reboot, their undo set with it) are uploaded again with
/// this deployment's contents: what they held before is lost.
pub(crate) async fn put_back(
    context: &HostContext,
    connection: &Connection,
    host: &Host,
    after_reboot: bool,
) -> KeyChanges {
    let action = UndoAction::Restore {
        deployment: context.recorder.deployment_id(),
    };
    let report = match undo(connection, host, action, context.ssh.command_timeout).await {
        Ok(Some(report)) => report,
        Ok(None) => return KeyChanges::default(),
        Err(e) => {
            return KeyChanges {
                failed: all_failed(host, &e),
                ..KeyChanges::default()
            };
        }
    };
    let mut changes = report.changes;
    if after_reboot && !report.missing.is_empty() {
        let lost: Vec<&Key> = host
            .keys
            .iter()
            .filter(|k| report.missing.contains(&k.path()))
            .collect();
        let mut done = Vec::new();
        let result = upload::upload(
            connection,
            &context.keys,
            host,
            &lost,
            false,
            Keep::Nothing,
            &mut done,
        )
        .await;
        changes
            .uploaded_again
            .extend(lost.iter().take(done.len()).map(|k| k.path()));
        if let Err(e) = result {
            let rest: Vec<String> = lost.iter().skip(done.len()).map(|k| k.path()).collect();
            changes.failed.push(format!(
                "{}: lost with the reboot and not uploaded again: {e}",
                rest.join(", ")
            ));
        }
    }
    changes
}

/// The way back of this deployment's keys on a host whose system went back
/// (or never changed): put back if its keys step ran, and recorded.
pub(crate) async fn go_back(
    context: &HostContext,
    connection: &Connection,
    host: &Host,
    run: &mut HostRun,
    after_reboot: bool,
) -> Result<(), StoreError> {
    if !touched(run) {
        return Ok(());
    }
    let changes = put_back(context, connection, host, after_reboot).await;
    record(context, run, changes).await
}

/// Say, in the run and the deployment's log, that the keys were left as
/// this deployment made them, and why.
pub(crate) async fn left(
    context: &HostContext,
    run: &mut HostRun,
    why: &str,
) -> Result<(), StoreError> {
    if !touched(run) {
        return Ok(());
    }
    let changes = KeyChanges {
        left: Some(format!("left as this deployment made them: {why}")),
        ..KeyChanges::default()
    };
    record(context, run, changes).await
}

/// Keep what happened to the keys in the run, and log it.
pub(crate) async fn record(
    context: &HostContext,
    run: &mut HostRun,
    changes: KeyChanges,
) -> Result<(), StoreError> {
    let Some(line) = render::key_changes(&changes) else {
        return Ok(());
    };
    context.recorder.log(Some(&run.host), line).await?;
    run.keys = Some(changes);
    Ok(())
}

/// Once the way back is concluded: the run's result says what happened to
/// its keys, and a key that could not be put back makes a rollback a failed
/// one, naming the key.
pub(crate) fn conclude(run: &mut HostRun) {
    let Some(changes) = &run.keys else {
        return;
    };
    let Some(line) = render::key_changes(changes) else {
        return;
    };
    if run.error.as_deref().is_some_and(|e| e.contains(&line)) {
        return;
    }
    if !changes.all_back() && run.status == HostStatus::RolledBack {
        run.status = HostStatus::RollbackFailed;
    }
    run.error = Some(match run.error.take() {
        Some(error) => format!("{error}\n{line}"),
        None => line,
    });
}

/// This deployment succeeded on the host: what its uploads replaced is kept
/// as `previous`, for `rollback`. One that cannot be kept is logged (its set
/// stays on the host; the next upload keeps it as `previous`).
pub(crate) async fn commit(
    context: &HostContext,
    connection: &Connection,
    host: &Host,
    run: &HostRun,
) -> Result<(), StoreError> {
    if !touched(run) {
        return Ok(());
    }
    let action = UndoAction::Commit {
        deployment: context.recorder.deployment_id(),
    };
    let problem = match undo(connection, host, action, context.ssh.command_timeout).await {
        Ok(Some(report)) if !report.changes.all_back() => report.changes.failed.join("; "),
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    context
        .recorder
        .log(
            Some(&host.name),
            format!("keys: the replaced keys could not be kept for `rollback`: {problem}"),
        )
        .await
}

/// The host runs `system` again (a rollback on request, an activation a
/// dead coordinator left, switched back): the keys kept for that system
/// are put back, if any were; else they are left, and it says so.
pub(crate) async fn return_to(
    connection: &Connection,
    host: &Host,
    system: Option<&str>,
    timeout: Duration,
) -> KeyChanges {
    let nothing_kept = || {
        KeyChanges {
        left: Some(
            "left as they are: none were kept for the system it runs now (a deployment keeps what it replaced for the system it came from, until the next deployment)"
                .into(),
        ),
        ..KeyChanges::default()
    }
    };
    let Some(system) = system else {
        return nothing_kept();
    };
    match undo(connection, host, UndoAction::Return { system }, timeout).await {
        Ok(None) => KeyChanges::default(),
        Ok(Some(report)) => {
            let changes = report.changes;
            if changes == KeyChanges::default() {
                nothing_kept()
            } else {
                changes
            }
        }
        Err(e) => KeyChanges {
            failed: all_failed(host, &e),
            ..KeyChanges::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_not_put_back_fails_a_rollback_naming_the_key() {
        let mut run = HostRun::new(1, "h");
        run.status = HostStatus::RolledBack;
        run.error = Some("h: validate: boom\nrolled back to generation 1".into());
        run.keys = Some(KeyChanges {
            restored: vec!["/run/keys/a".into()],
            failed: vec!["/srv/b: mv: denied".into()],
            ..KeyChanges::default()
        });
        conclude(&mut run);
        assert_eq!(run.status, HostStatus::RollbackFailed);
        let error = run.error.clone().unwrap();
        assert!(
            error.starts_with("h: validate: boom\nrolled back"),
            "{error}"
        );
        assert!(error.ends_with("NOT known to be as before the deployment: /srv/b: mv: denied"));
        // Said once, however often concluded.
        conclude(&mut run);
        assert_eq!(run.error.unwrap(), error);

        let mut run = HostRun::new(1, "h");
        run.status = HostStatus::Failed;
        run.keys = Some(KeyChanges {
            removed: vec!["/run/keys/c".into()],
            ..KeyChanges::default()
        });
        conclude(&mut run);
        assert_eq!(run.status, HostStatus::Failed);
        assert_eq!(
            run.error.as_deref(),
            Some("keys: removed 1 created by this deployment (/run/keys/c)")
        );
        assert!(!touched(&run));
    }
}
