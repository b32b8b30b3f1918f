//! What a host runs, read over SSH: [`systems`], the one reading of what a
//! host runs and boots that every step comparing it uses; the probe (the
//! same, and free space, systemd, the boot id and booted kernel, and
//! activations a stopped coordinator left undecided, in one round trip);
//! and the settling of those leftovers before a command that changes the
//! host goes on.

use std::time::Duration;

use nix_deploy_core::events::{HostState, SystemRef};
use nix_deploy_core::fleet::Host;
use nix_deploy_core::plan;
use nix_deploy_core::remote::{self, Before, HostSystems, ProbeResult};
use nix_deploy_core::render;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Commands that touch hosts settle undecided activations first, so no
    /// old watchdog can switch a host back after them.
    Yes {
        /// How long an abandoned activation may still take to end.
        activation_timeout: Duration,
    },
    /// Read-only commands report them.
    No,
}

/// Connect and probe one host. Never fails: an unreachable host is a result.
/// With [`Settle::Yes`], activations a dead coordinator left undecided are
/// settled first (switched back, as their watchdogs would), then the host
/// is probed again.
pub(crate) async fn probe_host(
    host: Host,
    options: &SshOptions,
    settle: Settle,
) -> (Assessment, Option<Connection>) {
    let (assessment, connection) = probe_once(host, options).await;
    let Settle::Yes { activation_timeout } = settle else {
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
            &remote::settle_argv(activation_timeout.as_secs().max(1)),
            activation_timeout + Duration::from_secs(120),
        )
        .await;
    let lines: Vec<String> = match settled {
        Ok(out) => out.stdout.lines().map(str::to_string).collect(),
        Err(e) => vec![format!("could not settle: {e}")],
    };
    connection.close().await;
    // Probe again: what the host runs now is what counts.
    let (mut again, connection) = probe_once(assessment.host, options).await;
    again.settled = lines;
    (again, connection)
}

async fn probe_once(host: Host, options: &SshOptions) -> (Assessment, Option<Connection>) {
    let unreachable = |host: Host, error: String| Assessment {
        host,
        state: HostState::Unreachable,
        current: SystemRef::default(),
        before: Before::default(),
        probe: None,
        error: Some(error),
        settled: Vec::new(),
    };
    let connection = match Connection::connect(&host.name, &host.target, options).await {
        Ok(c) => c,
        Err(e) => return (unreachable(host, e.to_string()), None),
    };
    let output = match connection
        .run("probe", &remote::probe_argv(), options.command_timeout)
        .await
    {
        Ok(o) => o,
        Err(e) => {
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
