//! Reading, without changing anything, what hosts run and what the flake
//! says they should run: for the daemon's watch loop and `status --live`.
//!
//! [`Engine::observe_host`] reads one host through the one reader of what
//! a host runs (`host::observe`), never settling anything, bounded by the
//! SSH timeouts whatever the host does. [`Engine::desired_fleet`] evaluates
//! the tracked flake (from the evaluation cache when it did not change).
//! [`Engine::observe_fleet`] does both for every host once and classifies
//! them, for `status --live`. Nothing here records anything.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use nix_deploy_core::drift::History;
use nix_deploy_core::eval::EvalFailure;
use nix_deploy_core::fleet::{Host, Selection};
use nix_deploy_core::watch::{FleetReport, HostWatch, Observation, assess, unobserved};

use super::Engine;
use crate::engine::EngineError;
use crate::engine::fleet::evaluate::{self, Systems};
use crate::engine::host::observe;
use crate::now_ms;

/// How many of a host's past runs drift is judged against.
const HISTORY_RUNS: i64 = 50;

/// What the flake says the fleet should run.
#[derive(Clone, Debug, Default)]
pub struct DesiredFleet {
    /// The hosts that evaluated, with their toplevels.
    pub hosts: Vec<Host>,
    /// The hosts that did not, each with Nix's error.
    pub failed: Vec<EvalFailure>,
    pub revision: Option<String>,
}

impl DesiredFleet {
    /// A host's desired toplevel, or why it is unknown.
    pub fn toplevel(&self, name: &str) -> Result<&str, String> {
        if let Some(host) = self.hosts.iter().find(|h| h.name == name) {
            return Ok(host.toplevel());
        }
        Err(self
            .failed
            .iter()
            .find(|f| f.host == name)
            .map(|f| f.error.clone())
            .unwrap_or_else(|| format!("{name} is no longer in the flake")))
    }
}

impl Engine {
    /// Evaluate the tracked flake: every host's toplevel or its error (a
    /// host's metadata error is its own). Hosts with `targetHost = null`
    /// are not watched: nothing reaches them over SSH (`apply-local`
    /// deploys them on themselves).
    pub async fn desired_fleet(&self) -> Result<DesiredFleet, EngineError> {
        let everyone = Selection {
            all: true,
            ..Selection::default()
        };
        let evaluation = evaluate::evaluate_fleet(self.fleet(), Systems::Of(&everyone)).await?;
        let mut failed = evaluation.report.failed;
        let mut hosts = Vec::new();
        for meta in evaluation.inventory.hosts() {
            if meta.target.destination.is_none() {
                continue;
            }
            match evaluation.systems.get(&meta.name) {
                Some(system) => hosts.push(Host {
                    meta: meta.clone(),
                    system: system.clone(),
                }),
                None if !failed.iter().any(|f| f.host == meta.name) => failed.push(EvalFailure {
                    host: meta.name.clone(),
                    error: format!("the system of `{}` was not evaluated", meta.name),
                }),
                None => {}
            }
        }
        Ok(DesiredFleet {
            hosts,
            failed,
            revision: evaluation.revision,
        })
    }

    /// Read what `host` runs (and, with `health`, run its checks once),
    /// over its kept master: never settles anything, never fails, bounded.
    pub async fn observe_host(&self, host: &Host, health: bool) -> Observation {
        observe::observe(host, &self.config.ssh, health).await
    }

    /// What our finished deployments did to `host`: the systems we put
    /// there and the one we left running.
    pub async fn history_of(&self, host: &str) -> Result<History, EngineError> {
        Ok(History::from_runs(
            &self.store.past_runs(host, HISTORY_RUNS).await?,
        ))
    }

    /// Every host now: evaluate, probe and check each (at most
    /// `probe_limit` at once), and classify them against `previous` (the
    /// last stored state) and our history. Records nothing.
    pub async fn observe_fleet(&self, previous: &[HostWatch]) -> Result<FleetReport, EngineError> {
        let (fleet, evaluation_error) = match self.desired_fleet().await {
            Ok(fleet) => (fleet, None),
            Err(e) => (DesiredFleet::default(), Some(e.to_string())),
        };
        let before: BTreeMap<&str, &HostWatch> =
            previous.iter().map(|h| (h.name.as_str(), h)).collect();
        let last_known = |name: &str| {
            before.get(name).map_or_else(
                || HostWatch {
                    name: name.to_string(),
                    ..HostWatch::default()
                },
                |h| (*h).clone(),
            )
        };
        let semaphore = Arc::new(Semaphore::new(self.config.probe_limit.max(1)));
        let mut tasks = JoinSet::new();
        for host in fleet.hosts.iter().cloned() {
            let semaphore = semaphore.clone();
            let ssh = self.config.ssh.clone();
            tasks.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                let observation = observe::observe(&host, &ssh, true).await;
                (host, observation)
            });
        }
        let mut hosts = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (host, observation) =
                joined.map_err(|e| EngineError::Internal(format!("probe task failed: {e}")))?;
            let history = self.history_of(&host.name).await?;
            let mut state = assess(
                &last_known(&host.name),
                Ok(host.toplevel()),
                &observation,
                &history,
            );
            state.tags = host.tags.clone();
            hosts.push(state);
        }
        // Hosts we cannot evaluate (or a flake that does not) are reported
        // as last known, with why their desired system is unknown.
        let now = now_ms();
        let mut unknown: Vec<(&str, String)> = fleet
            .failed
            .iter()
            .map(|f| (f.host.as_str(), f.error.clone()))
            .collect();
        if let Some(error) = &evaluation_error {
            unknown.extend(previous.iter().map(|h| (h.name.as_str(), error.clone())));
        }
        for (name, error) in unknown {
            hosts.push(unobserved(&last_known(name), &error, now));
        }
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(FleetReport {
            generated_at: now,
            flake: self.config.flake.clone(),
            revision: fleet.revision,
            evaluated_at: Some(now),
            evaluation_error,
            hosts,
            ..FleetReport::default()
        })
    }
}
