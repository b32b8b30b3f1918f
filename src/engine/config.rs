//! What every run of this process shares, decided once at the edge (the CLI
//! or the daemon): the flake, Nix and SSH settings, the [`Policy`] of
//! maintenance windows and approval rules every deployment obeys, and the
//! [`Limit`] of a caller that may touch only some hosts.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

use nix_deploy_core::approval::ApprovalRule;
use nix_deploy_core::fleet::HostMeta;
use nix_deploy_core::select::HostFilter;
use nix_deploy_core::source::FleetSource;
use nix_deploy_core::window::Windows;

use super::EngineError;
use crate::nix::Nix;
use crate::transport::ssh::SshOptions;

/// What every run of this process shares, decided once at the edge (CLI or
/// daemon). What one deployment may choose is in its `DeployOptions`.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub flake: String,
    /// `--source`: where the fleet is read from; `None`: detected from the
    /// flake's outputs ([`nix_deploy_core::source`]).
    pub source: Option<FleetSource>,
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
    /// Maintenance windows and approval rules every deployment obeys.
    pub policy: Arc<Policy>,
    /// The hosts this engine may touch (a limited token or chat user).
    pub limit: Option<Limit>,
}

impl EngineConfig {
    pub fn new(flake: String, ssh: SshOptions) -> Self {
        EngineConfig {
            flake,
            source: None,
            nix: Nix::default(),
            ssh,
            probe_limit: 64,
            eval_workers: None,
            eval_cache: true,
            eval_gate: Arc::default(),
            policy: Arc::default(),
            limit: None,
        }
    }

    /// Refuse hosts outside this engine's reach (a token or chat user
    /// limited to some hosts), before anything is recorded or touched.
    pub(crate) fn check_limit<'a>(
        &self,
        hosts: impl IntoIterator<Item = &'a HostMeta>,
    ) -> Result<(), EngineError> {
        let Some(limit) = &self.limit else {
            return Ok(());
        };
        let outside: BTreeSet<&str> = hosts
            .into_iter()
            .filter(|h| !limit.allows(&h.name, &h.tags))
            .map(|h| h.name.as_str())
            .collect();
        if outside.is_empty() {
            return Ok(());
        }
        Err(EngineError::Forbidden(format!(
            "{} may only touch {}; not {}",
            limit.who,
            limit.describe(),
            outside.into_iter().collect::<Vec<_>>().join(", ")
        )))
    }
}

/// The rules every deployment of this process obeys: windows and approval
/// rules, from the daemon's configuration (which the CLI reads too).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub windows: Windows,
    pub approvals: Vec<ApprovalRule>,
}

/// Whom an engine works for, when that is not everyone: a token or chat
/// user limited to some hosts.
#[derive(Clone, Debug)]
pub struct Limit {
    /// For messages: `token \`staging\``.
    pub who: String,
    /// Every filter must select a host (a chat user's and a channel's).
    pub hosts: Vec<HostFilter>,
}

impl Limit {
    pub fn allows(&self, name: &str, tags: &[String]) -> bool {
        self.hosts.iter().all(|f| f.matches(name, tags))
    }

    pub fn describe(&self) -> String {
        self.hosts
            .iter()
            .map(HostFilter::describe)
            .collect::<Vec<_>>()
            .join(" and ")
    }
}
