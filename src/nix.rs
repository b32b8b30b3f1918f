//! Talking to the local Nix: one evaluation of the whole fleet, building
//! toplevels and copying closures to hosts.
//!
//! Command lines are built by pure functions (unit-tested below) and run through
//! [`crate::exec`]. Nix 2.8 (Debian's `nix-bin`) must work, so we pass the
//! experimental features ourselves and use no flag newer than 2.8 (`--json`
//! instead of `--print-out-paths`).

use std::time::Duration;

use serde::Deserialize;

use crate::exec::{self, Cmd, ExecError, Stream};

/// Flags every `nix` invocation gets: flakes without touching the user's config.
const FEATURE_FLAGS: [&str; 2] = ["--extra-experimental-features", "nix-command flakes"];

/// Reads, for every `nixosConfigurations.<name>`, the toplevel's out and drv paths
/// and `config.deployment`, in one evaluation.
///
/// The result must not contain an attribute named `outPath`: Nix would turn such
/// an attribute set into a plain string when printing JSON.
pub const FLEET_APPLY_EXPR: &str = r#"configurations: builtins.mapAttrs (name: configuration:
  let toplevel = configuration.config.system.build.toplevel; in {
    toplevel = toplevel.outPath;
    drvPath = toplevel.drvPath;
    deployment = configuration.config.deployment or { };
  }) configurations"#;

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("evaluating `{flake}#nixosConfigurations` failed: {source}")]
    Eval {
        flake: String,
        #[source]
        source: ExecError,
    },
    #[error("`{flake}` is not a usable flake reference: {reason}")]
    BadFlakeRef { flake: String, reason: &'static str },
    #[error("building {drv} failed: {source}")]
    Build {
        drv: String,
        #[source]
        source: ExecError,
    },
    #[error("copying {path} to {destination} failed: {source}")]
    Copy {
        path: String,
        destination: String,
        #[source]
        source: ExecError,
    },
    #[error("unexpected output from `{command}`: {reason}")]
    BadOutput { command: String, reason: String },
}

/// How we call Nix: extra environment (for tests and the demo, e.g. `NIX_CONFIG`)
/// and timeouts.
#[derive(Clone, Debug)]
pub struct Nix {
    pub env: Vec<(String, String)>,
    pub eval_timeout: Duration,
    pub build_timeout: Duration,
    pub copy_timeout: Duration,
}

impl Default for Nix {
    fn default() -> Self {
        Nix {
            env: Vec::new(),
            eval_timeout: Duration::from_secs(600),
            build_timeout: Duration::from_secs(3600),
            copy_timeout: Duration::from_secs(1800),
        }
    }
}

/// Reject flake references we cannot append `#nixosConfigurations` to.
pub fn check_flake_ref(flake: &str) -> Result<(), NixError> {
    let bad = |reason| {
        Err(NixError::BadFlakeRef {
            flake: flake.to_string(),
            reason,
        })
    };
    if flake.is_empty() {
        return bad("it is empty");
    }
    if flake.contains('#') {
        return bad(
            "give the flake without a `#` attribute; nix-deploy reads `#nixosConfigurations` itself",
        );
    }
    if flake.starts_with('-') {
        return bad("it starts with `-`");
    }
    if flake.chars().any(char::is_control) {
        return bad("it contains control characters");
    }
    Ok(())
}

pub fn eval_command(flake: &str) -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["eval", "--json"])
        .arg(format!("{flake}#nixosConfigurations"))
        .args(["--apply", FLEET_APPLY_EXPR])
}

pub fn metadata_command(flake: &str) -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["flake", "metadata", "--json"])
        .arg(flake)
}

pub fn build_command(drv: &str) -> Cmd {
    Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["build", "--no-link", "--json"])
        .arg(drv)
}

/// `nix-store --query --requisites PATH`: the closure of a built path.
pub fn closure_command(path: &str) -> Cmd {
    Cmd::new("nix-store")
        .args(["--query", "--requisites"])
        .arg(path)
}

/// `nix copy --to ssh://[user@]dest PATH`, with our ssh options in `NIX_SSHOPTS`.
pub fn copy_command(destination_uri: &str, path: &str, ssh_opts: &str, substitute: bool) -> Cmd {
    let mut cmd = Cmd::new("nix")
        .args(FEATURE_FLAGS)
        .args(["copy", "--to", destination_uri]);
    if substitute {
        cmd = cmd.arg("--substitute-on-destination");
    }
    cmd.arg(path).env("NIX_SSHOPTS", ssh_opts)
}

#[derive(Deserialize)]
struct BuildResult {
    outputs: std::collections::BTreeMap<String, String>,
}

/// The `out` path from `nix build --json`.
pub fn parse_build_output(json: &str) -> Result<String, String> {
    let results: Vec<BuildResult> =
        serde_json::from_str(json).map_err(|e| format!("not the expected JSON: {e}"))?;
    results
        .into_iter()
        .next()
        .and_then(|mut r| r.outputs.remove("out"))
        .ok_or_else(|| "no `out` output in the build result".to_string())
}

impl Nix {
    fn with_env(&self, mut cmd: Cmd) -> Cmd {
        for (k, v) in &self.env {
            cmd = cmd.env(k, v);
        }
        cmd
    }

    /// The one evaluation of the fleet; returns Nix's JSON for [`crate::inventory`].
    #[tracing::instrument(skip(self))]
    pub async fn eval_fleet(&self, flake: &str) -> Result<String, NixError> {
        check_flake_ref(flake)?;
        let cmd = self.with_env(eval_command(flake));
        let out = exec::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Eval {
                flake: flake.to_string(),
                source,
            })?;
        Ok(out.stdout)
    }

    /// The flake's locked revision, when Nix knows one (a clean git tree).
    pub async fn flake_revision(&self, flake: &str) -> Option<String> {
        let cmd = self.with_env(metadata_command(flake));
        let out = exec::run(&cmd, self.eval_timeout, |_, _| {}).await.ok()?;
        let meta: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        meta.get("revision")
            .or_else(|| meta.get("locked").and_then(|l| l.get("rev")))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    }

    /// Build one derivation locally; returns its `out` path.
    pub async fn build(
        &self,
        drv: &str,
        on_line: impl FnMut(Stream, &str) + Send,
    ) -> Result<String, NixError> {
        let cmd = self.with_env(build_command(drv));
        let out = exec::run(&cmd, self.build_timeout, on_line)
            .await
            .map_err(|source| NixError::Build {
                drv: drv.to_string(),
                source,
            })?;
        parse_build_output(&out.stdout).map_err(|reason| NixError::BadOutput {
            command: cmd.display(),
            reason,
        })
    }

    /// Every store path `path` needs (it must be built or substituted).
    pub async fn closure(&self, path: &str) -> Result<Vec<String>, NixError> {
        let cmd = self.with_env(closure_command(path));
        let out = exec::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Build {
                drv: path.to_string(),
                source,
            })?;
        Ok(out
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Copy `path` and its closure to the host behind `destination_uri`.
    pub async fn copy(
        &self,
        destination_uri: &str,
        path: &str,
        ssh_opts: &str,
        substitute: bool,
        on_line: impl FnMut(Stream, &str) + Send,
    ) -> Result<(), NixError> {
        let cmd = self.with_env(copy_command(destination_uri, path, ssh_opts, substitute));
        exec::run(&cmd, self.copy_timeout, on_line)
            .await
            .map_err(|source| NixError::Copy {
                path: path.to_string(),
                destination: destination_uri.to_string(),
                source,
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(cmd: &Cmd) -> Vec<String> {
        std::iter::once(cmd.program().to_string())
            .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
            .collect()
    }

    #[test]
    fn eval_is_one_command_with_features_and_no_new_flags() {
        let cmd = eval_command("path:/srv/fleet");
        let args = argv(&cmd);
        assert_eq!(
            args[..6],
            [
                "nix",
                "--extra-experimental-features",
                "nix-command flakes",
                "eval",
                "--json",
                "path:/srv/fleet#nixosConfigurations"
            ]
        );
        assert_eq!(args[6], "--apply");
        assert!(!args.iter().any(|a| a == "--print-out-paths"));
        assert!(!FLEET_APPLY_EXPR.contains("outPath ="));
    }

    #[test]
    fn build_and_copy_commands() {
        assert_eq!(
            argv(&build_command("/nix/store/abc-x.drv"))[3..],
            ["build", "--no-link", "--json", "/nix/store/abc-x.drv"]
        );
        let copy = copy_command(
            "ssh://root@web1",
            "/nix/store/abc-x",
            "-F /etc/ssh_cfg",
            false,
        );
        assert_eq!(
            argv(&copy)[3..],
            ["copy", "--to", "ssh://root@web1", "/nix/store/abc-x"]
        );
        assert_eq!(copy.get_env("NIX_SSHOPTS"), Some("-F /etc/ssh_cfg"));
        assert_eq!(
            argv(&closure_command("/nix/store/abc-x")),
            ["nix-store", "--query", "--requisites", "/nix/store/abc-x"]
        );
        let copy = copy_command("ssh://web1", "/nix/store/abc-x", "", true);
        assert!(argv(&copy).contains(&"--substitute-on-destination".to_string()));
    }

    #[test]
    fn parses_build_json() {
        let json = r#"[{"drvPath":"/nix/store/c7-h1.drv","outputs":{"out":"/nix/store/q4-h1"}}]"#;
        assert_eq!(parse_build_output(json).unwrap(), "/nix/store/q4-h1");
        assert!(parse_build_output("[]").is_err());
        assert!(parse_build_output("nope").is_err());
    }

    #[test]
    fn rejects_bad_flake_refs() {
        assert!(check_flake_ref(".").is_ok());
        assert!(check_flake_ref("github:me/fleet").is_ok());
        assert!(check_flake_ref(".#web1").is_err());
        assert!(check_flake_ref("--impure").is_err());
        assert!(check_flake_ref("").is_err());
    }
}
