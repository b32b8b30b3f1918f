//! Health validation: a host's `deployment.healthChecks`, retried every
//! `period` until all pass or the overall deadline runs out.
//!
//! `service` and `command` checks run on the host over the existing SSH
//! connection; `http` checks are GETs from the coordinator.

use std::time::Duration;

use tokio::time::Instant;

use nix_deploy_core::events::{Attempt, CheckResult};
use nix_deploy_core::fleet::{CheckKind, HealthCheck, Host};

use super::observe;
use crate::transport::ssh::Connection;

/// How many attempts of one check are kept (the latest ones).
const KEEP_ATTEMPTS: usize = 30;

/// argv for a check that runs on the host.
pub fn remote_argv(check: &CheckKind) -> Option<Vec<String>> {
    match check {
        CheckKind::Service { unit } => Some(vec![
            "systemctl".into(),
            "is-active".into(),
            // Unit names are validated (never start with `-`), so no `--` needed.
            unit.clone(),
        ]),
        CheckKind::Command { command } => Some(vec!["sh".into(), "-c".into(), command.clone()]),
        CheckKind::Http { .. } => None,
    }
}

async fn attempt(connection: &Connection, check: &HealthCheck) -> (bool, String) {
    match &check.kind {
        CheckKind::Http {
            url,
            status,
            body_contains,
        } => http_attempt(url, *status, body_contains.as_deref(), check.timeout).await,
        kind => {
            let argv = remote_argv(kind).unwrap_or_default();
            match connection.run("validate", &argv, check.timeout).await {
                Ok(out) => (true, out.stdout.trim().to_string()),
                Err(e) => (false, e.to_string()),
            }
        }
    }
}

/// A GET with a timeout; passes when the status (and body, if asked) match.
async fn http_attempt(
    url: &str,
    expected: u16,
    body_contains: Option<&str>,
    timeout: Duration,
) -> (bool, String) {
    match crate::transport::http::get(url, timeout).await {
        Ok((status, body)) => {
            if status != expected {
                return (
                    false,
                    format!("GET {url}: status {status}, expected {expected}"),
                );
            }
            if let Some(needle) = body_contains
                && !body.contains(needle)
            {
                return (
                    false,
                    format!("GET {url}: body does not contain `{needle}`"),
                );
            }
            (true, format!("GET {url}: {status}"))
        }
        Err(e) => (false, format!("GET {url}: {e}")),
    }
}

/// Run every check until all pass at once or `overall` runs out. Each check is
/// retried on its own period; the ones already passing are re-checked on the
/// next round so the final answer is a consistent "all healthy now".
pub async fn validate(
    connection: &Connection,
    checks: &[HealthCheck],
    overall: Duration,
) -> Result<Vec<CheckResult>, (String, Vec<CheckResult>)> {
    let deadline = Instant::now() + overall;
    let mut results: Vec<CheckResult> = checks
        .iter()
        .map(|c| CheckResult {
            check: c.describe(),
            ok: false,
            attempts: 0,
            output: String::new(),
            history: Vec::new(),
        })
        .collect();
    if checks.is_empty() {
        return Ok(results);
    }
    let period = checks
        .iter()
        .map(|c| c.period)
        .min()
        .unwrap_or(Duration::from_secs(2));
    loop {
        for (check, result) in checks.iter().zip(results.iter_mut()) {
            let (ok, output) = attempt(connection, check).await;
            if result.history.len() == KEEP_ATTEMPTS {
                result.history.remove(0);
            }
            result.history.push(Attempt {
                at: crate::now_ms(),
                ok,
                output: output.clone(),
            });
            result.ok = ok;
            result.attempts += 1;
            result.output = output;
        }
        if results.iter().all(|r| r.ok) {
            return Ok(results);
        }
        if Instant::now() + period >= deadline {
            let failing: Vec<String> = results
                .iter()
                .filter(|r| !r.ok)
                .map(|r| format!("{} ({})", r.check, r.output.lines().next().unwrap_or("")))
                .collect();
            return Err((
                format!(
                    "health checks still failing after {}s: {}",
                    overall.as_secs(),
                    failing.join("; ")
                ),
                results,
            ));
        }
        tokio::time::sleep(period).await;
    }
}

/// The host runs `path` and its health checks pass. Returns every check's
/// last result for the record, and the verdict.
pub(crate) async fn validate_host(
    connection: &Connection,
    host: &Host,
    path: &str,
    checks: &[HealthCheck],
    health_timeout: Duration,
    command_timeout: Duration,
) -> (Vec<CheckResult>, Result<String, String>) {
    // Never skipped, not even with --skip-validation.
    if let Err(e) = runs(connection, host, path, command_timeout, "after activation").await {
        return (Vec::new(), Err(e));
    }
    match validate(connection, checks, health_timeout).await {
        Ok(results) => {
            // Checks that passed on another system prove nothing: the host
            // must still run `path` now that they passed.
            if let Err(e) = runs(
                connection,
                host,
                path,
                command_timeout,
                "while it was validated (switched back?)",
            )
            .await
            {
                return (results, Err(e));
            }
            let text = results
                .iter()
                .map(|r| format!("{}: ok", r.check))
                .collect::<Vec<_>>()
                .join(", ");
            (results, Ok(text))
        }
        Err((message, results)) => (results, Err(format!("{}: validate: {message}", host.name))),
    }
}

/// `/run/current-system` is `path` (`when` says when, in the error).
async fn runs(
    connection: &Connection,
    host: &Host,
    path: &str,
    timeout: Duration,
    when: &str,
) -> Result<(), String> {
    let now = observe::systems(connection, "validate", timeout).await?;
    match now.running.as_deref() {
        Some(running) if running == path => Ok(()),
        running => Err(format!(
            "{}: validate: /run/current-system is {} {when}, expected {path}",
            host.name,
            running.unwrap_or("nothing")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_checks_are_argument_vectors() {
        assert_eq!(
            remote_argv(&CheckKind::Service {
                unit: "nginx.service".into()
            })
            .unwrap(),
            ["systemctl", "is-active", "nginx.service"]
        );
        assert_eq!(
            remote_argv(&CheckKind::Command {
                command: "test -e /run/ok".into()
            })
            .unwrap(),
            ["sh", "-c", "test -e /run/ok"]
        );
        assert!(
            remote_argv(&CheckKind::Http {
                url: "http://x".into(),
                status: 200,
                body_contains: None
            })
            .is_none()
        );
    }
}
