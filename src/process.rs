//! The one place that spawns local processes (`nix eval`, `nix build`, `nix copy`,
//! a key's `keyCommand`), through one helper ([`spawn`]).
//!
//! Every child gets a null stdin, a timeout and a process group of its own, and
//! its stdout and stderr are drained *at the same time* while we wait for it: a
//! noisy child can never deadlock on a full pipe. Each stderr line is handed to a
//! callback as it arrives so the engine can turn it into progress events, and the
//! tail is kept for the error report.
//!
//! The process group is what we stop: on a timeout, when the caller gives up
//! (the future is dropped: cancel, Ctrl-C) or when a child prints more than we
//! read, the whole group is killed, so nothing a child started outlives it
//! (`sh -c 'helper & ...'`). Ctrl-C at the terminal reaches us, not the group.
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
    #[error("`{command}` printed more than {limit} bytes (stopped)")]
    TooLarge { command: String, limit: usize },
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
    let mut spawned = spawn(cmd, false)?;
    let child = &mut spawned.child;
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
            // Dropping `spawned` kills the group and reaps the child.
            return Err(ExecError::Timeout {
                command: cmd.display(),
                timeout,
                stderr_tail: join_tail(&tail),
            });
        }
    };
    spawned.group.reaped();
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
/// handling: a key's contents must arrive exactly as printed), at most
/// `limit` bytes: one byte more and the child's process group is killed and
/// the run is [`ExecError::TooLarge`], having read no more than `limit + 1`
/// bytes. Stderr is drained at the same time; its tail goes into the error
/// on failure. The output is never logged.
pub async fn run_bytes(cmd: &Cmd, timeout: Duration, limit: usize) -> Result<Vec<u8>, ExecError> {
    let output = run_output(cmd, &[], timeout, limit).await?;
    if !output.status.success() {
        return Err(ExecError::Exit {
            command: cmd.display(),
            status: output.status.to_string(),
            stderr_tail: bytes_tail(&output.stderr),
        });
    }
    Ok(output.stdout)
}

/// Run `cmd` with `input` on its stdin (a key's contents, for the host that
/// is this machine: never on a command line) and return how it ended,
/// whatever its exit status: the caller judges it (by a remote command's
/// rules, for the host that is this machine). Stdin is fed while stdout and
/// stderr are drained, each to at most `limit` bytes: one byte more on
/// either and the child's process group is killed ([`ExecError::TooLarge`]).
pub async fn run_output(
    cmd: &Cmd,
    input: &[u8],
    timeout: Duration,
    limit: usize,
) -> Result<std::process::Output, ExecError> {
    use tokio::io::AsyncWriteExt;
    let mut spawned = spawn(cmd, !input.is_empty())?;
    let child = &mut spawned.child;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let io_error = |source| ExecError::Io {
        command: cmd.display(),
        source,
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let work = async {
        let feed = async {
            if let Some(mut stdin) = stdin {
                // A command that exits without reading everything is judged
                // by its exit code, not by the broken pipe.
                let _ = stdin.write_all(input).await;
                let _ = stdin.shutdown().await;
            }
        };
        // Each stream is read to its end or to one byte past the limit;
        // one too long is judged at once (the other may stay open while a
        // child still runs).
        let read_out = read_bounded(stdout, &mut out, limit);
        let read_err = read_bounded(stderr, &mut err, limit);
        tokio::pin!(feed, read_out, read_err);
        let (mut fed, mut out_done, mut err_done) = (false, false, false);
        let too_large = loop {
            if out_done && err_done {
                break Ok(false);
            }
            let too_large = tokio::select! {
                () = &mut feed, if !fed => {
                    fed = true;
                    false
                }
                read = &mut read_out, if !out_done => {
                    out_done = true;
                    read.map_err(io_error)?
                }
                read = &mut read_err, if !err_done => {
                    err_done = true;
                    read.map_err(io_error)?
                }
            };
            if too_large {
                break Ok::<_, ExecError>(true);
            }
        };
        if too_large? {
            return Ok(None);
        }
        let status = child.wait().await.map_err(io_error)?;
        Ok::<_, ExecError>(Some(status))
    };
    let status = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(Some(status))) => status,
        // Dropping `spawned` kills the group and reaps the child.
        Ok(Ok(None)) => {
            return Err(ExecError::TooLarge {
                command: cmd.display(),
                limit,
            });
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(ExecError::Timeout {
                command: cmd.display(),
                timeout,
                stderr_tail: bytes_tail(&err),
            });
        }
    };
    spawned.group.reaped();
    Ok(std::process::Output {
        status,
        stdout: out,
        stderr: err,
    })
}

/// Read `stream` into `buf` to its end, or to one byte past `limit`:
/// whether it was too long.
async fn read_bounded(
    stream: impl tokio::io::AsyncRead + Unpin,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let read = stream.take(limit as u64 + 1).read_to_end(buf).await?;
    Ok(read > limit)
}

/// The last lines of a child's stderr, for an error.
fn bytes_tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    lines[start..].join("\n")
}

/// A running child: its process group is killed when this is dropped,
/// unless the child was reaped after ending by itself.
struct Spawned {
    // Declared first, dropped first: the group is killed while its leader
    // is still unreaped, so its id cannot have been reused.
    group: ProcessGroup,
    child: tokio::process::Child,
}

/// The process group of a child we spawned (its id is the child's pid).
struct ProcessGroup(Option<rustix::process::Pid>);

impl ProcessGroup {
    /// The leader ended and was reaped: nothing to kill (what it left
    /// running in the background is its business, and the group's id may
    /// be reused once they are gone).
    fn reaped(&mut self) {
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// The one way a local process starts: null stdin (piped with `stdin`),
/// stdout and stderr piped,
/// the caller's environment on top of ours, a process group of its own
/// (Ctrl-C at the terminal asks *us* to cancel, with a confirmation; it must
/// not kill a build or a copy), killed with its group when dropped.
fn spawn(cmd: &Cmd, stdin: bool) -> Result<Spawned, ExecError> {
    // The one place that may: see clippy.toml.
    #[allow(clippy::disallowed_methods)]
    let mut command = Command::new(cmd.program());
    command
        .args(cmd.get_args())
        .envs(cmd.envs())
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn().map_err(|source| ExecError::Spawn {
        program: cmd.program().to_string(),
        source,
    })?;
    let group = child
        .id()
        .and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
    Ok(Spawned {
        group: ProcessGroup(group),
        child,
    })
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
        let out = run_bytes(&cmd, Duration::from_secs(10), 1024)
            .await
            .unwrap();
        assert_eq!(out, b"a\nb\0c");
        // Stdout never shows up in an error.
        let cmd = Cmd::new("sh").args(["-c", "seq 424240 424242; echo oops >&2; exit 2"]);
        let err = run_bytes(&cmd, Duration::from_secs(10), 1024)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("oops"), "{err}");
        assert!(!err.to_string().contains("424241"), "{err}");
    }

    #[tokio::test]
    async fn output_comes_back_whatever_the_status_with_the_input_on_stdin() {
        let cmd = Cmd::new("sh").args(["-c", "cat; echo err >&2; exit 3"]);
        let out = run_output(&cmd, b"hello", Duration::from_secs(10), 1024)
            .await
            .unwrap();
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code(), Some(3));
        // A command that does not read its input is judged by its exit code.
        let cmd = Cmd::new("true");
        let big = vec![b'x'; 1024 * 1024];
        let out = run_output(&cmd, &big, Duration::from_secs(10), 1024)
            .await
            .unwrap();
        assert!(out.status.success());
        // Either stream past the limit stops the child.
        let cmd = Cmd::new("sh").args(["-c", "head -c 2000 /dev/zero >&2; sleep 100"]);
        let err = run_output(&cmd, &[], Duration::from_secs(30), 1000)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ExecError::TooLarge { limit: 1000, .. }),
            "{err}"
        );
    }

    /// Whether `pid` is gone (or a zombie: dead, not yet reaped by its new
    /// parent), waiting up to 10 s for the kill to land.
    async fn gone(pid: u32) -> bool {
        for _ in 0..200 {
            match std::fs::read(format!("/proc/{pid}/cmdline")) {
                Ok(cmdline) if !cmdline.is_empty() => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                _ => return true,
            }
        }
        false
    }

    /// `sh` that starts `sleep 1000` in the background, writes its pid to a
    /// file, then runs `then`.
    fn with_background_child(dir: &std::path::Path, then: &str) -> (Cmd, std::path::PathBuf) {
        let pidfile = dir.join("pid");
        let script = format!("sleep 1000 & echo $! > {}; {then}", pidfile.display());
        (Cmd::new("sh").args(["-c", &script]), pidfile)
    }

    /// The process whose pid `file` holds is gone.
    async fn assert_gone(file: &std::path::Path) {
        let pid = std::fs::read_to_string(file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(gone(pid).await, "the background child {pid} survived");
    }

    #[tokio::test]
    async fn a_timeout_kills_everything_the_child_started() {
        let dir = tempfile::tempdir().unwrap();
        let (cmd, pidfile) = with_background_child(dir.path(), "wait");
        let err = run(&cmd, Duration::from_secs(1), |_, _| {})
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
        assert_gone(&pidfile).await;

        let (cmd, pidfile) = with_background_child(dir.path(), "echo out; wait");
        let err = run_bytes(&cmd, Duration::from_secs(1), 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
        assert_gone(&pidfile).await;
    }

    #[tokio::test]
    async fn giving_up_on_a_child_kills_everything_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let (cmd, pidfile) = with_background_child(dir.path(), "wait");
        let waiting = run(&cmd, Duration::from_secs(600), |_, _| {});
        let started = async {
            while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            _ = waiting => panic!("the child ended by itself"),
            () = started => {}
        }
        // `waiting` was dropped: the caller gave up (cancel, Ctrl-C).
        assert_gone(&pidfile).await;
    }

    #[tokio::test]
    async fn bytes_beyond_the_limit_stop_the_child_and_everything_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let (cmd, pidfile) = with_background_child(dir.path(), "head -c 2000000 /dev/zero; wait");
        let err = run_bytes(&cmd, Duration::from_secs(60), 1024 * 1024)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ExecError::TooLarge { limit: 1048576, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("more than 1048576 bytes"), "{err}");
        assert_gone(&pidfile).await;
        // Exactly the limit is fine; one byte more is not.
        let exactly = Cmd::new("head").args(["-c", "1024", "/dev/zero"]);
        assert_eq!(
            run_bytes(&exactly, Duration::from_secs(10), 1024)
                .await
                .unwrap()
                .len(),
            1024
        );
        let err = run_bytes(&exactly, Duration::from_secs(10), 1023)
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::TooLarge { .. }), "{err}");
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
