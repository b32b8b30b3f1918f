//! `nix-deploy doctor`: what is checked, and what each finding says and how
//! to fix it. The checks themselves (running Nix, ssh-add, connecting to
//! hosts) are IO done by the product; here are the verdicts and the words,
//! pure and unit-tested.
//!
//! On this machine: Nix (version, flakes), SSH keys (agent or key files),
//! the flake (found, evaluates, which hosts). For each selected host:
//! reachable over SSH as its `targetUser`, privileges (root, or `sudo -n`
//! without a password), and copies (a tiny store path copied as a
//! deployment copies, which needs the host's nix-daemon to trust a non-root
//! user).

use serde::{Deserialize, Serialize};

use crate::source::FleetSource;

/// The oldest Nix nix-deploy works with (Debian 12's `nix-bin`).
pub const MIN_NIX: (u32, u32) = (2, 8);

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// Works, but something an operator should know.
    Warn,
    /// Deployments will fail until it is fixed.
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// What was checked: `nix`, `flakes`, `ssh-keys`, `flake`, `reachable`,
    /// `privileges`, `copy`.
    pub check: String,
    /// The host it is about, for host checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub verdict: Verdict,
    /// What was found, one line.
    pub detail: String,
    /// What to do about it (warnings and failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn new(check: &str, verdict: Verdict, detail: impl Into<String>) -> Self {
        Finding {
            check: check.to_string(),
            host: None,
            verdict,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    fn host(mut self, host: &str) -> Self {
        self.host = Some(host.to_string());
        self
    }
}

/// Everything `doctor` found, in the order checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorReport {
    pub findings: Vec<Finding>,
}

impl DoctorReport {
    /// Whether any check failed (exit code 1).
    pub fn failed(&self) -> bool {
        self.findings.iter().any(|f| f.verdict == Verdict::Fail)
    }
}

/// `(major, minor)` of `nix (Nix) 2.8.0`.
fn version_of(line: &str) -> Option<(u32, u32)> {
    let number = line.split_whitespace().last()?;
    let mut parts = number.split(['.', 'p', 'r', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The first line of `nix --version`, or why it could not run.
pub fn nix(version: Result<&str, &str>) -> Finding {
    match version {
        Err(e) => Finding::new("nix", Verdict::Fail, format!("`nix --version` failed: {e}")).fix(
            "install Nix (Debian: `apt install nix-bin`; elsewhere https://nixos.org/download) and put `nix` on PATH",
        ),
        Ok(line) => match version_of(line) {
            Some(v) if v >= MIN_NIX => Finding::new("nix", Verdict::Ok, line.trim()),
            Some(_) => Finding::new(
                "nix",
                Verdict::Fail,
                format!("{} is older than Nix {}.{}", line.trim(), MIN_NIX.0, MIN_NIX.1),
            )
            .fix("upgrade Nix to 2.8 or newer"),
            None => Finding::new(
                "nix",
                Verdict::Warn,
                format!("cannot read a version from `{}`", line.trim()),
            )
            .fix("check that `nix` on PATH is Nix (2.8 or newer)"),
        },
    }
}

/// Whether the user's own Nix has flakes on: what `nix eval --expr
/// 'builtins ? getFlake'` printed without our feature flags (`true` with
/// flakes, `false` without, an error without `nix-command`).
pub fn flakes(probe: Result<&str, &str>) -> Finding {
    let enable = "add `experimental-features = nix-command flakes` to /etc/nix/nix.conf or ~/.config/nix/nix.conf (NixOS: nix.settings.experimental-features)";
    match probe.map(str::trim) {
        Ok("true") => Finding::new("flakes", Verdict::Ok, "flakes and nix-command are enabled"),
        Ok(_) => Finding::new(
            "flakes",
            Verdict::Warn,
            "flakes are not enabled in your Nix configuration (nix-deploy enables them for its own commands; your `nix build .#...` will not work)",
        )
        .fix(enable),
        Err(_) => Finding::new(
            "flakes",
            Verdict::Warn,
            "nix-command and flakes are not enabled in your Nix configuration (nix-deploy enables them for its own commands)",
        )
        .fix(enable),
    }
}

/// What `ssh-add -l` said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agent {
    /// No `SSH_AUTH_SOCK`.
    Absent,
    /// It answered with this many keys.
    Keys(usize),
    /// It answered: no identities.
    Empty,
    /// `SSH_AUTH_SOCK` is set, but nobody answers there.
    Unreachable,
}

/// `ssh-add -l`: the keys the agent holds.
pub fn ssh_add_command() -> crate::command::Cmd {
    crate::command::Cmd::new("ssh-add").arg("-l")
}

/// The agent's state from `ssh-add -l`: its stdout when it exited 0, else
/// its stderr (exit 1: no identities; 2: no agent answers).
pub fn agent_from(listed: Result<&str, &str>) -> Agent {
    match listed {
        Ok(stdout) => match stdout.lines().filter(|l| !l.trim().is_empty()).count() {
            0 => Agent::Empty,
            n => Agent::Keys(n),
        },
        Err(stderr)
            if stderr.contains("Could not open a connection")
                || stderr.contains("Error connecting to agent")
                || stderr.contains("communication with agent failed") =>
        {
            Agent::Unreachable
        }
        Err(_) => Agent::Empty,
    }
}

/// `IdentityFile`s named in an ssh config's text.
pub fn identity_files(ssh_config: &str) -> Vec<String> {
    ssh_config
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next()?;
            key.eq_ignore_ascii_case("IdentityFile")
                .then(|| words.next())
                .flatten()
                .map(|f| f.trim_matches('"').to_string())
        })
        .collect()
}

/// The SSH keys this machine can offer: the agent's, key files in
/// `~/.ssh`, `IdentityFile`s of the ssh config, or `--ssh-identity`.
pub fn ssh_keys(agent: Agent, key_files: &[String]) -> Finding {
    let mut unique: Vec<&String> = Vec::new();
    for file in key_files {
        if !unique.contains(&file) {
            unique.push(file);
        }
    }
    let key_files = &unique;
    let files = || {
        if key_files.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = key_files.iter().map(|f| f.as_str()).collect();
            format!("; key files: {}", names.join(", "))
        }
    };
    match agent {
        Agent::Keys(n) => Finding::new(
            "ssh-keys",
            Verdict::Ok,
            format!("the SSH agent holds {n} key(s){}", files()),
        ),
        _ if !key_files.is_empty() => Finding::new(
            "ssh-keys",
            Verdict::Ok,
            format!("no agent keys{}", files()),
        ),
        Agent::Unreachable => Finding::new(
            "ssh-keys",
            Verdict::Warn,
            "SSH_AUTH_SOCK is set but no agent answers there, and no key file was found",
        )
        .fix("start the agent (`eval $(ssh-agent)`) and `ssh-add` your key, or name a key with --ssh-identity"),
        Agent::Empty | Agent::Absent => Finding::new(
            "ssh-keys",
            Verdict::Warn,
            "no SSH key found (no agent keys, no ~/.ssh/id_* file, no IdentityFile in the ssh config)",
        )
        .fix("`ssh-add` your key, or name it with --ssh-identity FILE or IdentityFile in --ssh-config"),
    }
}

/// The flake: where it is and which hosts it has (in which of the fleet
/// sources), or why not.
pub fn flake(
    flake: &str,
    hosts: Result<(usize, FleetSource), &str>,
    no_flake_here: bool,
) -> Finding {
    match hosts {
        Ok((0, source)) => Finding::new(
            "flake",
            Verdict::Fail,
            format!("`{flake}` has no hosts in {}", source.output()),
        )
        .fix("define your hosts as `nixosConfigurations.NAME = nixpkgs.lib.nixosSystem { ... }`, a colmena hive (`colmenaHive`) or deploy-rs nodes (`deploy.nodes`)"),
        Ok((n, source)) => Finding::new(
            "flake",
            Verdict::Ok,
            format!("`{flake}`: {n} host(s) in {} ({source})", source.output()),
        ),
        Err(e) if no_flake_here => Finding::new("flake", Verdict::Fail, e.to_string())
            .fix("run nix-deploy in your fleet's flake, or pass --flake PATH|URL (or set NIX_DEPLOY_FLAKE)"),
        Err(e) => Finding::new(
            "flake",
            Verdict::Fail,
            format!("`{flake}` does not evaluate: {}", first_lines(e)),
        )
        .fix("fix the error above (`--show-trace` shows where it comes from), or point --flake at your fleet"),
    }
}

/// A host of `source` that could not be evaluated.
pub fn evaluation(host: &str, error: &str, source: FleetSource) -> Finding {
    Finding::new(
        "evaluate",
        Verdict::Fail,
        format!(
            "its configuration does not evaluate: {}",
            first_lines(error)
        ),
    )
    .host(host)
    .fix(format!(
        "fix `{}` (`nix-deploy eval -E '{{ nodes, ... }}: nodes.{host}.{}.drvPath' --show-trace`)",
        source.host_path(host),
        source.system_attr()
    ))
}

/// The first lines of a long error.
fn first_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let shown: Vec<&str> = lines.iter().rev().take(3).rev().copied().collect();
    shown.join(" | ")
}

/// Connecting as `user@destination`.
pub fn reachable(host: &str, user: &str, destination: &str, result: Result<(), &str>) -> Finding {
    match result {
        Ok(()) => Finding::new(
            "reachable",
            Verdict::Ok,
            format!("{user}@{destination} answers over SSH"),
        )
        .host(host),
        Err(e) => Finding::new(
            "reachable",
            Verdict::Fail,
            format!("cannot log in as {user}@{destination}: {}", first_lines(e)),
        )
        .host(host)
        .fix(format!(
            "check `ssh {user}@{destination} true` works (BatchMode: no password prompts); \
             deployment.targetHost/targetUser/targetPort, your ssh config (--ssh-config), \
             that the host's sshd runs and has your public key"
        )),
    }
}

/// Root, or `sudo -n true` as a non-root user.
pub fn privileges(host: &str, user: &str, sudo: Result<(), &str>) -> Finding {
    if user == "root" {
        return Finding::new("privileges", Verdict::Ok, "logs in as root").host(host);
    }
    match sudo {
        Ok(()) => Finding::new(
            "privileges",
            Verdict::Ok,
            format!("{user} runs `sudo -n` without a password"),
        )
        .host(host),
        Err(e) => Finding::new(
            "privileges",
            Verdict::Fail,
            format!("{user} cannot run `sudo -n true`: {}", first_lines(e)),
        )
        .host(host)
        .fix(format!(
            "let {user} use sudo without a password (NixOS: `security.sudo.extraRules = [ {{ users = [ \"{user}\" ]; commands = [ {{ command = \"ALL\"; options = [ \"NOPASSWD\" ]; }} ]; }} ];`), or deploy as root (deployment.targetUser = \"root\")"
        )),
    }
}

/// A tiny store path copied to the host as a deployment copies its
/// closure.
pub fn copy(host: &str, user: &str, result: Result<(), &str>) -> Finding {
    match result {
        Ok(()) => Finding::new(
            "copy",
            Verdict::Ok,
            format!("closures can be copied as {user}"),
        )
        .host(host),
        Err(e) => {
            let untrusted = e.contains("signature") || e.contains("trusted");
            let fix = if untrusted && user != "root" {
                format!(
                    "make the host's nix-daemon trust {user} (NixOS: `nix.settings.trusted-users = [ \"{user}\" ];`), or deploy as root"
                )
            } else {
                "check that `nix-store` is on the host's PATH for SSH sessions and that /nix/store has space".to_string()
            };
            Finding::new(
                "copy",
                Verdict::Fail,
                format!(
                    "a store path could not be copied as {user}: {}",
                    first_lines(e)
                ),
            )
            .host(host)
            .fix(fix)
        }
    }
}

/// A check that was not run because an earlier one failed.
pub fn skipped(host: &str, check: &str, because: &str) -> Finding {
    Finding::new(check, Verdict::Warn, format!("not checked: {because}")).host(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_agents_and_key_files() {
        assert_eq!(
            agent_from(Ok("256 SHA256:x me@a (ED25519)\n")),
            Agent::Keys(1)
        );
        assert_eq!(
            agent_from(Err(
                "Could not open a connection to your authentication agent."
            )),
            Agent::Unreachable
        );
        assert_eq!(agent_from(Err("")), Agent::Empty);
        assert_eq!(
            identity_files("Host *\n  IdentityFile /k/id\n  identityfile \"/k/two\"\n"),
            ["/k/id", "/k/two"]
        );
    }

    #[test]
    fn nix_versions() {
        assert_eq!(nix(Ok("nix (Nix) 2.8.0")).verdict, Verdict::Ok);
        assert_eq!(nix(Ok("nix (Nix) 2.24.10")).verdict, Verdict::Ok);
        assert_eq!(nix(Ok("nix (Nix) 2.3.16")).verdict, Verdict::Fail);
        assert_eq!(
            nix(Ok("nix (Nix) 2.18pre20230101_abc")).verdict,
            Verdict::Ok
        );
        assert_eq!(nix(Ok("something")).verdict, Verdict::Warn);
        let missing = nix(Err("could not start `nix`: No such file"));
        assert_eq!(missing.verdict, Verdict::Fail);
        assert!(missing.fix.unwrap().contains("nix-bin"));
        assert_eq!(flakes(Ok("true\n")).verdict, Verdict::Ok);
        assert_eq!(flakes(Ok("false")).verdict, Verdict::Warn);
        assert_eq!(
            flakes(Err("experimental Nix feature")).verdict,
            Verdict::Warn
        );
    }

    #[test]
    fn every_failure_comes_with_its_fix() {
        let failures = [
            reachable("web1", "deploy", "10.0.0.1", Err("Connection refused")),
            privileges("web1", "deploy", Err("sudo: a password is required")),
            copy("web1", "deploy", Err("lacks a valid signature")),
            copy("web1", "root", Err("No space left on device")),
            flake(".", Err("no flake.nix"), true),
            flake(".", Ok((0, FleetSource::Nixos)), false),
            evaluation(
                "web1",
                "error: undefined variable 'x'",
                FleetSource::DeployRs,
            ),
        ];
        for finding in failures {
            assert_eq!(finding.verdict, Verdict::Fail, "{finding:?}");
            assert!(finding.fix.is_some(), "{finding:?}");
        }
        let sudo = privileges("web1", "deploy", Err("sudo: a password is required"));
        assert!(sudo.fix.unwrap().contains("NOPASSWD"));
        // The fix names the host where its source keeps it.
        let node = evaluation("web1", "boom", FleetSource::DeployRs)
            .fix
            .unwrap();
        assert!(
            node.contains("`deploy.nodes.web1`")
                && node.contains("nodes.web1.profiles.system.path"),
            "{node}"
        );
        let hive = flake(".", Ok((3, FleetSource::Colmena)), false);
        assert_eq!(hive.verdict, Verdict::Ok);
        assert!(hive.detail.contains("3 host(s) in colmenaHive"), "{hive:?}");
        let trust = copy("web1", "deploy", Err("lacks a valid signature"));
        assert!(trust.fix.unwrap().contains("trusted-users"));
        assert_eq!(
            privileges("web1", "root", Err("unused")).verdict,
            Verdict::Ok
        );
        assert_eq!(ssh_keys(Agent::Absent, &[]).verdict, Verdict::Warn);
        assert_eq!(
            ssh_keys(Agent::Absent, &["/root/.ssh/id_ed25519".into()]).verdict,
            Verdict::Ok
        );
        let report = DoctorReport {
            findings: vec![sudo_ok(), trust_fail()],
        };
        assert!(report.failed());
    }

    fn sudo_ok() -> Finding {
        privileges("a", "deploy", Ok(()))
    }

    fn trust_fail() -> Finding {
        copy("a", "deploy", Err("not trusted"))
    }
}
