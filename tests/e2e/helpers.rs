//! Running the real binary against a test fleet, with a fresh state directory.

use std::path::{Path, PathBuf};
use std::process::Output;

use nix_deploy_testkit::{Fleet, HostSpec};
use serde_json::Value;

pub struct Harness {
    pub fleet: Fleet,
    pub state: tempfile::TempDir,
    /// `--command-timeout` of every run (30 s unless a test wants less).
    pub command_timeout: &'static str,
}

/// The binary under test: this build's, or `NIX_DEPLOY_TEST_BIN` (to show
/// that a new test fails against an older build).
pub fn binary() -> PathBuf {
    std::env::var_os("NIX_DEPLOY_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_nix-deploy")))
}

impl Harness {
    pub fn start(specs: Vec<HostSpec>) -> Harness {
        let fleet = Fleet::start(specs).expect("starting the test fleet");
        let state = tempfile::tempdir().expect("state dir");
        Harness {
            fleet,
            state,
            command_timeout: "30",
        }
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Run `nix-deploy` with the fleet's flake, ssh config and our state dir.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with_env(args, &[])
    }

    /// [`Harness::run`] with extra environment variables.
    pub fn run_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.run_in(self.state_dir(), args, env)
    }

    /// [`Harness::run_with_env`] with another state directory.
    pub fn run_in(&self, state: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(&binary(), state, &self.fleet.ssh_config());
        cmd.args(args).envs(env.iter().copied());
        cmd.output().expect("running nix-deploy")
    }

    /// `nix-deploy --json ARGS` with another ssh config (e.g. one that
    /// reaches a host through a proxy); exit code, parsed stdout, stderr.
    pub fn json_with_ssh_config(&self, ssh_config: &Path, args: &[&str]) -> (i32, Value, String) {
        let mut cmd = self.command(&binary(), self.state_dir(), ssh_config);
        cmd.arg("--json").args(args);
        let out = cmd.output().expect("running nix-deploy");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        (
            out.status.code().unwrap_or(-1),
            value,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `program` with the fleet's flake, `ssh_config`, `state`, the
    /// harness's timeouts and the fleet's environment; stdin closed.
    fn command(&self, program: &Path, state: &Path, ssh_config: &Path) -> std::process::Command {
        let mut cmd = std::process::Command::new(program);
        cmd.arg("--flake")
            .arg(self.fleet.flake_ref())
            .arg("--ssh-config")
            .arg(ssh_config)
            .arg("--state-dir")
            .arg(state)
            .args([
                "--connect-timeout",
                "5",
                "--command-timeout",
                self.command_timeout,
            ])
            .stdin(std::process::Stdio::null());
        for (k, v) in self.fleet.env() {
            cmd.env(k, v);
        }
        cmd
    }

    /// Start `nix-deploy --json ARGS` in the background; its output goes to
    /// files in the state dir (`NAME.out`, `NAME.err`).
    pub fn spawn(&self, name: &str, args: &[&str]) -> std::process::Child {
        self.spawn_program(&binary(), name, args)
    }

    /// [`Harness::spawn`] through another path to the binary (a symlink, a
    /// wrapper).
    pub fn spawn_program(&self, program: &Path, name: &str, args: &[&str]) -> std::process::Child {
        let mut cmd = self.command(program, self.state_dir(), &self.fleet.ssh_config());
        cmd.arg("--json")
            .args(args)
            .stdout(std::fs::File::create(self.state_dir().join(format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(self.state_dir().join(format!("{name}.err"))).unwrap());
        cmd.spawn().expect("spawning nix-deploy")
    }

    /// Wait for a background run; returns exit code, parsed stdout, stderr.
    pub fn wait(&self, name: &str, mut child: std::process::Child) -> (i32, Value, String) {
        let status = child.wait().expect("waiting for nix-deploy");
        let (value, stderr) = self.outputs(name);
        (status.code().unwrap_or(-1), value, stderr)
    }

    /// What a background run (ended) printed: parsed stdout, stderr.
    pub fn outputs(&self, name: &str) -> (Value, String) {
        let stdout = std::fs::read_to_string(self.state_dir().join(format!("{name}.out"))).unwrap();
        let stderr = std::fs::read_to_string(self.state_dir().join(format!("{name}.err"))).unwrap();
        (serde_json::from_str(&stdout).unwrap_or(Value::Null), stderr)
    }

    /// Poll until `condition` holds (panics after `secs`).
    pub fn until(&self, secs: u64, what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while !condition() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// How many processes on `host` run exactly `argv`.
    pub fn running(&self, host: &str, argv: &[&str]) -> usize {
        let wanted: Vec<u8> = argv
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect();
        self.fleet
            .host_processes(host)
            .iter()
            .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
            .count()
    }

    /// The host's profile generation points at what it runs: it is not
    /// between generations.
    pub fn consistent(&self, name: &str) -> bool {
        match self.fleet.generation(name) {
            None => self.fleet.current_system(name).is_none(),
            Some(g) => self.fleet.generation_path(name, g) == self.fleet.current_system(name),
        }
    }

    /// Run `nix-deploy --json ARGS` while the fleet carries out the reboots
    /// its hosts ask for (`systemctl reboot`); returns exit code, the parsed
    /// report, stderr.
    pub fn json_serving_reboots(&mut self, name: &str, args: &[&str]) -> (i32, Value, String) {
        let mut child = self.spawn(name, args);
        loop {
            if child.try_wait().expect("waiting for nix-deploy").is_some() {
                break;
            }
            self.fleet.serve_reboots().expect("rebooting test hosts");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.wait(name, child)
    }

    /// Run with `--json` and parse stdout.
    pub fn json(&self, args: &[&str]) -> (i32, Value, String) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"));
        (out.status.code().unwrap_or(-1), value, stderr)
    }

    /// Deploy with `--json`; returns exit code, the report, stderr.
    pub fn deploy(&self, args: &[&str]) -> (i32, Value, String) {
        let mut all = vec!["deploy"];
        all.extend_from_slice(args);
        self.json(&all)
    }
}

/// A version no earlier run had, for a host whose system must be new to
/// this machine's store (a test that checks where it was built).
pub fn unique_version() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    1_000 + (nanos % 1_000_000_000) as u32
}

/// Files below `dir` (not following symlinks) whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file()
                && let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// `nix eval --json FLAKE#ATTR --apply APPLY` on the coordinator.
pub fn nix_eval(flake: &str, attr: &str, apply: &str) -> Value {
    let out = std::process::Command::new("nix")
        .env("NIX_CONFIG", nix_deploy_testkit::nix_config())
        .args([
            "eval",
            "--json",
            &format!("{flake}#{attr}"),
            "--apply",
            apply,
        ])
        .output()
        .expect("running nix eval");
    assert!(
        out.status.success(),
        "nix eval: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("nix eval printed JSON")
}

/// The report entry of one host.
pub fn host<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["hosts"]
        .as_array()
        .expect("hosts array")
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no host {name} in {report:#}"))
}

pub fn status<'a>(report: &'a Value, name: &str) -> &'a str {
    host(report, name)["status"].as_str().unwrap_or("?")
}

/// `git ARGS` in `dir` (with a committer), its stdout; panics on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
