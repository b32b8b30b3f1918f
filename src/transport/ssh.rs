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

use std::path::{Path, PathBuf};
use std::time::Duration;

use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::process::format_tail;
use nix_deploy_core::exec::Tail;
use nix_deploy_core::fleet::Target;
use nix_deploy_core::shell::quote;

/// Options shared by every connection of a run.
#[derive(Clone, Debug)]
pub struct SshOptions {
    /// `--ssh-config`: replaces the user's ssh config for our sessions and `nix copy`.
    pub config_file: Option<PathBuf>,
    /// `--ssh-identity` (the daemon's `ssh-identity-file`): a private key
    /// offered by our sessions and `nix copy` (ssh's `-i`).
    pub identity_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Default timeout of a remote command when the step sets none.
    pub command_timeout: Duration,
    /// Where master sockets live; short, because socket paths are limited to ~100 bytes.
    pub control_dir: PathBuf,
    /// Keep masters alive between runs; `None`: every run connects anew.
    pub keep: Option<KeepAlive>,
}

/// Masters kept between runs ([`Connection::connect`]).
#[derive(Clone, Debug)]
pub struct KeepAlive {
    /// Owner-only; holds one record per host and the masters' sockets.
    pub dir: PathBuf,
    /// A kept master exits after this long without a session.
    pub idle: Duration,
}

/// The longest control directory whose sockets fit the kernel's 107
/// bytes: ssh binds `DIR/.ssh-connectionXXXXXX/master` first under a name
/// 17 bytes longer (`master.` + 16 random characters), then renames it.
const MAX_KEEP_DIR: usize = 107 - "/.ssh-connectionXXXXXX/master.XXXXXXXXXXXXXXXX".len();

impl KeepAlive {
    /// Keep masters in `dir` (created owner-only) for `idle`; `None` when
    /// `idle` is zero. A directory whose path is too long for a socket is
    /// an error (the caller connects anew each run, and says why).
    pub fn new(dir: PathBuf, idle: Duration) -> std::io::Result<Option<Self>> {
        if idle.is_zero() {
            return Ok(None);
        }
        if dir.as_os_str().len() > MAX_KEEP_DIR {
            return Err(std::io::Error::other(format!(
                "{} is longer than the {MAX_KEEP_DIR} bytes an ssh control socket's directory may have",
                dir.display()
            )));
        }
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        // An existing directory is made owner-only too: whoever can reach a
        // master's socket can run commands as us on the host.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let keep = KeepAlive { dir, idle };
        keep.sweep();
        Ok(Some(keep))
    }

    /// The record of the master for `target` as `options` reach it.
    fn record(&self, target: &Target, options: &SshOptions) -> PathBuf {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for part in [
            target.user.as_str(),
            target.destination.as_str(),
            &target.port.map(|p| p.to_string()).unwrap_or_default(),
            &options
                .config_file
                .as_ref()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default(),
            &options
                .identity_file
                .as_ref()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let digest = hash.finalize();
        let name: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.master"))
    }

    /// A live master recorded at `record`, or `None` (and the stale record
    /// and its directory removed).
    async fn resume(&self, record: &Path) -> Option<Session> {
        let text = std::fs::read_to_string(record).ok()?;
        let ctl = PathBuf::from(text.lines().next()?.trim());
        // Only sockets in our own directory: the record could be stale or
        // tampered with, and we must not talk to anyone else's master.
        let inside = ctl.parent().and_then(Path::parent) == Some(self.dir.as_path());
        if inside {
            let session = Session::resume_mux(ctl.clone().into_boxed_path(), None);
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), session.check()).await
            {
                return Some(session);
            }
        }
        let _ = std::fs::remove_file(record);
        if inside && let Some(dir) = ctl.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        None
    }

    /// Remember `session`'s master for the next run.
    fn remember(&self, record: &Path, session: &Session) {
        let tmp = record.with_extension("tmp");
        let text = format!("{}\n", session.control_socket().display());
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, record);
        }
    }

    /// Remove what masters that exited (idle, or their host went away)
    /// left behind: a master's directory without its socket, older than a
    /// connection attempt can take, and records pointing nowhere.
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".ssh-connection") {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(120));
                if old && !path.join("master").exists() {
                    let _ = std::fs::remove_dir_all(&path);
                }
            } else if name.ends_with(".master") {
                let socket = std::fs::read_to_string(&path)
                    .ok()
                    .map(|t| PathBuf::from(t.trim()));
                if !socket.is_some_and(|s| s.exists()) {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

impl SshOptions {
    pub fn new(config_file: Option<PathBuf>, control_dir: PathBuf) -> Self {
        SshOptions {
            config_file,
            identity_file: None,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(60),
            control_dir,
            keep: None,
        }
    }
}

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
    #[error("invalid --ssh-config or --ssh-identity path {0}: NIX_SSHOPTS cannot carry whitespace")]
    ConfigPath(PathBuf),
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

/// How a streamed command ended ([`Connection::run_streaming`]): a
/// non-zero exit is a result here, not an error.
#[derive(Clone, Debug, Default)]
pub struct Streamed {
    /// `None` when it was killed by a signal or timed out.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub stdout: Tail,
    pub stderr: Tail,
}

/// A live master connection to one host.
pub struct Connection {
    host: String,
    target: Target,
    session: Session,
    /// The master is kept between runs: closing leaves it running.
    kept: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("host", &self.host)
            .finish()
    }
}

fn builder(target: &Target, options: &SshOptions, keep: Option<&KeepAlive>) -> SessionBuilder {
    let mut b = SessionBuilder::default();
    // accept-new: first contact records the key, a changed key is refused.
    b.known_hosts_check(KnownHosts::Add)
        .connect_timeout(options.connect_timeout)
        .server_alive_interval(Duration::from_secs(5))
        .user(target.user.clone());
    match keep {
        Some(keep) => {
            let idle = std::num::NonZeroUsize::new(keep.idle.as_secs().max(1) as usize)
                .expect("at least one second");
            b.control_directory(&keep.dir)
                .control_persist(ControlPersist::IdleFor(idle));
        }
        None => {
            b.control_directory(&options.control_dir);
        }
    }
    if let Some(port) = target.port {
        b.port(port);
    }
    if let Some(config) = &options.config_file {
        b.config_file(config);
    }
    if let Some(identity) = &options.identity_file {
        b.keyfile(identity);
    }
    b
}

/// `NIX_SSHOPTS` for `nix copy`: the same ssh settings as our own sessions.
///
/// Nix 2.8 splits `NIX_SSHOPTS` on whitespace, so a config path containing
/// whitespace is refused rather than silently broken.
///
/// With `control_socket`, `nix copy` reuses our master connection to the host
/// (no second SSH handshake); if that master is gone, ssh connects normally.
pub fn nix_ssh_opts(
    target: &Target,
    options: &SshOptions,
    control_socket: Option<&Path>,
) -> Result<String, SshError> {
    let mut opts = vec![
        "-o".to_string(),
        "BatchMode=yes".to_string(),
        "-o".to_string(),
        format!(
            "ConnectTimeout={}",
            options.connect_timeout.as_secs().max(1)
        ),
        "-o".to_string(),
        "StrictHostKeyChecking=accept-new".to_string(),
    ];
    if let Some(config) = &options.config_file {
        let text = config.to_string_lossy();
        if text.chars().any(char::is_whitespace) {
            return Err(SshError::ConfigPath(config.clone()));
        }
        opts.insert(0, text.into_owned());
        opts.insert(0, "-F".to_string());
    }
    if let Some(port) = target.port {
        opts.push("-p".to_string());
        opts.push(port.to_string());
    }
    if let Some(identity) = &options.identity_file {
        let text = identity.to_string_lossy();
        if text.chars().any(char::is_whitespace) {
            return Err(SshError::ConfigPath(identity.clone()));
        }
        opts.extend(["-i".to_string(), text.into_owned()]);
    }
    if let Some(socket) = control_socket {
        let text = socket.to_string_lossy();
        if !text.chars().any(char::is_whitespace) {
            opts.extend([
                "-o".to_string(),
                format!("ControlPath={text}"),
                "-o".to_string(),
                "ControlMaster=no".to_string(),
            ]);
        }
    }
    Ok(opts.join(" "))
}

impl Connection {
    /// A master connection to `host`: the one kept from an earlier run when
    /// it is still alive, else a new one (kept for later runs with
    /// [`SshOptions::keep`]).
    #[tracing::instrument(skip(target, options), fields(destination = %target.destination))]
    pub async fn connect(
        host: &str,
        target: &Target,
        options: &SshOptions,
    ) -> Result<Self, SshError> {
        let Some(keep) = &options.keep else {
            return Self::open(host, target, options, None).await;
        };
        let record = keep.record(target, options);
        if let Some(session) = keep.resume(&record).await {
            tracing::debug!(host, "reusing a kept ssh master");
            return Ok(Connection {
                host: host.to_string(),
                target: target.clone(),
                session,
                kept: true,
            });
        }
        let connection = Self::open(host, target, options, Some(keep)).await?;
        keep.remember(&record, &connection.session);
        Ok(connection)
    }

    /// A new master connection, never a kept one, closed with
    /// [`Connection::close`]: what proves a host lets us in right now.
    pub async fn connect_new(
        host: &str,
        target: &Target,
        options: &SshOptions,
    ) -> Result<Self, SshError> {
        Self::open(host, target, options, None).await
    }

    async fn open(
        host: &str,
        target: &Target,
        options: &SshOptions,
        keep: Option<&KeepAlive>,
    ) -> Result<Self, SshError> {
        let connect_error = |message: String| SshError::Connect {
            host: host.to_string(),
            destination: target.destination.clone(),
            message,
        };
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
            builder(target, options, keep).connect_mux(&target.destination),
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
        Ok(Connection {
            host: host.to_string(),
            target: target.clone(),
            session,
            kept: keep.is_some(),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn control_socket(&self) -> &Path {
        self.session.control_socket()
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

    /// Run `argv` as root: directly when we log in as root, else through `sudo -n`.
    pub async fn run_privileged(
        &self,
        step: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<RemoteOutput, SshError> {
        self.run_inner(step, argv, timeout, self.target.needs_sudo())
            .await
    }

    /// Run `argv` as root (through `sudo -n` when we are not root) with
    /// `input` on its stdin: the way secrets reach a host, never on a
    /// command line.
    pub async fn run_with_stdin(
        &self,
        step: &str,
        argv: &[String],
        input: &[u8],
        timeout: Duration,
    ) -> Result<RemoteOutput, SshError> {
        let full = self.full_argv(argv, self.target.needs_sudo());
        let command_text = nix_deploy_core::shell::join(&full);
        let work = async {
            let mut command = self.remote_command(&full);
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
        let output = tokio::time::timeout(timeout, work).await;
        self.conclude(step, command_text, timeout, output).await
    }

    /// Run `argv` (unprivileged), handing every output line to `on_line` as
    /// it arrives and keeping the last lines of each stream. The command's
    /// exit code is the result; only the connection failing is an error. On
    /// `timeout` the command is let go (it may still run on the host).
    pub async fn run_streaming(
        &self,
        step: &str,
        argv: &[String],
        timeout: Duration,
        mut on_line: impl FnMut(crate::process::Stream, &str) + Send,
    ) -> Result<Streamed, SshError> {
        use crate::process::Stream;
        let full = self.full_argv(argv, false);
        let command_text = nix_deploy_core::shell::join(&full);
        let spawn_error = |e: openssh::Error| SshError::Spawn {
            host: self.host.clone(),
            step: step.to_string(),
            command: command_text.clone(),
            message: describe_openssh_error(&e),
        };
        let mut command = self.remote_command(&full);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match tokio::time::timeout(timeout, command.spawn()).await {
            Ok(Ok(child)) => child,
            Ok(Err(e)) => {
                if self.session.check().await.is_err() {
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
        let stdout = child.stdout().take();
        let stderr = child.stderr().take();
        let drain = async {
            let mut out = stdout.map(BufReader::new);
            let mut err = stderr.map(BufReader::new);
            let (mut out_line, mut err_line) = (Vec::new(), Vec::new());
            while out.is_some() || err.is_some() {
                tokio::select! {
                    read = async { out.as_mut().expect("guarded").read_until(b'\n', &mut out_line).await }, if out.is_some() => {
                        match read {
                            Ok(0) | Err(_) => out = None,
                            Ok(_) => {
                                let line = String::from_utf8_lossy(&out_line).into_owned();
                                on_line(Stream::Stdout, line.trim_end_matches(['\n', '\r']));
                                result.stdout.push(&line);
                                out_line.clear();
                            }
                        }
                    }
                    read = async { err.as_mut().expect("guarded").read_until(b'\n', &mut err_line).await }, if err.is_some() => {
                        match read {
                            Ok(0) | Err(_) => err = None,
                            Ok(_) => {
                                let line = String::from_utf8_lossy(&err_line).into_owned();
                                on_line(Stream::Stderr, line.trim_end_matches(['\n', '\r']));
                                result.stderr.push(&line);
                                err_line.clear();
                            }
                        }
                    }
                }
            }
        };
        if tokio::time::timeout(timeout, drain).await.is_err() {
            result.timed_out = true;
            let _ = child.disconnect().await;
            return Ok(result);
        }
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(status)) => {
                result.exit_code = status.code();
                if result.exit_code == Some(255) && self.session.check().await.is_err() {
                    return Err(self.lost(step, "ssh exited 255"));
                }
                Ok(result)
            }
            Ok(Err(e)) => {
                if matches!(
                    e,
                    openssh::Error::Disconnected | openssh::Error::RemoteProcessTerminated
                ) || self.session.check().await.is_err()
                {
                    return Err(self.lost(step, &describe_openssh_error(&e)));
                }
                Err(spawn_error(e))
            }
            Err(_) => {
                result.timed_out = true;
                Ok(result)
            }
        }
    }

    fn lost(&self, step: &str, message: &str) -> SshError {
        SshError::Connect {
            host: self.host.clone(),
            destination: self.target.destination.clone(),
            message: format!("connection lost during {step}: {message}"),
        }
    }

    fn full_argv(&self, argv: &[String], sudo: bool) -> Vec<String> {
        let mut full: Vec<String> = Vec::with_capacity(argv.len() + 3);
        if sudo {
            full.extend(["sudo", "-n", "--"].map(String::from));
        }
        full.extend(argv.iter().cloned());
        full
    }

    /// The remote command line: every word quoted with the core's one
    /// quoting helper, so the remote shell sees exactly `full` as argv.
    fn remote_command(&self, full: &[String]) -> openssh::OwningCommand<&Session> {
        let mut command = self.session.raw_command(quote(&full[0]));
        command.raw_args(full[1..].iter().map(|word| quote(word)));
        command
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
        let mut command = self.remote_command(&full);
        let output = tokio::time::timeout(timeout, command.output()).await;
        self.conclude(step, command_text, timeout, output).await
    }

    /// A finished (or timed out) command as our result: its output, or an
    /// error naming host and step.
    async fn conclude(
        &self,
        step: &str,
        command_text: String,
        timeout: Duration,
        output: Result<Result<std::process::Output, openssh::Error>, tokio::time::error::Elapsed>,
    ) -> Result<RemoteOutput, SshError> {
        let output = match output {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => {
                let message = describe_openssh_error(&e);
                // A dead master means the host went away, not that the command failed.
                if matches!(
                    e,
                    openssh::Error::Disconnected | openssh::Error::RemoteProcessTerminated
                ) || self.session.check().await.is_err()
                {
                    return Err(SshError::Connect {
                        host: self.host.clone(),
                        destination: self.target.destination.clone(),
                        message: format!("connection lost during {step}: {message}"),
                    });
                }
                return Err(SshError::Spawn {
                    host: self.host.clone(),
                    step: step.to_string(),
                    command: command_text,
                    message,
                });
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
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            let code = output
                .status
                .code()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "killed".to_string());
            // ssh exits 255 when the connection itself failed.
            if code == "255" && self.session.check().await.is_err() {
                return Err(SshError::Connect {
                    host: self.host.clone(),
                    destination: self.target.destination.clone(),
                    message: format!("connection lost during {step}: {}", stderr.trim()),
                });
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
        if self.kept {
            let _ = self.session.detach();
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session.close()).await;
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

    fn target(port: Option<u16>) -> Target {
        Target {
            destination: "web1".into(),
            user: "root".into(),
            port,
        }
    }

    #[test]
    fn nix_ssh_opts_carry_config_and_port() {
        let options = SshOptions::new(Some("/etc/fleet/ssh_config".into()), "/tmp/c".into());
        assert_eq!(
            nix_ssh_opts(&target(Some(2222)), &options, None).unwrap(),
            "-F /etc/fleet/ssh_config -o BatchMode=yes -o ConnectTimeout=10 \
             -o StrictHostKeyChecking=accept-new -p 2222"
        );
        let options = SshOptions::new(None, "/tmp/c".into());
        assert!(
            !nix_ssh_opts(&target(None), &options, None)
                .unwrap()
                .contains("-F")
        );
        let options = SshOptions::new(Some("/my configs/ssh".into()), "/tmp/c".into());
        assert!(nix_ssh_opts(&target(None), &options, None).is_err());
    }

    #[test]
    fn kept_masters_live_in_an_owner_only_directory_short_enough_for_sockets() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let minute = Duration::from_secs(60);
        assert!(
            KeepAlive::new(base.path().join("ssh"), Duration::ZERO)
                .unwrap()
                .is_none()
        );
        let keep = KeepAlive::new(base.path().join("ssh"), minute)
            .unwrap()
            .expect("kept");
        let mode = std::fs::metadata(&keep.dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let long = base.path().join("x".repeat(MAX_KEEP_DIR));
        let e = KeepAlive::new(long, minute).unwrap_err();
        assert!(e.to_string().contains("control socket"), "{e}");
        // The longest allowed directory still fits ssh's temporary name.
        assert!(MAX_KEEP_DIR + "/.ssh-connectionXXXXXX/master.XXXXXXXXXXXXXXXX".len() <= 107);
    }

    #[test]
    fn tail_keeps_last_lines() {
        let text: String = (0..50).map(|i| format!("l{i}\n")).collect();
        let t = tail(&text);
        assert_eq!(t.lines().count(), crate::process::TAIL_LINES);
        assert!(t.ends_with("l49"));
    }
}
