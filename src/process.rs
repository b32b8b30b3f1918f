//! The one place that spawns local processes (`nix eval`, `nix build`, `nix copy`).
//!
//! Every child gets a null stdin, a timeout and `kill_on_drop`, and its stdout and
//! stderr are drained *at the same time* while we wait for it: a noisy child can
//! never deadlock on a full pipe. Each stderr line is handed to a callback as it
//! arrives so the engine can turn it into progress events, and the tail is kept
//! for the error report.
//!
//! Remote commands do not come through here: they go over the SSH master
//! connection in [`crate::transport::ssh`].

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

pub use nix_deploy_core::command::Cmd;

/// How many trailing output lines an error keeps.
pub const TAIL_LINES: usize = 20;

/// Which pipe a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What a successful run produced.
#[derive(Clone, Debug, Default)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    /// The child's peak resident memory (`VmHWM`), sampled while it ran, with
    /// [`run_measured`].
    pub peak_rss_kib: Option<u64>,
}

/// How often [`run_measured`] samples the child's peak memory.
const MEMORY_SAMPLE_PERIOD: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("could not start `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}){}", format_tail(.stderr_tail))]
    Exit {
        command: String,
        status: String,
        stderr_tail: String,
    },
    #[error("`{command}` timed out after {}s{}", .timeout.as_secs(), format_tail(.stderr_tail))]
    Timeout {
        command: String,
        timeout: Duration,
        stderr_tail: String,
    },
    #[error("reading the output of `{command}`: {source}")]
    Io {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

impl ExecError {
    /// The last lines of stderr, if the process got that far.
    pub fn stderr_tail(&self) -> &str {
        match self {
            ExecError::Exit { stderr_tail, .. } | ExecError::Timeout { stderr_tail, .. } => {
                stderr_tail
            }
            _ => "",
        }
    }
}

pub(crate) fn format_tail(tail: &str) -> String {
    let tail = tail.trim_end();
    if tail.is_empty() {
        String::new()
    } else {
        format!(":\n{tail}")
    }
}

/// Run `cmd` to completion, calling `on_line` for every output line as it arrives.
///
/// Stdout is collected whole (it is the data we parse); stderr is collected whole
/// too, and its tail goes into the error on failure.
pub async fn run(
    cmd: &Cmd,
    timeout: Duration,
    on_line: impl FnMut(Stream, &str) + Send,
) -> Result<Output, ExecError> {
    run_inner(cmd, timeout, on_line, false).await
}

/// [`run`], also sampling the child's peak resident memory (its `VmHWM`, a
/// high-water mark, read every 50 ms and once more when its output ends) into
/// [`Output::peak_rss_kib`].
pub async fn run_measured(
    cmd: &Cmd,
    timeout: Duration,
    on_line: impl FnMut(Stream, &str) + Send,
) -> Result<Output, ExecError> {
    run_inner(cmd, timeout, on_line, true).await
}

/// The peak resident memory of a live process, from `/proc/PID/status`.
fn peak_rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn run_inner(
    cmd: &Cmd,
    timeout: Duration,
    mut on_line: impl FnMut(Stream, &str) + Send,
    measure: bool,
) -> Result<Output, ExecError> {
    // The one place that may: see clippy.toml.
    #[allow(clippy::disallowed_methods)]
    let mut command = Command::new(cmd.program());
    command
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A process group of its own: Ctrl-C at the terminal asks *us* to
        // cancel (with a confirmation); it must not kill a build or a copy.
        .process_group(0)
        .kill_on_drop(true);
    command.envs(cmd.envs());
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        program: cmd.program().to_string(),
        source,
    })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    let mut out = Output::default();
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    let io_error = |source| ExecError::Io {
        command: cmd.display(),
        source,
    };

    let pid = child.id();
    let mut peak: Option<u64> = None;
    let sample = |peak: &mut Option<u64>| {
        if let Some(kib) = peak_rss_kib(pid) {
            *peak = Some(peak.unwrap_or(0).max(kib));
        }
    };
    let mut ticks = tokio::time::interval(MEMORY_SAMPLE_PERIOD);
    let drain_and_wait = async {
        let mut stdout_lines = BufReader::new(stdout).lines();
        let mut stderr_lines = BufReader::new(stderr).lines();
        let (mut stdout_open, mut stderr_open) = (true, true);
        while stdout_open || stderr_open {
            tokio::select! {
                _ = ticks.tick(), if measure => sample(&mut peak),
                line = stdout_lines.next_line(), if stdout_open => match line.map_err(io_error)? {
                    Some(line) => {
                        on_line(Stream::Stdout, &line);
                        out.stdout.push_str(&line);
                        out.stdout.push('\n');
                    }
                    None => stdout_open = false,
                },
                line = stderr_lines.next_line(), if stderr_open => match line.map_err(io_error)? {
                    Some(line) => {
                        on_line(Stream::Stderr, &line);
                        if tail.len() == TAIL_LINES {
                            tail.pop_front();
                        }
                        tail.push_back(line.clone());
                        out.stderr.push_str(&line);
                        out.stderr.push('\n');
                    }
                    None => stderr_open = false,
                },
            }
        }
        if measure {
            // The process is about to exit, or a zombie (then this reads nothing).
            sample(&mut peak);
        }
        child.wait().await.map_err(io_error)
    };

    let status = match tokio::time::timeout(timeout, drain_and_wait).await {
        Ok(status) => status?,
        Err(_) => {
            // `kill_on_drop` reaps it; kill now so the error is not delayed.
            let _ = child.start_kill();
            return Err(ExecError::Timeout {
                command: cmd.display(),
                timeout,
                stderr_tail: join_tail(&tail),
            });
        }
    };
    if !status.success() {
        return Err(ExecError::Exit {
            command: cmd.display(),
            status: status.to_string(),
            stderr_tail: join_tail(&tail),
        });
    }
    out.peak_rss_kib = peak;
    Ok(out)
}

/// Run `cmd` to completion and return its stdout byte for byte (no line
/// handling: a key's contents must arrive exactly as printed). Stderr is
/// drained at the same time; its tail goes into the error on failure. The
/// output is never logged.
pub async fn run_bytes(cmd: &Cmd, timeout: Duration) -> Result<Vec<u8>, ExecError> {
    use tokio::io::AsyncReadExt;
    // The one place that may: see clippy.toml.
    #[allow(clippy::disallowed_methods)]
    let mut command = Command::new(cmd.program());
    command
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command.envs(cmd.envs());
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        program: cmd.program().to_string(),
        source,
    })?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let io_error = |source| ExecError::Io {
        command: cmd.display(),
        source,
    };
    let work = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (read_out, read_err) =
            tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        read_out.map_err(io_error)?;
        read_err.map_err(io_error)?;
        let status = child.wait().await.map_err(io_error)?;
        Ok::<_, ExecError>((status, out, err))
    };
    let (status, out, err) = match tokio::time::timeout(timeout, work).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(ExecError::Timeout {
                command: cmd.display(),
                timeout,
                stderr_tail: String::new(),
            });
        }
    };
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        let lines: Vec<&str> = err.trim_end().lines().collect();
        let start = lines.len().saturating_sub(TAIL_LINES);
        return Err(ExecError::Exit {
            command: cmd.display(),
            status: status.to_string(),
            stderr_tail: lines[start..].join("\n"),
        });
    }
    Ok(out)
}

fn join_tail(tail: &VecDeque<String>) -> String {
    tail.iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drains_both_streams_and_reports_exit() {
        // More than a pipe buffer on stderr before stdout closes: must not deadlock.
        let cmd = Cmd::new("sh").args([
            "-c",
            "i=0; while [ $i -lt 5000 ]; do echo err$i >&2; i=$((i+1)); done; echo out; exit 3",
        ]);
        let mut lines = 0;
        let err = run(&cmd, Duration::from_secs(20), |_, _| lines += 1)
            .await
            .unwrap_err();
        assert_eq!(lines, 5001);
        match err {
            ExecError::Exit { stderr_tail, .. } => {
                assert!(stderr_tail.ends_with("err4999"), "{stderr_tail}");
                assert_eq!(stderr_tail.lines().count(), TAIL_LINES);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn measures_the_peak_memory_of_a_child() {
        // A shell holding ~64 MiB in a variable for a moment.
        let cmd = Cmd::new("sh").args([
            "-c",
            "x=$(head -c 67108864 /dev/zero | tr '\\0' a); sleep 0.2; echo ${#x}",
        ]);
        let out = run_measured(&cmd, Duration::from_secs(30), |_, _| {})
            .await
            .unwrap();
        assert_eq!(out.stdout.trim(), "67108864");
        let peak = out.peak_rss_kib.expect("measured");
        assert!(peak > 64 * 1024, "{peak} KiB");
        let out = run(&cmd, Duration::from_secs(30), |_, _| {}).await.unwrap();
        assert_eq!(out.peak_rss_kib, None);
    }

    #[tokio::test]
    async fn bytes_come_back_exactly() {
        let cmd = Cmd::new("printf").args(["a\\nb\\000c"]);
        let out = run_bytes(&cmd, Duration::from_secs(10)).await.unwrap();
        assert_eq!(out, b"a\nb\0c");
        // Stdout never shows up in an error.
        let cmd = Cmd::new("sh").args(["-c", "seq 424240 424242; echo oops >&2; exit 2"]);
        let err = run_bytes(&cmd, Duration::from_secs(10)).await.unwrap_err();
        assert!(err.to_string().contains("oops"), "{err}");
        assert!(!err.to_string().contains("424241"), "{err}");
    }

    #[tokio::test]
    async fn times_out() {
        let cmd = Cmd::new("sleep").arg("5");
        let err = run(&cmd, Duration::from_millis(100), |_, _| {})
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn spawn_failure_is_distinct() {
        let cmd = Cmd::new("/nonexistent/program");
        let err = run(&cmd, Duration::from_secs(1), |_, _| {})
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Spawn { .. }), "{err}");
    }
}
