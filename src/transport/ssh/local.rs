//! The host that is this machine (`apply-local`): a [`Connection`] without
//! a session, whose commands run here as local processes (through
//! [`crate::process`]) with the same argument vectors, privileged steps
//! through the host's escalation command unless we are root. Nothing is
//! copied to it (its store is ours), and it has no ssh identity to check:
//! there is no connection that could reach another machine.

use std::time::Duration;

use nix_deploy_core::fleet::Target;

use super::{Connection, Ran};

/// The most a command run here may print on each stream, as a remote
/// command's output is bounded by what we read of it: an activation's
/// output is a few KiB.
const MAX_OUTPUT_BYTES: usize = 64 * 1024 * 1024;

impl Connection {
    /// The host that is this machine: its commands run as local processes.
    pub(super) fn here(host: &str, target: &Target) -> Self {
        Connection {
            host: host.to_string(),
            target: target.clone(),
            session: None,
            kept: false,
        }
    }

    /// Whether the host is this machine (`apply-local`): nothing to copy.
    pub fn is_local(&self) -> bool {
        self.session.is_none()
    }

    /// Whether privileged steps go through the escalation command: over
    /// SSH, unless we log in as root; here, unless we are root.
    pub(super) fn escalates(&self) -> bool {
        match self.session {
            Some(_) => self.target.needs_sudo(),
            None => crate::paths::current_uid() != 0,
        }
    }

    /// `full` run here, with `input` on its stdin.
    pub(super) async fn run_here(&self, full: &[String], input: &[u8], timeout: Duration) -> Ran {
        let cmd = crate::process::Cmd::new(full[0].clone()).args(full[1..].iter().cloned());
        match crate::process::run_output(&cmd, input, timeout, MAX_OUTPUT_BYTES).await {
            Ok(output) => Ran::Output(output),
            Err(crate::process::ExecError::Timeout { .. }) => Ran::TimedOut,
            Err(e) => Ran::Local(e),
        }
    }
}
