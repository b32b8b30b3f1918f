//! # nix-deploy
//!
//! A NixOS fleet deployment coordinator: evaluates a flake's
//! `nixosConfigurations` once, asks every host what it runs, and deploys only
//! what changed, step by step, with rollback and a full history.
//!
//! This crate does the IO around the pure core ([`nix_deploy_core`]: the
//! model, options and report documents, the planner, remote command builders).
//! `ARCHITECTURE.md` has the map; in short:
//!
//! - [`process`]: the one place that spawns local processes.
//! - [`nix`]: the local Nix (the one evaluation, builds, copies), through `process`.
//! - [`git`]: where a branch of a git remote points (pull mode), through `process`.
//! - [`transport`]: SSH master connections to hosts; HTTP for health checks.
//! - [`store`]: the SQLite history (deployments, host runs, events, leases).
//! - [`engine`]: probing, planning and deploying; one host's pipeline;
//!   recovery; blue-green; resume; rollback on request.
//! - [`daemon`]: `nix-deploy serve`: HTTP API, event streams, hooks,
//!   notifications, metrics. Never imports the CLI.
//! - [`cli`]: the command line, in process or through the daemon.

pub mod cli;
pub mod daemon;
pub mod engine;
pub mod git;
pub mod nix;
pub mod paths;
pub mod process;
pub mod store;
pub mod transport;

#[cfg(test)]
mod layering;

/// Milliseconds since the Unix epoch: the time of every record.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
