//! `nix-deploy exec`: one command on many hosts, one summary. The request
//! (CLI, `POST /api/v1/exec`), what is stored with the run, and what each
//! host's run keeps of the command's output (its exit code and the tails of
//! stdout and stderr).
//!
//! The command is an argument vector: each word reaches the host as one
//! argument, quoted by the SSH layer. Nothing is pasted into a shell unless
//! the user writes `sh -c '...'` themselves.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fleet::Selection;
use crate::options::{MAX_PARALLEL, OptionsError};

/// Hosts running the command at once, unless asked otherwise.
pub const DEFAULT_PARALLEL: usize = 16;
/// How long the command may run on each host, unless asked otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Lines of each stream a host's result keeps.
pub const TAIL_LINES: usize = 20;
/// Characters of one line a host's result keeps.
pub const LINE_CHARS: usize = 500;
/// The longest command line accepted, in bytes.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Seconds a stopped command gets between `TERM` and `KILL`.
pub const STOP_GRACE_SECS: u64 = 5;

/// Runs `"$@"` so that the coordinator can stop it: a watcher in the
/// background reads the session's stdin, which the coordinator holds open
/// while the command runs and closes to stop it (cancel, timeout, daemon
/// shutdown; the kernel closes it too when the coordinator dies). At end of
/// input, if the command still runs, the watcher sends `TERM` to the
/// session's process group (sshd makes one per session: the command and
/// everything it started), then `KILL` after [`STOP_GRACE_SECS`].
///
/// The command replaces the shell (`exec`), so its exit code or signal is
/// exactly its own; it reads `/dev/null`, as before. Fixed text: the
/// command arrives as positional arguments.
const STOPPABLE_SCRIPT: &str = r#"exec 3<&0
main=$$
(
  while read -r _; do :; done
  if kill -0 "$main" 2>/dev/null; then
    trap '' TERM
    kill -TERM 0
    i=0
    while [ "$i" -lt 5 ] && kill -0 "$main" 2>/dev/null; do sleep 1; i=$((i + 1)); done
    kill -KILL 0
  fi
) <&3 >/dev/null 2>&1 &
exec "$@" </dev/null 3<&-"#;

/// The argv that runs `command` on a host so that closing its stdin stops
/// it ([`STOPPABLE_SCRIPT`]).
pub fn stoppable_argv(command: &[String]) -> Vec<String> {
    let mut argv: Vec<String> = ["sh", "-c", STOPPABLE_SCRIPT, "nix-deploy-exec"]
        .map(String::from)
        .to_vec();
    argv.extend(command.iter().cloned());
    argv
}

/// A request to run a command, as callers spell it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecRequest {
    /// Selectors, as for deployments ([`crate::select`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// The argument vector to run on every selected host.
    pub command: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel_limit: Option<usize>,
    /// Per host (`30s`, `5m`, or seconds).
    #[serde(
        with = "crate::duration::human::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

/// What an exec run does, resolved and checked; stored with the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub command: Vec<String>,
    pub parallel_limit: usize,
    #[serde(with = "crate::duration::human")]
    pub timeout: Duration,
}

impl ExecSpec {
    /// The command as a person would type it (for tables and messages;
    /// never executed).
    pub fn display(&self) -> String {
        crate::shell::join(&self.command)
    }
}

impl ExecRequest {
    pub fn selection(&self) -> Selection {
        Selection {
            names: self.hosts.clone(),
            tags: self.on.clone(),
            all: self.all,
            exclude: self.exclude.clone(),
        }
    }

    /// The run's spec, checked: a command, bounded numbers, valid selectors.
    pub fn resolve(&self) -> Result<ExecSpec, OptionsError> {
        let bad = |m: String| OptionsError(m);
        match self.command.first() {
            None => {
                return Err(bad(
                    "exec needs a command: nix-deploy exec [HOSTS] -- COMMAND [ARGS...]".into(),
                ));
            }
            Some(program) if program.is_empty() => {
                return Err(bad("the command's program is an empty string".into()));
            }
            Some(_) => {}
        }
        if self.command.iter().any(|word| word.contains('\0')) {
            return Err(bad("the command contains a NUL byte".into()));
        }
        let bytes: usize = self.command.iter().map(|w| w.len() + 1).sum();
        if bytes > MAX_COMMAND_BYTES {
            return Err(bad(format!(
                "the command is {bytes} bytes long, more than {MAX_COMMAND_BYTES}"
            )));
        }
        let parallel_limit = self.parallel_limit.unwrap_or(DEFAULT_PARALLEL);
        if !(1..=MAX_PARALLEL).contains(&parallel_limit) {
            return Err(bad(format!(
                "parallel-limit must be from 1 to {MAX_PARALLEL}, not {parallel_limit}"
            )));
        }
        let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout < Duration::from_secs(1) || timeout > crate::duration::MAX {
            return Err(bad(format!(
                "timeout must be from 1s to {}, not {}",
                crate::duration::format(crate::duration::MAX),
                crate::duration::format(timeout)
            )));
        }
        crate::select::check(&[self.hosts.clone(), self.on.clone(), self.exclude.clone()].concat())
            .map_err(|e| bad(e.to_string()))?;
        Ok(ExecSpec {
            command: self.command.clone(),
            parallel_limit,
            timeout,
        })
    }
}

/// What a command left behind on one host: its exit code (none when it was
/// killed or timed out) and the last lines of its output.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutput {
    pub exit_code: Option<i32>,
    /// The last [`TAIL_LINES`] lines of stdout.
    pub stdout: String,
    /// The last [`TAIL_LINES`] lines of stderr.
    pub stderr: String,
    /// Stdout and stderr were left out of this copy: the caller may not
    /// run commands on hosts, so may not read what they printed either (a
    /// command prints whatever it can read there).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withheld: bool,
}

impl CommandOutput {
    /// This result without what the command printed (exit code kept).
    pub fn withhold(&mut self) {
        self.stdout.clear();
        self.stderr.clear();
        self.withheld = true;
    }

    /// The last non-empty line, from stdout, else stderr.
    pub fn last_line(&self) -> &str {
        fn last(text: &str) -> Option<&str> {
            text.lines()
                .rev()
                .map(str::trim_end)
                .find(|l| !l.trim().is_empty())
        }
        last(&self.stdout)
            .or_else(|| last(&self.stderr))
            .unwrap_or("")
    }
}

/// The last lines of a stream, kept as they arrive: bounded memory however
/// much a command prints, with or without newlines.
///
/// At most [`TAIL_LINES`] lines are kept. A line longer than [`LINE_CHARS`]
/// characters keeps its beginning and its end with a note of its length in
/// between; while it arrives, only those two ends are held (a few KiB), so
/// hundreds of MB without a newline cost no more than a short line.
#[derive(Clone, Debug, Default)]
pub struct Tail {
    lines: VecDeque<String>,
    /// The line still arriving (no newline yet).
    partial: PartialLine,
    /// Whether lines were dropped.
    pub dropped: bool,
}

/// The bytes kept of each end of a long line: enough for half of
/// [`LINE_CHARS`] characters of up to 4 bytes each.
const EDGE_BYTES: usize = 4 * (LINE_CHARS / 2);

/// A line as it arrives in pieces: its first and last [`EDGE_BYTES`] and its
/// length.
#[derive(Clone, Debug, Default)]
struct PartialLine {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    /// Bytes of the line so far, all of them.
    len: u64,
}

impl PartialLine {
    fn append(&mut self, bytes: &[u8]) {
        self.len += bytes.len() as u64;
        let room = EDGE_BYTES.saturating_sub(self.head.len()).min(bytes.len());
        let (head, rest) = bytes.split_at(room);
        self.head.extend_from_slice(head);
        // Only the last EDGE_BYTES of what does not fit the head matter.
        let rest = &rest[rest.len().saturating_sub(EDGE_BYTES)..];
        self.tail.extend(rest);
        let excess = self.tail.len().saturating_sub(EDGE_BYTES);
        self.tail.drain(..excess);
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The line as text: whole when short, else its two ends around a note.
    fn render(&self) -> String {
        let mut whole = self.head.clone();
        let contiguous = self.len == (self.head.len() + self.tail.len()) as u64;
        if contiguous {
            whole.extend(self.tail.iter());
            let text = String::from_utf8_lossy(&whole);
            let text = text.trim_end_matches('\r');
            if text.chars().count() <= LINE_CHARS {
                return text.to_string();
            }
        }
        let half = LINE_CHARS / 2;
        let head: String = String::from_utf8_lossy(&self.head)
            .chars()
            .take(half)
            .collect();
        let (front, back) = self.tail.as_slices();
        let tail_bytes = [front, back].concat();
        let tail_text = String::from_utf8_lossy(&tail_bytes);
        let tail_text = tail_text.trim_end_matches('\r');
        let skip = tail_text.chars().count().saturating_sub(half);
        let tail: String = tail_text.chars().skip(skip).collect();
        format!("{head} …[a line of {} bytes, cut]… {tail}", self.len)
    }
}

impl Tail {
    /// Output as it arrives, in chunks of any size; a line ends at `\n`.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while let Some(end) = bytes.iter().position(|b| *b == b'\n') {
            self.partial.append(&bytes[..end]);
            self.end_line();
            bytes = &bytes[end + 1..];
        }
        self.partial.append(bytes);
    }

    /// One whole line (a trailing newline is not part of it).
    pub fn push(&mut self, line: &str) {
        self.feed(line.trim_end_matches('\n').as_bytes());
        self.end_line();
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.partial).render();
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
            self.dropped = true;
        }
        self.lines.push_back(line);
    }

    /// The kept lines, the one still arriving last.
    pub fn text(&self) -> String {
        let mut lines: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            if lines.len() == TAIL_LINES {
                lines.remove(0);
            }
            lines.push(self.partial.render());
        }
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_resolves_with_defaults_and_bounds() {
        let request: ExecRequest =
            serde_json::from_str(r#"{"on": ["web-*"], "command": ["uptime"], "timeout": "30s"}"#)
                .unwrap();
        let spec = request.resolve().unwrap();
        assert_eq!(spec.command, ["uptime"]);
        assert_eq!(spec.parallel_limit, DEFAULT_PARALLEL);
        assert_eq!(spec.timeout, Duration::from_secs(30));
        assert_eq!(request.selection().tags, ["web-*"]);
        let refused = |json: &str| {
            serde_json::from_str::<ExecRequest>(json)
                .map_err(|e| e.to_string())
                .and_then(|r| r.resolve().map_err(|e| e.to_string()))
                .unwrap_err()
        };
        assert!(refused(r#"{"command": []}"#).contains("needs a command"));
        assert!(refused(r#"{"command": [""]}"#).contains("empty string"));
        assert!(refused(r#"{"command": ["a\u0000b"]}"#).contains("NUL"));
        assert!(refused(r#"{"command": ["x"], "parallel_limit": 0}"#).contains("parallel-limit"));
        assert!(refused(r#"{"command": ["x"], "timeout": "0s"}"#).contains("timeout"));
        assert!(refused(r#"{"command": ["x"], "hosts": ["a b"]}"#).contains("invalid selector"));
        assert!(refused(r#"{"command": ["x"], "comand": ["y"]}"#).contains("unknown field"));
        let spec = ExecSpec {
            command: vec!["sh".into(), "-c".into(), "echo $HOME; uptime".into()],
            parallel_limit: 1,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(spec.display(), "sh -c 'echo $HOME; uptime'");
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["timeout"], "1s");
    }

    #[test]
    fn a_stoppable_command_keeps_its_argv_as_arguments() {
        let argv = stoppable_argv(&["sh".into(), "-c".into(), "echo $HOME; sleep 9".into()]);
        assert_eq!(argv[..2], ["sh", "-c"]);
        assert_eq!(
            argv[3..],
            ["nix-deploy-exec", "sh", "-c", "echo $HOME; sleep 9"]
        );
        assert!(!STOPPABLE_SCRIPT.contains("sleep 9"));
        assert!(STOPPABLE_SCRIPT.contains(&format!("-lt {STOP_GRACE_SECS} ")));
    }

    #[test]
    fn tails_keep_the_last_lines_only() {
        let mut tail = Tail::default();
        for i in 0..100 {
            tail.push(&format!("line {i}\n"));
        }
        let text = tail.text();
        assert_eq!(text.lines().count(), TAIL_LINES);
        assert!(text.ends_with("line 99"));
        assert!(tail.dropped);
        // A long line keeps both ends and says how long it was.
        let mut tail = Tail::default();
        tail.push(&format!("start{}end", "x".repeat(10_000)));
        let text = tail.text();
        assert!(text.starts_with("startxx"), "{text}");
        assert!(text.ends_with("xxend"), "{text}");
        assert!(text.contains(" …[a line of 10008 bytes, cut]… "), "{text}");
        assert!(text.chars().count() < LINE_CHARS + 40, "{text}");
        // A short line is kept whole; a CR before the newline is not part of it.
        let mut tail = Tail::default();
        tail.push(&"y".repeat(LINE_CHARS));
        tail.feed(b"dos\r\n");
        assert_eq!(tail.text(), format!("{}\ndos", "y".repeat(LINE_CHARS)));
    }

    #[test]
    fn output_without_newlines_costs_a_few_kib_and_keeps_its_end() {
        let mut tail = Tail::default();
        // 64 MiB in odd chunk sizes, never a newline, then the end.
        let chunk = vec![b'a'; 65_521];
        for _ in 0..1024 {
            tail.feed(&chunk);
        }
        tail.feed("héllo wörld".as_bytes());
        assert!(tail.partial.head.len() + tail.partial.tail.len() <= 2 * EDGE_BYTES);
        let text = tail.text();
        assert!(text.ends_with("aaahéllo wörld"), "{text}");
        assert!(
            text.contains(&format!("{} bytes", 65_521 * 1024 + 13)),
            "{text}"
        );
        // Lines that arrive split anywhere, even inside a character, come out whole.
        let mut tail = Tail::default();
        for piece in "one\ntwö\nthr".as_bytes().chunks(1) {
            tail.feed(piece);
        }
        assert_eq!(tail.text(), "one\ntwö\nthr");
        tail.feed(b"ee\n");
        assert_eq!(tail.text(), "one\ntwö\nthree");
        // The line still arriving counts among the last lines.
        let mut tail = Tail::default();
        for i in 0..TAIL_LINES {
            tail.push(&format!("l{i}"));
        }
        tail.feed(b"partial");
        let text = tail.text();
        assert_eq!(text.lines().count(), TAIL_LINES);
        assert!(
            text.starts_with("l1\n") && text.ends_with("partial"),
            "{text}"
        );
        let output = CommandOutput {
            exit_code: Some(0),
            stdout: "a\nlast one\n\n".into(),
            stderr: "warning".into(),
            withheld: false,
        };
        assert_eq!(output.last_line(), "last one");
        let output = CommandOutput {
            exit_code: Some(1),
            stdout: String::new(),
            stderr: "boom\n".into(),
            withheld: false,
        };
        assert_eq!(output.last_line(), "boom");
    }
}
