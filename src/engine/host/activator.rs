//! Running `switch-to-configuration` on a host detached from our SSH
//! session — the activator (see `nix_deploy_core::remote`) — and waiting
//! for it to end. Activations and every switch back go through here, so a
//! dropped connection or a killed coordinator never cuts one short.

use std::time::{Duration, Instant};

use nix_deploy_core::fleet::Host;
use nix_deploy_core::remote::{self, Activation, Before};

use super::fence::HostFence;
use crate::transport::ssh::{self, Connection, SshOptions};

/// One switch to run.
pub(crate) struct Switch<'a> {
    pub host: &'a Host,
    /// The step it belongs to, for messages.
    pub step: &'static str,
    pub what: What<'a>,
    pub token: &'a str,
    pub systemd: bool,
    /// How long the switch may take.
    pub timeout: Duration,
    /// The deployment's fence: a host that has seen a newer holder refuses
    /// to start it.
    pub fence: &'a HostFence,
}

/// What a switch does.
pub(crate) enum What<'a> {
    /// `switch-to-configuration ACTION` of `system` (a toplevel, or a
    /// profile generation's link). With `watchdog`, the host goes back to
    /// what it ran before unless the activation is decided within the
    /// window.
    Activate {
        system: &'a str,
        action: Activation,
        watchdog: Option<(&'a Before, Duration)>,
    },
    /// The way back: restore what the host ran and booted before an
    /// activation of kind `undone` ([`remote::restorer_argv`]).
    Restore {
        undone: Activation,
        before: &'a Before,
    },
}

impl What<'_> {
    /// What it is, in the words of an error.
    fn describe(&self) -> String {
        match self {
            What::Activate { system, action, .. } => {
                format!("`{system}/bin/switch-to-configuration {}`", action.as_str())
            }
            What::Restore { undone, before } => format!(
                "the switch back to {} (undoing `{}`)",
                before.running.as_deref().unwrap_or("the boot generation"),
                undone.as_str()
            ),
        }
    }
}

/// Start `switch` detached and wait until it ends, reconnecting when the
/// host stops answering for a while (the activator goes on without us).
/// `connection` is replaced by a fresh one when the old one died.
pub(crate) async fn run(
    connection: &mut Connection,
    ssh: &SshOptions,
    switch: &Switch<'_>,
) -> Result<(), String> {
    let launch = match &switch.what {
        What::Activate {
            system,
            action,
            watchdog,
        } => {
            let nothing = Before::default();
            let (before, window) = match watchdog {
                Some((before, window)) => (*before, window.as_secs().max(1)),
                None => (&nothing, 0),
            };
            remote::activator_argv(
                system,
                *action,
                before,
                window,
                switch.token,
                switch.systemd,
            )
        }
        What::Restore { undone, before } => {
            remote::restorer_argv(*undone, before, switch.token, switch.systemd)
        }
    };
    let host = switch.host;
    let deadline = Instant::now() + switch.timeout;
    // How long one remote call may wait on the host: well inside the
    // command timeout, so a wait that ends on time is never taken for a
    // host that stopped answering.
    let chunk = |now: Instant| {
        let left = deadline.saturating_duration_since(now).as_secs().max(1);
        left.min((ssh.command_timeout.as_secs() / 2).max(1))
    };
    let wait_timeout = |secs: u64| ssh.command_timeout + Duration::from_secs(secs);
    // Start it and wait for it in one round trip; most activations end
    // within that first wait.
    let secs = chunk(Instant::now());
    let argv =
        remote::activator_start_and_wait_argv(launch, switch.token, secs, switch.fence.fence());
    let started = connection
        .run_privileged(switch.step, &argv, wait_timeout(secs))
        .await;
    let mut status = match started {
        Ok(out) => remote::parse_activation_status(&out.stdout)
            .map_err(|e| format!("{}: {}: {e}", host.name, switch.step))?,
        // Whether it started is unknown when the connection dropped or the
        // host stopped answering: the waits below find out.
        Err(e) if e.is_connection() || matches!(e, ssh::SshError::Timeout { .. }) => None,
        Err(e) => {
            // Refused by the host's fence: lost to another coordinator, no
            // wait, no retry (see `HostFence::refused`).
            switch.fence.refused(&switch.host.name, &e);
            return Err(e.to_string());
        }
    };
    let code = loop {
        if let Some(code) = status {
            break code;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: {}: {} did not finish within {}s",
                host.name,
                switch.step,
                switch.what.describe(),
                switch.timeout.as_secs()
            ));
        }
        let secs = chunk(Instant::now());
        match connection
            .run(
                switch.step,
                &remote::activation_wait_argv(switch.token, secs),
                wait_timeout(secs),
            )
            .await
        {
            Ok(out) if out.stdout.trim() == remote::ACTIVATION_ABSENT => {
                return Err(format!(
                    "{}: {}: the activator did not start on the host (the connection dropped while starting it)",
                    host.name, switch.step
                ));
            }
            Ok(out) => {
                status = remote::parse_activation_status(&out.stdout)
                    .map_err(|e| format!("{}: {}: {e}", host.name, switch.step))?;
            }
            // A host that does not answer for a while (frozen, a dropped
            // link) is not a failed activation: keep asking until the
            // deadline, over a new connection when the old one died.
            Err(e) if e.is_connection() => {
                match Connection::connect(&host.name, &host.target, ssh).await {
                    Ok(fresh) => {
                        let old = std::mem::replace(connection, fresh);
                        old.close().await;
                    }
                    // Not reachable yet: wait a moment before asking again.
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
            Err(ssh::SshError::Timeout { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
    };
    if code == 0 {
        return Ok(());
    }
    let log = connection
        .run(
            switch.step,
            &remote::activation_log_argv(switch.token),
            ssh.command_timeout,
        )
        .await
        .map(|o| ssh::tail(&o.stdout))
        .unwrap_or_default();
    Err(format!(
        "{}: {}: {} failed (exit code {code}){}",
        host.name,
        switch.step,
        switch.what.describe(),
        crate::process::format_tail(&log)
    ))
}

/// A new token naming one run of the activator.
pub(crate) fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
