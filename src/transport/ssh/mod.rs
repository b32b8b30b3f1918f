//! SSH to hosts through the system `ssh` (the `openssh` crate): one multiplexed
//! master connection per host, reused for every step, so the user's
//! `~/.ssh/config`, agents and `ProxyJump` just work.
//!
//! With [`KeepAlive`], masters outlive the run that opened them: each host's
//! master is recorded in an owner-only directory of the state directory and
//! resumed by the next run (or the daemon's next deployment), so a repeated
//! `plan` or `deploy` pays no SSH handshake. A kept master exits by itself
//! after being idle for the keep-alive time (ssh's `ControlPersist`), and a
//! record whose master is gone is removed when found.
//!
//! Remote commands are argument vectors; each argument is quoted by the crate
//! before the remote shell sees it. Every command has a timeout, and every error
//! names the host and the step and carries the remote stderr.
//!
//! - `options`: [`SshOptions`], and the same settings for `nix copy`
//!   ([`nix_ssh_opts`]), a host's own ssh options included;
//! - `identity`: which machine a host is ([`Identities`]) and where its
//!   connections really go ([`Destination`]);
//! - `keep`: masters kept between runs; `streaming`: `exec`'s bounded,
//!   stoppable commands; `local`: the host that is this machine
//!   (`apply-local`), whose commands run here.

mod identity;
mod keep;
mod local;
mod options;
mod streaming;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use openssh::{Session, Stdio};

pub use identity::{Destination, Identities};
pub use keep::KeepAlive;
use options::builder;
pub use options::{SshOptions, nix_ssh_opts};
pub use streaming::Streamed;
use tokio::io::AsyncWriteExt;

use super::host_config::host_config;
use crate::process::format_tail;
use nix_deploy_core::fleet::Target;
use nix_deploy_core::shell::{NulByte, quote};

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{host}: cannot connect over SSH to {destination}: {message}")]
    Connect {
        host: String,
        destination: String,
        message: String,
    },
    #[error("{host}: {step}: could not run `{command}`: {message}")]
    Spawn {
        host: String,
        step: String,
        command: String,
        message: String,
    },
    #[error("{host}: {step}: `{command}` failed (exit code {code}){}", format_tail(.stderr))]
    Exit {
        host: String,
        step: String,
        command: String,
        code: String,
        stderr: String,
    },
    #[error("{host}: {step}: `{command}` timed out after {}s", .timeout.as_secs())]
    Timeout {
        host: String,
        step: String,
        command: String,
        timeout: Duration,
    },
    #[error(
        "{host}: the machine reached at {destination} is not the one first seen as {host} (its /etc/machine-id is {found}, {host}'s is {expected}): check where the ssh config sends {host}; if {host} was reinstalled, run `nix-deploy forget-identity {host}`"
    )]
    Identity {
        host: String,
        destination: String,
        expected: String,
        found: String,
    },
    #[error("invalid --ssh-config or --ssh-identity path {0}: NIX_SSHOPTS cannot carry whitespace")]
    ConfigPath(PathBuf),
    /// A host's own ssh options cannot be used (`deployment.sshOptions`).
    #[error("{host}: {message}")]
    Options { host: String, message: String },
}

impl SshError {
    /// Whether the failure was the connection rather than the command.
    pub fn is_connection(&self) -> bool {
        matches!(self, SshError::Connect { .. })
    }
}

/// What a remote command printed.
#[derive(Clone, Debug, Default)]
pub struct RemoteOutput {
    pub stdout: String,
    pub stderr: String,
}

/// A live master connection to one host, or to the host that is this
/// machine (`apply-local`): the same commands, run as local processes
/// ([`local`]).
pub struct Connection {
    host: String,
    target: Target,
    /// `None`: the host is this machine.
    session: Option<Session>,
    /// The master is kept between runs: closing leaves it running.
    kept: bool,
}

/// How a command ended, over SSH or here.
enum Ran {
    Output(std::process::Output),
    Ssh(openssh::Error),
    Local(crate::process::ExecError),
    TimedOut,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("host", &self.host)
            .finish()
    }
}

impl Connection {
    /// A master connection to `host`: the one kept from an earlier run when
    /// it is still alive, else a new one (kept for later runs with
    /// [`SshOptions::keep`]).
    #[tracing::instrument(skip(target, options), fields(destination = %target.describe()))]
    pub async fn connect(
        host: &str,
        target: &Target,
        options: &SshOptions,
    ) -> Result<Self, SshError> {
        // The host that is this machine: no ssh connection, so no ssh
        // identity to check (nothing could lead it to another machine).
        if options.local.as_deref() == Some(host) {
            return Ok(Self::here(host, target));
        }
        let Some(keep) = &options.keep else {
            return Ok(Self::open(host, target, options, None).await?.0);
        };
        // Where the ssh config sends this host now: a master kept for
        // another destination is never this host's.
        let destination = match Destination::resolve(target, options).await {
            Ok(destination) => destination,
            Err(e) => {
                tracing::warn!(host, "not reusing kept ssh masters: {e}");
                return Ok(Self::open(host, target, options, None).await?.0);
            }
        };
        let record = keep.record(&destination);
        if let Some(kept) = keep.resume(&record).await {
            tracing::debug!(host, "reusing a kept ssh master");
            let connection = Connection {
                host: host.to_string(),
                target: target.clone(),
                session: Some(kept.session),
                kept: true,
            };
            let identity = match kept.identity {
                Some(identity) => Some(identity),
                None => connection.identity(options).await,
            };
            if let Err(e) = connection
                .check_identity(options, identity.as_deref())
                .await
            {
                connection.close().await;
                return Err(e);
            }
            connection.remember(keep, &record, identity.as_deref());
            return Ok(connection);
        }
        let (connection, identity) = Self::open(host, target, options, Some(keep)).await?;
        connection.remember(keep, &record, identity.as_deref());
        Ok(connection)
    }

    /// A new master connection, never a kept one, closed with
    /// [`Connection::close`]: what proves a host lets us in right now.
    pub async fn connect_new(
        host: &str,
        target: &Target,
        options: &SshOptions,
    ) -> Result<Self, SshError> {
        if options.local.as_deref() == Some(host) {
            return Ok(Self::here(host, target));
        }
        Ok(Self::open(host, target, options, None).await?.0)
    }

    /// Record this connection's master for the next run.
    fn remember(&self, keep: &KeepAlive, record: &Path, identity: Option<&str>) {
        if let Some(session) = &self.session {
            keep.remember(record, session, identity);
        }
    }

    /// A new master, checked to reach the machine first seen as `host`;
    /// with the identity it has.
    async fn open(
        host: &str,
        target: &Target,
        options: &SshOptions,
        keep: Option<&KeepAlive>,
    ) -> Result<(Self, Option<String>), SshError> {
        let connect_error = |message: String| SshError::Connect {
            host: host.to_string(),
            destination: target.describe().to_string(),
            message,
        };
        let Some(destination) = target.destination.as_deref() else {
            return Err(connect_error(
                "deployment.targetHost is null: this host is not reached over SSH (only `nix-deploy apply-local` on it deploys it)".into(),
            ));
        };
        let config = host_config(target, options)?;
        std::fs::create_dir_all(&options.control_dir).map_err(|e| {
            connect_error(format!(
                "control directory {}: {e}",
                options.control_dir.display()
            ))
        })?;
        // ssh's own ConnectTimeout covers the TCP connect; this also covers a
        // server that accepts and then never answers.
        let deadline = options.connect_timeout + Duration::from_secs(5);
        let session = match tokio::time::timeout(
            deadline,
            builder(target, options, keep, config.as_deref()).connect_mux(destination),
        )
        .await
        {
            Ok(Ok(session)) => session,
            Ok(Err(e)) => return Err(connect_error(describe_openssh_error(&e))),
            Err(_) => {
                return Err(connect_error(format!(
                    "no answer within {}s",
                    deadline.as_secs()
                )));
            }
        };
        let connection = Connection {
            host: host.to_string(),
            target: target.clone(),
            session: Some(session),
            kept: keep.is_some(),
        };
        let identity = connection.identity(options).await;
        if let Err(e) = connection
            .check_identity(options, identity.as_deref())
            .await
        {
            // A master to a machine that is not this host is no use to it.
            if let Some(session) = connection.session {
                let _ = tokio::time::timeout(Duration::from_secs(5), session.close()).await;
            }
            return Err(e);
        }
        Ok((connection, identity))
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The master's socket, for `nix copy` to reuse (none for this machine).
    pub fn control_socket(&self) -> Option<&Path> {
        self.session.as_ref().map(|s| s.control_socket())
    }

    /// Whether the master still answers (this machine always does).
    async fn alive(&self) -> bool {
        match &self.session {
            Some(session) => session.check().await.is_ok(),
            None => true,
        }
    }

    /// Run `argv` on the host, unprivileged.
    pub async fn run(
        &self,
        step: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<RemoteOutput, SshError> {
        self.run_inner(step, argv, timeout, false).await
    }

    /// Run `argv` as root: directly when we log in as root, else through the
    /// host's privilege escalation command (`sudo -n --` by default).
    pub async fn run_privileged(
        &self,
        step: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<RemoteOutput, SshError> {
        self.run_inner(step, argv, timeout, self.escalates()).await
    }

    /// Run `argv` as root (through the escalation command when we are not root) with
    /// `input` on its stdin: the way secrets reach a host, never on a
    /// command line.
    pub async fn run_with_stdin(
        &self,
        step: &str,
        argv: &[String],
        input: &[u8],
        timeout: Duration,
    ) -> Result<RemoteOutput, SshError> {
        let full = self.full_argv(argv, self.escalates());
        let command_text = nix_deploy_core::shell::join(&full);
        let Some(session) = &self.session else {
            let ran = self.run_here(&full, input, timeout).await;
            return self.conclude(step, command_text, timeout, ran).await;
        };
        let mut command = self.remote_command(session, step, &full)?;
        let work = async {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = command.spawn().await?;
            if let Some(mut stdin) = child.stdin().take() {
                // A command that exits without reading everything is judged
                // by its exit code, not by the broken pipe.
                let _ = stdin.write_all(input).await;
                let _ = stdin.shutdown().await;
            }
            child.wait_with_output().await
        };
        let ran = match tokio::time::timeout(timeout, work).await {
            Ok(Ok(output)) => Ran::Output(output),
            Ok(Err(e)) => Ran::Ssh(e),
            Err(_) => Ran::TimedOut,
        };
        self.conclude(step, command_text, timeout, ran).await
    }

    fn lost(&self, step: &str, message: &str) -> SshError {
        SshError::Connect {
            host: self.host.clone(),
            destination: self.target.describe().to_string(),
            message: format!("connection lost during {step}: {message}"),
        }
    }

    fn full_argv(&self, argv: &[String], sudo: bool) -> Vec<String> {
        let mut full: Vec<String> = Vec::with_capacity(argv.len() + 3);
        if sudo {
            // `deployment.privilegeEscalationCommand` (default `sudo -n --`).
            full.extend(self.target.escalation.iter().cloned());
        }
        full.extend(argv.iter().cloned());
        full
    }

    /// The remote command line: every word quoted with the core's one
    /// quoting helper, so the remote shell sees exactly `full` as argv. A
    /// word no command line can carry (a NUL byte) is an error naming the
    /// host and the step.
    fn remote_command<'a>(
        &self,
        session: &'a Session,
        step: &str,
        full: &[String],
    ) -> Result<openssh::OwningCommand<&'a Session>, SshError> {
        let quoted: Vec<String> = full
            .iter()
            .map(|word| quote(word).map(Cow::into_owned))
            .collect::<Result<_, NulByte>>()
            .map_err(|e| SshError::Spawn {
                host: self.host.clone(),
                step: step.to_string(),
                command: nix_deploy_core::shell::join(full),
                message: e.to_string(),
            })?;
        let mut command = session.raw_command(&quoted[0]);
        command.raw_args(&quoted[1..]);
        Ok(command)
    }

    async fn run_inner(
        &self,
        step: &str,
        argv: &[String],
        timeout: Duration,
        sudo: bool,
    ) -> Result<RemoteOutput, SshError> {
        let full = self.full_argv(argv, sudo);
        let command_text = nix_deploy_core::shell::join(&full);
        let ran = match &self.session {
            Some(session) => {
                let mut command = self.remote_command(session, step, &full)?;
                match tokio::time::timeout(timeout, command.output()).await {
                    Ok(Ok(output)) => Ran::Output(output),
                    Ok(Err(e)) => Ran::Ssh(e),
                    Err(_) => Ran::TimedOut,
                }
            }
            None => self.run_here(&full, &[], timeout).await,
        };
        self.conclude(step, command_text, timeout, ran).await
    }

    /// A finished (or timed out) command as our result: its output, or an
    /// error naming host and step.
    async fn conclude(
        &self,
        step: &str,
        command_text: String,
        timeout: Duration,
        ran: Ran,
    ) -> Result<RemoteOutput, SshError> {
        let output = match ran {
            Ran::Output(output) => output,
            Ran::Ssh(e) => {
                let message = describe_openssh_error(&e);
                // A dead master means the host went away, not that the command failed.
                if matches!(
                    e,
                    openssh::Error::Disconnected | openssh::Error::RemoteProcessTerminated
                ) || !self.alive().await
                {
                    return Err(self.lost(step, &message));
                }
                return Err(SshError::Spawn {
                    host: self.host.clone(),
                    step: step.to_string(),
                    command: command_text,
                    message,
                });
            }
            Ran::Local(e) => {
                return Err(SshError::Spawn {
                    host: self.host.clone(),
                    step: step.to_string(),
                    command: command_text,
                    message: e.to_string(),
                });
            }
            Ran::TimedOut => {
                return Err(SshError::Timeout {
                    host: self.host.clone(),
                    step: step.to_string(),
                    command: command_text,
                    timeout,
                });
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            let code = output
                .status
                .code()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "killed".to_string());
            // ssh exits 255 when the connection itself failed.
            if code == "255" && self.session.is_some() && !self.alive().await {
                return Err(self.lost(step, stderr.trim()));
            }
            return Err(SshError::Exit {
                host: self.host.clone(),
                step: step.to_string(),
                command: command_text,
                code,
                stderr: tail(&stderr),
            });
        }
        Ok(RemoteOutput { stdout, stderr })
    }

    /// Close the master connection; a kept master is left running for the
    /// next run (it exits by itself when idle).
    pub async fn close(self) {
        let Some(session) = self.session else {
            return;
        };
        if self.kept {
            let _ = session.detach();
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), session.close()).await;
    }
}

/// The last lines of some output.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let start = lines.len().saturating_sub(crate::process::TAIL_LINES);
    lines[start..].join("\n")
}

fn describe_openssh_error(e: &openssh::Error) -> String {
    // The master's log says why ssh failed (auth, refused, unknown host...).
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let text = inner.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = inner.source();
    }
    message.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        let text: String = (0..50).map(|i| format!("l{i}\n")).collect();
        let t = tail(&text);
        assert_eq!(t.lines().count(), crate::process::TAIL_LINES);
        assert!(t.ends_with("l49"));
    }
}
