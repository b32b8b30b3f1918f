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
    self, FlakeIdentity, fleet_command, parse_version, shard_command, version_command,
};
use nix_deploy_core::keys::Secret;
use nix_deploy_core::nix::{
    NixFlags, add_root_command, build_command, check_flake_ref, closure_command, copy_command,
    copy_derivation_command, copy_from_command, flakes_probe_command, key_texts_command,
    metadata_command, parse_build_output, probe_path_command, show_config_command,
};
use nix_deploy_core::source::FleetSource;

use crate::process::{self, Cmd, ExecError, Stream};

/// The most key texts one evaluation may print, as JSON: every key is at
/// most 1 MiB, and a run's texts are read once for all its hosts.
pub const MAX_KEY_TEXTS_BYTES: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("evaluating the fleet of `{flake}` failed: {source}")]
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
    /// The user's expression did not evaluate; Nix's error says why (the
    /// command line, with our wrapper, would only hide it).
    #[error("the expression did not evaluate: {}", nix_said(.source))]
    Expression { source: ExecError },
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
    /// A `--nix-option`, `--impure` or `--show-trace` we cannot pass on.
    #[error("{0}")]
    BadFlag(String),
    #[error("`nix show-config` failed: {0}")]
    Config(#[source] ExecError),
    /// The fleet's outputs do not read ([`nix_deploy_core::source`]).
    #[error("{0}")]
    Fleet(String),
}

/// What Nix said when a command failed: its stderr, else the failure itself
/// (it did not start, or timed out).
fn nix_said(error: &ExecError) -> String {
    match error {
        ExecError::Exit { stderr_tail, .. } if !stderr_tail.trim().is_empty() => {
            stderr_tail.trim().to_string()
        }
        other => other.to_string(),
    }
}

/// How we call Nix: extra environment (for tests and the demo, e.g. `NIX_CONFIG`),
/// the user's flags for every invocation, timeouts and remote builders.
#[derive(Clone, Debug)]
pub struct Nix {
    pub env: Vec<(String, String)>,
    /// `--show-trace`, `--impure`, `--nix-option`: added to every local Nix
    /// command (`--impure` to evaluations and builds only).
    pub flags: NixFlags,
    /// `--builders`: Nix's `builders` for our local builds (a machines
    /// specification, or `@FILE`); `None`: Nix's own setting, or the fleet's
    /// `meta.machinesFile`.
    pub builders: Option<String>,
    pub eval_timeout: Duration,
    pub build_timeout: Duration,
    pub copy_timeout: Duration,
}

impl Default for Nix {
    fn default() -> Self {
        Nix {
            env: Vec::new(),
            flags: NixFlags::default(),
            builders: None,
            eval_timeout: Duration::from_secs(600),
            build_timeout: Duration::from_secs(3600),
            copy_timeout: Duration::from_secs(1800),
        }
    }
}

/// What a command does, for the flags it takes.
#[derive(Clone, Copy)]
enum Kind {
    /// Evaluates or builds: every flag.
    Eval,
    /// Reads or copies store paths: no `--impure`.
    Store,
    /// `nix --version`: no flags.
    Plain,
}

impl Nix {
    /// This Nix, building on the fleet's remote builders (colmena's
    /// `meta.machinesFile`) unless `--builders` chose others.
    pub fn for_fleet(&self, meta: &nix_deploy_core::source::FleetMeta) -> Nix {
        let mut nix = self.clone();
        if nix.builders.is_none() {
            nix.builders = meta.machines_file.as_ref().map(|file| format!("@{file}"));
        }
        nix
    }

    /// The command with our environment and the user's flags.
    fn prepare(&self, cmd: Cmd, kind: Kind) -> Cmd {
        let flags = match kind {
            Kind::Eval => self.flags.eval_args(),
            Kind::Store => self.flags.store_args(),
            Kind::Plain => Vec::new(),
        };
        let mut cmd = cmd.args(flags);
        for (k, v) in &self.env {
            cmd = cmd.env(k, v);
        }
        cmd
    }

    /// What of the user's flags changes evaluation results, with the Nix
    /// version: the part of cache keys that is about how Nix is called.
    pub fn evaluation_tag(&self, version: &str) -> String {
        match self.flags.evaluation_tag() {
            tag if tag.is_empty() => version.to_string(),
            tag => format!("{version} {tag}"),
        }
    }

    /// Refuse `--nix-option` settings this Nix does not know.
    pub async fn check_options(&self) -> Result<(), NixError> {
        self.flags.check().map_err(NixError::BadFlag)?;
        if self.flags.options.is_empty() {
            return Ok(());
        }
        let cmd = self.prepare(show_config_command(), Kind::Store);
        let out = process::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .map_err(NixError::Config)?;
        self.flags
            .check_known(&out.stdout)
            .map_err(NixError::BadFlag)
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
        let cmd = self.prepare(metadata_command(flake), Kind::Store);
        let out = process::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Metadata {
                flake: flake.to_string(),
                source,
            })?;
        Ok(out.stdout)
    }

    /// What identifies `flake`'s content, from its metadata (`metadata`, as
    /// [`Nix::flake_metadata`] gave it), or in one line why nothing does.
    pub fn identity(metadata: &Result<String, NixError>) -> Result<FlakeIdentity, String> {
        match metadata {
            Ok(json) => {
                let lock_file =
                    eval::lock_file_path(json).and_then(|path| std::fs::read_to_string(path).ok());
                FlakeIdentity::from_metadata(json, lock_file.as_deref())
            }
            Err(e) => Err(format!("{e}")
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()),
        }
    }

    /// Where `flake` keeps its fleet: `forced` (`--source`), checked to be
    /// there, or detected ([`nix_deploy_core::source::parse_fleet`]).
    pub async fn fleet_source(
        &self,
        flake: &str,
        forced: Option<FleetSource>,
    ) -> Result<FleetSource, NixError> {
        let identity = Self::identity(&self.flake_metadata(flake).await);
        let text = match &identity {
            Ok(identity) => self.fleet(&identity.pinned_ref, true).await?,
            Err(_) => self.fleet(flake, false).await?,
        };
        nix_deploy_core::source::parse_fleet(&text, forced)
            .map(|index| index.source)
            .map_err(NixError::Fleet)
    }

    /// The first line of `nix --version`.
    pub async fn version(&self) -> Result<String, NixError> {
        let cmd = self.prepare(version_command(), Kind::Plain);
        let out = process::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .map_err(NixError::Version)?;
        parse_version(&out.stdout).map_err(|reason| NixError::BadOutput {
            command: cmd.display(),
            reason,
        })
    }

    /// Which fleet sources the flake has, their host names and colmena's
    /// meta, as printed (no host is evaluated; read it with
    /// [`nix_deploy_core::source::parse_fleet`]). `pinned`: `flake` is locked.
    #[tracing::instrument(skip(self))]
    pub async fn fleet(&self, flake: &str, pinned: bool) -> Result<String, NixError> {
        Self::check_flake(flake)?;
        let cmd = self.prepare(fleet_command(flake, pinned), Kind::Eval);
        let out = process::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Eval {
                flake: flake.to_string(),
                source,
            })?;
        Ok(out.stdout)
    }

    /// Evaluate the given hosts of the fleet in one process (each with its
    /// system when wanted), with an initial heap of `initial_heap` bytes if
    /// given; its peak memory is measured. The error is the process's, so the
    /// caller can tell a timeout from a failure and read Nix's message.
    pub async fn eval_hosts(
        &self,
        flake: &str,
        source: FleetSource,
        hosts: &[(String, bool)],
        catch: bool,
        initial_heap: Option<u64>,
    ) -> Result<process::Output, ExecError> {
        let mut cmd = self.prepare(shard_command(flake, source, hosts, catch), Kind::Eval);
        if let Some(bytes) = initial_heap {
            cmd = cmd.env("GC_INITIAL_HEAP_SIZE", bytes.to_string());
        }
        process::run_measured(&cmd, self.eval_timeout, |_, _| {}).await
    }

    /// Copy `path` and its closure from the host behind `source_uri` into
    /// the local store.
    pub async fn copy_from(
        &self,
        source_uri: &str,
        path: &str,
        ssh_opts: &str,
    ) -> Result<(), NixError> {
        let cmd = self.prepare(copy_from_command(source_uri, path, ssh_opts), Kind::Store);
        process::run(&cmd, self.copy_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Fetch {
                what: format!("{path} from {source_uri}"),
                source,
            })?;
        Ok(())
    }

    /// `nix-deploy eval`: the user's expression against the fleet of
    /// `source` ([`nix_deploy_core::introspect`]); Nix's JSON, as printed.
    pub async fn eval_expression(
        &self,
        flake: &str,
        source: FleetSource,
        expression: &str,
    ) -> Result<String, NixError> {
        Self::check_flake(flake)?;
        nix_deploy_core::introspect::check_expression(expression).map_err(NixError::BadFlag)?;
        let cmd = self.prepare(
            nix_deploy_core::introspect::eval_command(flake, source, expression),
            Kind::Eval,
        );
        let out = process::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Expression { source })?;
        Ok(out.stdout.trim_end().to_string())
    }

    /// Build one derivation locally (on [`Nix::builders`] when set); returns
    /// its `out` path.
    pub async fn build(
        &self,
        drv: &str,
        on_line: impl FnMut(Stream, &str) + Send,
    ) -> Result<String, NixError> {
        let cmd = self.prepare(build_command(drv, self.builders.as_deref()), Kind::Eval);
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
        let cmd = self.prepare(closure_command(path), Kind::Store);
        let out = process::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Build {
                drv: path.to_string(),
                source,
            })?;
        Ok(nix_deploy_core::summary::closure_paths(&out.stdout))
    }

    /// The `text` of the keys of `hosts` that have one, in one evaluation
    /// (at most [`MAX_KEY_TEXTS_BYTES`] of JSON):
    /// host → key attribute → contents. The evaluation's output is read as
    /// bytes and never logged; errors carry Nix's stderr only.
    pub async fn key_texts(
        &self,
        flake: &str,
        source: FleetSource,
        hosts: &[String],
    ) -> Result<BTreeMap<String, BTreeMap<String, Secret>>, NixError> {
        let cmd =
            key_texts_command(flake, source, hosts).map_err(|reason| NixError::BadOutput {
                command: "nix eval (key texts)".into(),
                reason,
            })?;
        let cmd = self.prepare(cmd, Kind::Eval);
        let out = process::run_bytes(&cmd, self.eval_timeout, MAX_KEY_TEXTS_BYTES)
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

    /// `doctor`: a tiny input-addressed store path, new for `nonce`.
    pub async fn build_probe_path(&self, nonce: u64) -> Result<String, NixError> {
        let cmd = self.prepare(probe_path_command(nonce), Kind::Store);
        let out = process::run(&cmd, self.build_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Build {
                drv: "doctor's probe path".into(),
                source,
            })?;
        parse_build_output(&out.stdout).map_err(|reason| NixError::BadOutput {
            command: cmd.display(),
            reason,
        })
    }

    /// `doctor`: whether the user's own Nix has flakes (see
    /// [`nix_deploy_core::nix::flakes_probe_command`]): Nix's output, or its error.
    pub async fn flakes_probe(&self) -> Result<String, String> {
        let cmd = self.prepare(flakes_probe_command(), Kind::Plain);
        process::run(&cmd, self.eval_timeout, |_, _| {})
            .await
            .map(|out| out.stdout)
            .map_err(|e| nix_said(&e))
    }

    /// Make `link` a garbage-collector root for the (valid) store path `path`.
    pub async fn add_root(&self, path: &str, link: &str) -> Result<(), NixError> {
        let cmd = self.prepare(add_root_command(path, link), Kind::Store);
        process::run(&cmd, Duration::from_secs(120), |_, _| {})
            .await
            .map_err(|source| NixError::Build {
                drv: path.to_string(),
                source,
            })?;
        Ok(())
    }

    /// Copy the derivation `drv` and its closure (not its outputs) to the
    /// host behind `destination_uri`, to be built there.
    pub async fn copy_derivation(
        &self,
        destination_uri: &str,
        drv: &str,
        ssh_opts: &str,
    ) -> Result<(), NixError> {
        let cmd = self.prepare(
            copy_derivation_command(destination_uri, drv, ssh_opts),
            Kind::Store,
        );
        process::run(&cmd, self.copy_timeout, |_, _| {})
            .await
            .map_err(|source| NixError::Copy {
                path: drv.to_string(),
                destination: destination_uri.to_string(),
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
        let cmd = self.prepare(
            copy_command(destination_uri, path, ssh_opts, substitute),
            Kind::Store,
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use nix_deploy_core::source::FleetMeta;

    #[test]
    fn builds_use_the_fleets_machines_file_unless_builders_are_given() {
        let meta = FleetMeta {
            allow_apply_all: true,
            machines_file: Some("/etc/nix/machines".into()),
        };
        assert_eq!(
            Nix::default().for_fleet(&meta).builders.as_deref(),
            Some("@/etc/nix/machines")
        );
        let given = Nix {
            builders: Some("ssh://b x86_64-linux".into()),
            ..Nix::default()
        };
        assert_eq!(
            given.for_fleet(&meta).builders.as_deref(),
            Some("ssh://b x86_64-linux")
        );
        assert_eq!(
            Nix::default().for_fleet(&FleetMeta::default()).builders,
            None
        );
    }
}
