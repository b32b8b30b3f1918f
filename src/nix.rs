//! Talking to the local Nix: one evaluation of the whole fleet, building
//! toplevels and copying closures to hosts.
//!
//! Command lines are built by pure functions in the core
//! ([`nix_deploy_core::nix`], unit-tested there) and run through
//! [`crate::process`].

use std::time::Duration;

use std::collections::BTreeMap;

use nix_deploy_core::keys::Secret;
use nix_deploy_core::nix::{
    add_root_command, build_command, check_flake_ref, closure_command, copy_command, eval_command,
    key_texts_command, metadata_command, parse_build_output,
};

use crate::process::{self, Cmd, ExecError, Stream};

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

impl Nix {
    fn with_env(&self, mut cmd: Cmd) -> Cmd {
        for (k, v) in &self.env {
            cmd = cmd.env(k, v);
        }
        cmd
    }

    /// The one evaluation of the fleet; returns Nix's JSON for [`nix_deploy_core::fleet`].
    #[tracing::instrument(skip(self))]
    pub async fn eval_fleet(&self, flake: &str) -> Result<String, NixError> {
        check_flake_ref(flake).map_err(|reason| NixError::BadFlakeRef {
            flake: flake.to_string(),
            reason,
        })?;
        let cmd = self.with_env(eval_command(flake));
        let out = process::run(&cmd, self.eval_timeout, |_, _| {})
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
        let out = process::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .ok()?;
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
        let out = process::run(&cmd, self.build_timeout, on_line)
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
        let out = process::run(&cmd, self.eval_timeout, |_, _| {})
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

    /// The `text` of the keys of `hosts` that have one, in one evaluation:
    /// host → key attribute → contents. The evaluation's output is read as
    /// bytes and never logged; errors carry Nix's stderr only.
    pub async fn key_texts(
        &self,
        flake: &str,
        hosts: &[String],
    ) -> Result<BTreeMap<String, BTreeMap<String, Secret>>, NixError> {
        let cmd = key_texts_command(flake, hosts).map_err(|reason| NixError::BadOutput {
            command: "nix eval (key texts)".into(),
            reason,
        })?;
        let cmd = self.with_env(cmd);
        let out = process::run_bytes(&cmd, self.eval_timeout)
            .await
            .map_err(|source| NixError::Eval {
                flake: flake.to_string(),
                source,
            })?;
        let texts: BTreeMap<String, BTreeMap<String, String>> = serde_json::from_slice(&out)
            .map_err(|e| NixError::BadOutput {
                command: "nix eval (key texts)".into(),
                // serde's message names a position, never the contents.
                reason: format!("not a JSON object of key texts: {e}"),
            })?;
        Ok(texts
            .into_iter()
            .map(|(host, keys)| {
                let keys = keys
                    .into_iter()
                    .map(|(attr, text)| (attr, Secret::new(text.into_bytes())))
                    .collect();
                (host, keys)
            })
            .collect())
    }

    /// Make `link` a garbage-collector root for the (valid) store path `path`.
    pub async fn add_root(&self, path: &str, link: &str) -> Result<(), NixError> {
        let cmd = self.with_env(add_root_command(path, link));
        process::run(&cmd, Duration::from_secs(120), |_, _| {})
            .await
            .map_err(|source| NixError::Build {
                drv: path.to_string(),
                source,
            })?;
        Ok(())
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
        process::run(&cmd, self.copy_timeout, on_line)
            .await
            .map_err(|source| NixError::Copy {
                path: path.to_string(),
                destination: destination_uri.to_string(),
                source,
            })?;
        Ok(())
    }
}
