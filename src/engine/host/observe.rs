//! What a host runs, read over SSH: [`systems`], the one reading of what a
//! host runs and boots that every step comparing it uses; the probe (the
//! same, and free space, systemd, the boot id and booted kernel, and
//! activations a stopped coordinator left undecided, in one round trip);
//! and the settling of those leftovers before a command that changes the
//! host goes on. [`observe`] is the probe as the daemon's watch and
//! `status --live` use it: never settling, with a round of health checks,
//! bounded as a whole.

use std::time::Duration;

use nix_deploy_core::events::{HostState, SystemRef};
use nix_deploy_core::fleet::Host;
use nix_deploy_core::plan;
use nix_deploy_core::remote::{self, Before, HostSystems, ProbeResult};
use nix_deploy_core::render;
use nix_deploy_core::watch::Observation;

use super::fence::HostFence;
use super::health;
use crate::now_ms;
use crate::transport::ssh::{Connection, SshOptions};

/// A host as probed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Assessment {
    pub host: Host,
    pub state: HostState,
    pub current: SystemRef,
    /// What the way back restores: what the host ran and booted when it
    /// was probed, or, when a resumed deployment had touched it already,
    /// before that deployment first did.
    pub before: Before,
    pub probe: Option<ProbeResult>,
    pub error: Option<String>,
    /// Undecided activations a dead coordinator left, settled before this
    /// probe (one line each).
    pub settled: Vec<String>,
}

/// Whether probing may change a host to settle what a dead coordinator left.
#[derive(Clone, Debug)]
pub(crate) enum Settle {
    /// Commands that touch hosts settle undecided activations first, so no
    /// old watchdog can switch a host back after them.
    Yes {
        /// How long an abandoned activation may still take to end.
        activation_timeout: Duration,
        /// The deployment probing, when it is one: the probe records its
        /// epoch on the host first (as root), so an earlier holder of the
        /// deployment is fenced out before anything is settled.
        fence: Option<HostFence>,
    },
    /// Read-only commands report them.
    No,
}

/// Connect and probe one host. Never fails: an unreachable host is a result
/// (and a host refusing the deployment's epoch one that cannot be reached:
/// the deployment is lost here, see `HostFence::refused`). With
/// [`Settle::Yes`], activations a dead coordinator left undecided are
/// settled first (switched back, as their watchdogs would), then the host
/// is probed again and the keys kept for what it runs go back
/// ([`super::keys_back::return_to`]).
pub(crate) async fn probe_host(
    host: Host,
    options: &SshOptions,
    settle: Settle,
) -> (Assessment, Option<Connection>) {
    let fence = match &settle {
        Settle::Yes { fence, .. } => fence.as_ref(),
        Settle::No => None,
    };
    let (assessment, connection) = probe_once(host, options, fence).await;
    let Settle::Yes {
        activation_timeout, ..
    } = settle
    else {
        return (assessment, connection);
    };
    let Some(connection) = connection else {
        return (assessment, None);
    };
    if assessment
        .probe
        .as_ref()
        .is_none_or(|p| p.pending.is_empty())
    {
        return (assessment, Some(connection));
    }
    let settled = connection
        .run_privileged(
            "settle",
            &remote::settle_argv(
                activation_timeout.as_secs().max(1),
                fence.map(HostFence::fence),
            ),
            activation_timeout + Duration::from_secs(120),
        )
        .await;
    let mut lines: Vec<String> = match settled {
        Ok(out) => out.stdout.lines().map(str::to_string).collect(),
        Err(e) => {
            if fence.is_some_and(|f| f.refused(&assessment.host.name, &e)) {
                connection.close().await;
                let error = e.to_string();
                return (unreachable(assessment.host, error), None);
            }
            vec![format!("could not settle: {e}")]
        }
    };
    connection.close().await;
    // Probe again: what the host runs now is what counts.
    let (mut again, connection) = probe_once(assessment.host, options, fence).await;
    // Keys follow the system: those kept for what it runs again go back.
    if let Some(connection) = &connection {
        let running = again.current.path.as_deref();
        let keys =
            super::keys_back::return_to(connection, &again.host, running, options.command_timeout)
                .await;
        if keys.left.is_none() {
            lines.extend(render::key_changes(&keys));
        }
    }
    again.settled = lines;
    (again, connection)
}

/// A host that could not be probed, and why.
fn unreachable(host: Host, error: String) -> Assessment {
    Assessment {
        host,
        state: HostState::Unreachable,
        current: SystemRef::default(),
        before: Before::default(),
        probe: None,
        error: Some(error),
        settled: Vec::new(),
    }
}

/// One probe; behind the deployment's fence (as root) when there is one.
async fn probe_once(
    host: Host,
    options: &SshOptions,
    fence: Option<&HostFence>,
) -> (Assessment, Option<Connection>) {
    let connection = match Connection::connect(&host.name, &host.target, options).await {
        Ok(c) => c,
        Err(e) => return (unreachable(host, e.to_string()), None),
    };
    let probed = match fence {
        Some(fence) => {
            connection
                .run_privileged(
                    "probe",
                    &remote::fenced_probe_argv(fence.fence()),
                    options.command_timeout,
                )
                .await
        }
        None => {
            connection
                .run("probe", &remote::probe_argv(), options.command_timeout)
                .await
        }
    };
    let output = match probed {
        Ok(o) => o,
        Err(e) => {
            if let Some(fence) = fence {
                fence.refused(&host.name, &e);
            }
            connection.close().await;
            return (unreachable(host, e.to_string()), None);
        }
    };
    match remote::parse_probe(&output.stdout) {
        Ok(probe) => {
            let state = plan::classify(
                probe.current_system.as_deref(),
                probe.profile_system.as_deref(),
                host.toplevel(),
            );
            let current = SystemRef {
                path: probe.current_system.clone(),
                generation: probe.generation,
            };
            (
                Assessment {
                    host,
                    state,
                    current,
                    before: Before::of(&probe.systems()),
                    probe: Some(probe),
                    error: None,
                    settled: Vec::new(),
                },
                Some(connection),
            )
        }
        Err(e) => {
            connection.close().await;
            let error = render::host_error(&host.name, "probe", &e.to_string());
            (unreachable(host, error), None)
        }
    }
}

/// What the host behind `connection` runs and boots now: the one reading
/// every step that compares it uses, bounded by `timeout`; its error names
/// the host and `step`.
pub(crate) async fn systems(
    connection: &Connection,
    step: &str,
    timeout: Duration,
) -> Result<HostSystems, String> {
    let out = connection
        .run(step, &remote::systems_argv(), timeout)
        .await
        .map_err(|e| e.to_string())?;
    remote::parse_systems(&out.stdout).map_err(|e| {
        format!(
            "{}: {step}: cannot tell what it runs: {e}",
            connection.host()
        )
    })
}

/// Slack on top of the SSH timeouts for a whole observation: a host that
/// hangs is given up on, never waited for.
const OBSERVE_SLACK: Duration = Duration::from_secs(10);

/// Probe `host` (read only: nothing is settled) and, with `health`, run each
/// of its health checks once. Never fails, and never takes longer than the
/// SSH timeouts plus the checks' own: a host that hangs is a result.
pub(crate) async fn observe(host: &Host, ssh: &SshOptions, health: bool) -> Observation {
    let checks_time: Duration = if health {
        host.health_checks.iter().map(|c| c.timeout).sum()
    } else {
        Duration::ZERO
    };
    let bound = ssh.connect_timeout + ssh.command_timeout + checks_time + OBSERVE_SLACK;
    let work = async {
        let (assessment, connection) = probe_host(host.clone(), ssh, Settle::No).await;
        let probe = match (assessment.probe, assessment.error) {
            (Some(probe), None) => Ok(probe),
            (_, error) => Err(error.unwrap_or_else(|| format!("{}: probe failed", host.name))),
        };
        let mut checked = None;
        if let Some(connection) = connection {
            if health && !host.health_checks.is_empty() {
                checked = Some(
                    match health::validate(&connection, &host.health_checks, Duration::ZERO).await {
                        Ok(_) => (true, Vec::new()),
                        Err((_, results)) => (
                            false,
                            results
                                .iter()
                                .filter(|r| !r.ok)
                                .map(|r| {
                                    format!(
                                        "{} ({})",
                                        r.check,
                                        r.output.lines().next().unwrap_or("")
                                    )
                                })
                                .collect(),
                        ),
                    },
                );
            }
            connection.close().await;
        }
        (probe, checked)
    };
    let (probe, health) = match tokio::time::timeout(bound, work).await {
        Ok(done) => done,
        Err(_) => (
            Err(render::host_error(
                &host.name,
                "probe",
                &format!("no answer within {}s", bound.as_secs()),
            )),
            None,
        ),
    };
    Observation {
        probe,
        health,
        at: now_ms(),
    }
}
