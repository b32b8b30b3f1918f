//! What one host's steps work with: [`HostContext`], shared by every host
//! task of a run, and [`HostJob`], one host's part as the scheduler hands it
//! over and gets it back.

use std::collections::BTreeMap;
use std::sync::Arc;

use nix_deploy_core::events::HostStatus;
use nix_deploy_core::fleet::{HealthCheck, Host, HostMeta, Target};
use nix_deploy_core::goal::Goal;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::remote::Activation;
use nix_deploy_core::run::HostRun;

use super::fence::HostFence;
use super::keys::KeyTexts;
use super::observe::Assessment;
use super::recorder::Recorder;
use crate::nix::Nix;
use crate::transport::ssh::{Connection, SshOptions};

/// What every host task of a run shares ([`HostContext::for_host`] makes
/// one host's own, with the options its metadata sets).
#[derive(Clone)]
pub(crate) struct HostContext {
    pub nix: Nix,
    pub ssh: SshOptions,
    pub options: DeployOptions,
    pub recorder: Recorder,
    /// The contents of the run's `text` keys, read when first needed.
    pub keys: Arc<KeyTexts>,
    /// A promotion: each target host's source host, whose system is
    /// fetched from it instead of built (empty for other runs).
    pub fetch_from: BTreeMap<String, Target>,
    /// The deployment's epoch as hosts check it: carried by every script
    /// that changes or settles a host.
    pub fence: HostFence,
}

impl HostContext {
    /// The context of `host`'s own task: its metadata's options over the
    /// deployment's (its confirm and activation timeouts; building on
    /// itself; substituting, unless `--no-substitute` turned it off).
    pub fn for_host(self: &Arc<Self>, host: &HostMeta) -> Arc<Self> {
        let mut options = self.options.clone();
        if let Some(timeout) = host.confirm_timeout {
            options.confirm_timeout = timeout;
        }
        if let Some(timeout) = host.activation_timeout {
            options.activation_timeout = timeout;
        }
        options.build_on_target |= host.build_on_target;
        if let Some(substitute) = host.substitute_on_destination {
            options.substitute_on_destination &= substitute;
        }
        if options == self.options {
            return self.clone();
        }
        Arc::new(HostContext {
            options,
            ..HostContext::clone(self)
        })
    }

    /// The goal of a host run: the deployment's, except while blue-green
    /// stages hosts (`test`; it commits them itself).
    pub fn goal(&self, activation: Activation) -> Goal {
        match activation {
            Activation::Test => Goal::Test,
            _ => self.options.goal,
        }
    }

    /// How a host run that went through its pipeline ends: `None` while
    /// blue-green has only staged it.
    pub fn success_status(&self, activation: Activation) -> Option<HostStatus> {
        match (activation, self.goal(activation)) {
            (Activation::Test, _) => None,
            (_, Goal::DryActivate | Goal::Push) => Some(HostStatus::Succeeded),
            _ => Some(HostStatus::Deployed),
        }
    }

    /// The checks this run validates with (none with `--skip-validation`).
    pub fn checks(&self, host: &Host) -> Vec<HealthCheck> {
        if self.options.skip_validation {
            Vec::new()
        } else {
            host.health_checks.clone()
        }
    }
}

/// One host's part, as the scheduler hands it over and gets it back.
pub(crate) struct HostJob {
    pub assessment: Assessment,
    pub connection: Connection,
    pub run: HostRun,
}

impl HostJob {
    /// The probe and the connection to read from while the run is written:
    /// a step borrows all three at once.
    pub fn parts(&mut self) -> (&Assessment, &mut Connection, &mut HostRun) {
        (&self.assessment, &mut self.connection, &mut self.run)
    }
}
