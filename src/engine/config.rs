//! What every run of this process shares, decided once at the edge (the CLI
//! or the daemon).

use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

use crate::nix::Nix;
use crate::transport::ssh::SshOptions;

/// What every run of this process shares, decided once at the edge (CLI or
/// daemon). What one deployment may choose is in its `DeployOptions`.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub flake: String,
    pub nix: Nix,
    pub ssh: SshOptions,
    /// Hosts probed at once.
    pub probe_limit: usize,
    /// `nix eval` processes at once; `None`: from the cores and the memory
    /// available (see `nix_deploy_core::eval::default_workers`).
    pub eval_workers: Option<usize>,
    /// Read the evaluation cache (`--no-eval-cache` turns it off; fresh
    /// results are stored either way).
    pub eval_cache: bool,
    /// `nix eval` processes of this process at once, across concurrent
    /// evaluations (the daemon's plans and deployments): sized by the first
    /// evaluation's worker count, shared by every clone of this config.
    pub(crate) eval_gate: Arc<OnceLock<Arc<Semaphore>>>,
}

impl EngineConfig {
    pub fn new(flake: String, ssh: SshOptions) -> Self {
        EngineConfig {
            flake,
            nix: Nix::default(),
            ssh,
            probe_limit: 64,
            eval_workers: None,
            eval_cache: true,
            eval_gate: Arc::default(),
        }
    }
}
