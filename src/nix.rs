//! Talking to the local Nix: the flake's identity, evaluating the fleet's
//! hosts (in shards, see [`nix_deploy_core::eval`]), building toplevels and
//! copying closures to hosts.
//!
//! Command lines are built by pure functions in the core
//! ([`nix_deploy_core::nix`], unit-tested there) and run through
//! [`crate::process`].

use std::time::Duration;

use std::collections::BTreeMap;

use nix_deploy_core::eval::{
    names_command, parse_names, parse_version, shard_command, version_command,
};
use nix_deploy_core::keys::Secret;
use nix_deploy_core::nix::{
    add_root_command, build_command, check_flake_ref, closure_command, copy_command,
    copy_from_command, deployment_command, key_texts_command, metadata_command, parse_build_output,
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
    #[error("reading the metadata of flake `{flake}` failed: {source}")]
    Metadata {
        flake: String,
        #[source]
        source: ExecError,
    },
    #[error("`nix --version` failed: {0}")]
    Version(#[source] ExecError),
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
    /// `what`: the path and where it was fetched from.
    #[error("fetching {what} failed: {source}")]
    Fetch {
        what: String,
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

    /// Refuse flake references we cannot append `#nixosConfigurations` to.
    pub fn check_flake(flake: &str) -> Result<(), NixError> {
        check_flake_ref(flake).map_err(|reason| NixError::BadFlakeRef {
            flake: flake.to_string(),
            reason,
        })
    }

    /// `nix flake metadata --json FLAKE`, as printed.
    pub async fn flake_metadata(&self, flake: &str) -> Result<String, NixError> {
        Self::check_flake(flake)?;
        let cmd = self.with_env(metadata_command(flake));
        let out = process::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Metadata {
                flake: flake.to_string(),
                source,
            })?;
        Ok(out.stdout)
    }

    /// The first line of `nix --version`.
    pub async fn version(&self) -> Result<String, NixError> {
        let cmd = self.with_env(version_command());
        let out = process::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .map_err(NixError::Version)?;
        parse_version(&out.stdout).map_err(|reason| NixError::BadOutput {
            command: cmd.display(),
            reason,
        })
    }

    /// The host names of `FLAKE#nixosConfigurations` (no host is evaluated).
    #[tracing::instrument(skip(self))]
    pub async fn host_names(&self, flake: &str) -> Result<Vec<String>, NixError> {
        let cmd = names_command(flake);
        let stdout = self.evaluate(flake, cmd.clone()).await?;
        parse_names(&stdout).map_err(|reason| NixError::BadOutput {
            command: cmd.display(),
            reason,
        })
    }

    /// Run an evaluation of `flake` (checked first); its stdout.
    async fn evaluate(&self, flake: &str, cmd: Cmd) -> Result<String, NixError> {
        Self::check_flake(flake)?;
        let out = process::run(&self.with_env(cmd), self.eval_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Eval {
                flake: flake.to_string(),
                source,
            })?;
        Ok(out.stdout)
    }

    /// Evaluate the given hosts of `FLAKE#nixosConfigurations` in one
    /// process, with an initial heap of `initial_heap` bytes if given; its
    /// peak memory is measured. The error is the process's, so the caller
    /// can tell a timeout from a failure and read Nix's message.
    pub async fn eval_hosts(
        &self,
        flake: &str,
        hosts: &[String],
        catch: bool,
        initial_heap: Option<u64>,
    ) -> Result<process::Output, ExecError> {
        let mut cmd = self.with_env(shard_command(flake, hosts, catch));
        if let Some(bytes) = initial_heap {
            cmd = cmd.env("GC_INITIAL_HEAP_SIZE", bytes.to_string());
        }
        process::run_measured(&cmd, self.eval_timeout, |_, _| {}).await
    }

    /// The `config.deployment` of `hosts` alone (no system is evaluated),
    /// as printed: `{ HOST = { deployment = …; } | null; … }`.
    pub async fn eval_deployments(
        &self,
        flake: &str,
        hosts: &[String],
    ) -> Result<String, NixError> {
        let cmd = deployment_command(flake, hosts).map_err(|reason| NixError::BadOutput {
            command: "nix eval (deployment metadata)".into(),
            reason,
        })?;
        self.evaluate(flake, cmd).await
    }

    /// Copy `path` and its closure from the host behind `source_uri` into
    /// the local store.
    pub async fn copy_from(
        &self,
        source_uri: &str,
        path: &str,
        ssh_opts: &str,
    ) -> Result<(), NixError> {
        let cmd = self.with_env(copy_from_command(source_uri, path, ssh_opts));
        process::run(&cmd, self.copy_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Fetch {
                what: format!("{path} from {source_uri}"),
                source,
            })?;
        Ok(())
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
