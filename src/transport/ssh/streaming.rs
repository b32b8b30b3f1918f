//! Commands whose output is streamed and bounded (`exec`): the command's
//! exit code is the result, its output is kept as bounded tails, and it is
//! stopped on timeout or cancel.

use std::time::Duration;

use openssh::Stdio;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::exec::Tail;

use super::{Connection, SshError, describe_openssh_error};

/// How a streamed command ended ([`Connection::run_streaming`]): a
/// non-zero exit is a result here, not an error.
#[derive(Clone, Debug, Default)]
pub struct Streamed {
    /// `None` when it was killed by a signal or timed out.
    pub exit_code: Option<i32>,
    /// It ran past its timeout and was stopped.
    pub timed_out: bool,
    /// It was stopped because the run was cancelled.
    pub cancelled: bool,
    pub stdout: Tail,
    pub stderr: Tail,
}

/// A remote command's stdout and stderr while we read them.
struct Streams {
    out: Option<openssh::ChildStdout>,
    err: Option<openssh::ChildStderr>,
}

impl Streams {
    /// Read both streams into `result`'s tails until both end. Chunks, not
    /// lines (a line may be endless); `read` loses nothing when the other
    /// branch wins the select, so this may be cancelled and called again.
    async fn drain(&mut self, result: &mut Streamed) {
        let (mut out_buf, mut err_buf) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
        while self.out.is_some() || self.err.is_some() {
            tokio::select! {
                read = async { self.out.as_mut().expect("guarded").read(&mut out_buf).await }, if self.out.is_some() => {
                    match read {
                        Ok(0) | Err(_) => self.out = None,
                        Ok(n) => result.stdout.feed(&out_buf[..n]),
                    }
                }
                read = async { self.err.as_mut().expect("guarded").read(&mut err_buf).await }, if self.err.is_some() => {
                    match read {
                        Ok(0) | Err(_) => self.err = None,
                        Ok(n) => result.stderr.feed(&err_buf[..n]),
                    }
                }
            }
        }
    }
}

impl Connection {
    /// Run `argv` (unprivileged), keeping the last lines of each stream
    /// ([`Tail`]: bounded however much the command prints, with or without
    /// newlines). The command's exit code is the result; only the
    /// connection failing is an error.
    ///
    /// The command runs under the core's stoppable wrapper
    /// ([`nix_deploy_core::exec::stoppable_argv`]): we hold its stdin open
    /// while it runs, and on `timeout` or `cancel` we close it, which stops
    /// the command's whole process group on the host (`TERM`, then `KILL`);
    /// what it printed until then is kept.
    pub async fn run_streaming(
        &self,
        step: &str,
        argv: &[String],
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Streamed, SshError> {
        let full = nix_deploy_core::exec::stoppable_argv(argv);
        let command_text = nix_deploy_core::shell::join(argv);
        let spawn_error = |e: openssh::Error| SshError::Spawn {
            host: self.host.clone(),
            step: step.to_string(),
            command: command_text.clone(),
            message: describe_openssh_error(&e),
        };
        let Some(session) = &self.session else {
            // `exec` reaches hosts over SSH only; `apply-local` runs no
            // streamed command.
            return Err(SshError::Spawn {
                host: self.host.clone(),
                step: step.to_string(),
                command: command_text,
                message: "this host is this machine: streamed commands run over SSH only".into(),
            });
        };
        let mut command = self.remote_command(session, step, &full)?;
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match tokio::time::timeout(timeout, command.spawn()).await {
            Ok(Ok(child)) => child,
            Ok(Err(e)) => {
                if !self.alive().await {
                    return Err(self.lost(step, &describe_openssh_error(&e)));
                }
                return Err(spawn_error(e));
            }
            Err(_) => {
                return Err(SshError::Timeout {
                    host: self.host.clone(),
                    step: step.to_string(),
                    command: command_text,
                    timeout,
                });
            }
        };
        let mut result = Streamed::default();
        // Held open while the command may run: closing it stops the command.
        let stdin = child.stdin().take();
        let mut streams = Streams {
            out: child.stdout().take(),
            err: child.stderr().take(),
        };
        let stop = tokio::select! {
            () = streams.drain(&mut result) => false,
            () = tokio::time::sleep(timeout) => {
                result.timed_out = true;
                true
            }
            () = cancel.cancelled() => {
                result.cancelled = true;
                true
            }
        };
        drop(stdin);
        if stop {
            // The wrapper stops the command within its grace; what it prints
            // meanwhile is kept. Past that, we let the session go.
            let grace = Duration::from_secs(nix_deploy_core::exec::STOP_GRACE_SECS + 5);
            if tokio::time::timeout(grace, streams.drain(&mut result))
                .await
                .is_err()
            {
                let _ = child.disconnect().await;
                return Ok(result);
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) => {
                result.exit_code = status.code();
                if result.exit_code == Some(255) && !self.alive().await {
                    return Err(self.lost(step, "ssh exited 255"));
                }
                Ok(result)
            }
            Ok(Err(e)) => {
                if stop {
                    // Stopped by a signal: openssh reports it as an error.
                    return Ok(result);
                }
                if matches!(
                    e,
                    openssh::Error::Disconnected | openssh::Error::RemoteProcessTerminated
                ) || !self.alive().await
                {
                    return Err(self.lost(step, &describe_openssh_error(&e)));
                }
                Err(spawn_error(e))
            }
            Err(_) => {
                result.timed_out |= !result.cancelled;
                Ok(result)
            }
        }
    }
}
