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
}

impl CommandOutput {
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

/// The last lines of a stream, kept as they arrive (bounded memory,
/// however much a command prints).
#[derive(Clone, Debug, Default)]
pub struct Tail {
    lines: VecDeque<String>,
    /// Whether lines were dropped.
    pub dropped: bool,
}

impl Tail {
    pub fn push(&mut self, line: &str) {
        if self.lines.len() == TAIL_LINES {
            self.lines.pop_front();
            self.dropped = true;
        }
        let mut line = line.trim_end_matches(['\n', '\r']).to_string();
        if line.chars().count() > LINE_CHARS {
            line = line.chars().take(LINE_CHARS).collect::<String>() + "…";
        }
        self.lines.push_back(line);
    }

    pub fn text(&self) -> String {
        self.lines.iter().cloned().collect::<Vec<_>>().join("\n")
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
    fn tails_keep_the_last_lines_only() {
        let mut tail = Tail::default();
        for i in 0..100 {
            tail.push(&format!("line {i}\n"));
        }
        let text = tail.text();
        assert_eq!(text.lines().count(), TAIL_LINES);
        assert!(text.ends_with("line 99"));
        assert!(tail.dropped);
        let mut tail = Tail::default();
        tail.push(&"x".repeat(10_000));
        assert_eq!(tail.text().chars().count(), LINE_CHARS + 1);
        let output = CommandOutput {
            exit_code: Some(0),
            stdout: "a\nlast one\n\n".into(),
            stderr: "warning".into(),
        };
        assert_eq!(output.last_line(), "last one");
        let output = CommandOutput {
            exit_code: Some(1),
            stdout: String::new(),
            stderr: "boom\n".into(),
        };
        assert_eq!(output.last_line(), "boom");
    }
}
