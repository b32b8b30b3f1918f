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
    let deadline = Instant::now() + switch.timeout;
    let first = start(connection, ssh, switch, None, deadline)
        .await
        .map_err(|e| match e {
            StartError::ProfileNotSet(message) | StartError::Failed(message) => message,
        })?;
    finish(connection, ssh, switch, deadline, first.status).await
}

/// Why the first call of an activation failed.
pub(crate) enum StartError {
    /// The system profile could not be set: nothing started, nothing
    /// changed (the call failed before our script ran, or `nix-env` did).
    ProfileNotSet(String),
    /// The profile (when asked) was set, but the activator did not start.
    Failed(String),
}

/// How long one remote call may wait on the host: well inside the command
/// timeout, so a wait that ends on time is never taken for a host that
/// stopped answering.
fn chunk(ssh: &SshOptions, deadline: Instant) -> u64 {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .as_secs()
        .max(1);
    left.min((ssh.command_timeout.as_secs() / 2).max(1))
}

/// The first call of `switch`: set the system profile to `profile` (when
/// given), start the activator and wait for it, in one round trip; most
/// activations end within that first wait, and the answer then says what
/// the host runs and boots. A dropped connection or a host that stopped
/// answering leaves it unknown whether anything started (no status): the
/// waits of [`finish`] find out.
pub(crate) async fn start(
    connection: &Connection,
    ssh: &SshOptions,
    switch: &Switch<'_>,
    profile: Option<&str>,
    deadline: Instant,
) -> Result<remote::ActivationAnswer, StartError> {
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
    let host = &switch.host.name;
    let secs = chunk(ssh, deadline);
    let argv = remote::activate_argv(profile, launch, switch.token, secs, switch.fence.fence());
    let timeout = ssh.command_timeout + Duration::from_secs(secs);
    match connection.run_privileged(switch.step, &argv, timeout).await {
        Ok(out) => remote::parse_activation_answer(&out.stdout)
            .map_err(|e| StartError::Failed(format!("{host}: {}: {e}", switch.step))),
        // Refused by the host's fence: lost to another coordinator, no
        // wait, no retry (see `HostFence::refused`); nothing was changed.
        Err(e) if switch.fence.refused(host, &e) => Err(StartError::ProfileNotSet(e.to_string())),
        Err(e) if e.is_connection() || matches!(e, ssh::SshError::Timeout { .. }) => {
            Ok(remote::ActivationAnswer {
                // Unknown: may have been set.
                profile: profile.map(|_| (None, 0)),
                ..Default::default()
            })
        }
        // Our script says the activator did not start (after the profile
        // was set, when asked).
        Err(e @ ssh::SshError::Exit { .. }) if matches!(&e, ssh::SshError::Exit { code, .. } if code == remote::STARTER_FAILED) => {
            Err(StartError::Failed(e.to_string()))
        }
        // `nix-env` failed, or the call failed before our script ran
        // (sudo): nothing changed.
        Err(e) if profile.is_some() => Err(StartError::ProfileNotSet(e.to_string())),
        Err(e) => Err(StartError::Failed(e.to_string())),
    }
}

/// Wait until `switch` (started by [`start`], which answered `status`)
/// ends, reconnecting when the host stops answering for a while.
pub(crate) async fn finish(
    connection: &mut Connection,
    ssh: &SshOptions,
    switch: &Switch<'_>,
    deadline: Instant,
    mut status: Option<i32>,
) -> Result<(), String> {
    let host = switch.host;
    let wait_timeout = |secs: u64| ssh.command_timeout + Duration::from_secs(secs);
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
        let secs = chunk(ssh, deadline);
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
