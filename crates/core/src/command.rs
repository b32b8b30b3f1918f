//! A local command as data: program, argument vector and extra environment.
//! Built by pure functions (here and in [`crate::nix`]) and run by the
//! product's process module, the only place that spawns anything.

use std::ffi::OsString;

/// A command line as an argument vector. Never a shell string.
#[derive(Clone, Debug)]
pub struct Cmd {
    program: String,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
}

impl Cmd {
    pub fn new(program: impl Into<String>) -> Self {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn program(&self) -> &str {
        &self.program
    }

    pub fn get_args(&self) -> impl Iterator<Item = &OsString> {
        self.args.iter()
    }

    /// The environment variables the command gets on top of ours.
    pub fn envs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn get_env(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The command as a human would type it, for messages only (never executed).
    pub fn display(&self) -> String {
        let mut words = vec![self.program.clone()];
        words.extend(self.args.iter().map(|a| a.to_string_lossy().into_owned()));
        // The program as given (a path people recognise), the arguments quoted.
        let args = crate::shell::join(&words[1..]);
        if args.is_empty() {
            words.swap_remove(0)
        } else {
            format!("{} {args}", words[0])
        }
    }
}
