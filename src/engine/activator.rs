//! Running `switch-to-configuration` on a host detached from our SSH
//! session — the activator (see `nix_deploy_core::remote`) — and waiting
//! for it to end. Activations and every switch back go through here, so a
//! dropped connection or a killed coordinator never cuts one short.

use std::time::{Duration, Instant};

use nix_deploy_core::fleet::Host;
use nix_deploy_core::remote::{self, Activation};

use crate::transport::ssh::{self, Connection, SshOptions};

/// One switch to run.
pub(super) struct Switch<'a> {
    pub host: &'a Host,
    /// The step it belongs to, for messages.
    pub step: &'static str,
    /// A toplevel, or a profile generation's link.
    pub system: &'a str,
    pub action: Activation,
    /// The watchdog: the generation to go back to and how long to wait for
    /// a decision. `None`: no watchdog.
    pub watchdog: Option<(Option<u32>, Duration)>,
    pub token: &'a str,
    pub systemd: bool,
    /// How long `switch-to-configuration` may take.
    pub timeout: Duration,
}

/// Start `switch` detached and wait until it ends, reconnecting when the
/// host stops answering for a while (the activator goes on without us).
/// `connection` is replaced by a fresh one when the old one died.
pub(super) async fn run(
    connection: &mut Connection,
    ssh: &SshOptions,
    switch: &Switch<'_>,
) -> Result<(), String> {
    let (old, window) = match switch.watchdog {
        Some((old, window)) => (old, window.as_secs().max(1)),
        None => (None, 0),
    };
    let argv = remote::activator_argv(
        switch.system,
        switch.action,
        old,
        window,
        switch.token,
        switch.systemd,
    );
    connection
        .run_privileged(switch.step, &argv, ssh.command_timeout)
        .await
        .map_err(|e| e.to_string())?;
    let host = switch.host;
    let deadline = Instant::now() + switch.timeout;
    let mut poll = Duration::from_millis(100);
    let code = loop {
        match connection
            .run(
                switch.step,
                &remote::activation_status_argv(switch.token),
                ssh.command_timeout,
            )
            .await
        {
            Ok(out) => {
                let text = out.stdout.trim();
                break text.parse::<i32>().map_err(|_| {
                    format!("{}: {}: unexpected status `{text}`", host.name, switch.step)
                })?;
            }
            Err(ssh::SshError::Exit { .. }) => {} // not finished yet
            // A host that does not answer for a while (frozen, a dropped
            // link) is not a failed activation: keep asking until the deadline.
            Err(e) if e.is_connection() => {
                if let Ok(fresh) = Connection::connect(&host.name, &host.target, ssh).await {
                    let old = std::mem::replace(connection, fresh);
                    old.close().await;
                }
            }
            Err(ssh::SshError::Timeout { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: {}: switch-to-configuration {} did not finish within {}s",
                host.name,
                switch.step,
                switch.action.as_str(),
                switch.timeout.as_secs()
            ));
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(Duration::from_millis(500));
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
        "{}: {}: `{}/bin/switch-to-configuration {}` failed (exit code {code}){}",
        host.name,
        switch.step,
        switch.system,
        switch.action.as_str(),
        crate::process::format_tail(&log)
    ))
}

/// A new token naming one run of the activator.
pub(super) fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
