//! Reading, without changing anything, what hosts run and what the flake
//! says they should run: for the daemon's watch loop and `status --live`.
//!
//! [`observe`] is the one function through which the watch reads a host
//! (the existing probe, over the kept SSH master, then optionally one round
//! of its health checks), bounded by the SSH timeouts whatever the host
//! does. [`Engine::desired_fleet`] evaluates the tracked flake (from the
//! evaluation cache when it did not change). [`Engine::observe_fleet`] does
//! both for every host once and classifies them, for `status --live`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use nix_deploy_core::drift::History;
use nix_deploy_core::eval::EvalFailure;
use nix_deploy_core::fleet::Host;
use nix_deploy_core::watch::{FleetReport, HostWatch, Observation, assess, unobserved};

use super::health::validate;
use super::probe::{Settle, probe_host};
use super::{Engine, EngineError};
use crate::now_ms;
use crate::transport::ssh::SshOptions;

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
            return Ok(&host.toplevel);
        }
        Err(self
            .failed
            .iter()
            .find(|f| f.host == name)
            .map(|f| f.error.clone())
            .unwrap_or_else(|| format!("{name} is no longer in the flake")))
    }
}

/// Slack on top of the SSH timeouts for a whole observation: a host that
/// hangs is given up on, never waited for.
const OBSERVE_SLACK: Duration = Duration::from_secs(10);

/// Probe `host` over its kept master (never settling anything: read only)
/// and, with `health`, run each of its health checks once. Never fails and
/// never takes longer than the SSH timeouts (and the checks' own).
pub async fn observe(host: &Host, ssh: &SshOptions, health: bool) -> Observation {
    let checks_time: Duration = if health {
        host.health_checks.iter().map(|c| c.timeout).sum()
    } else {
        Duration::ZERO
    };
    let bound = ssh.connect_timeout + ssh.command_timeout + checks_time + OBSERVE_SLACK;
    let work = async {
        let (assessment, connection) = probe_host(host.clone(), ssh, Settle::No).await;
        let probe = match (assessment.probe, assessment.error) {
            (Some(probe), None) => Ok(probe),
            (_, error) => Err(error.unwrap_or_else(|| format!("{}: probe failed", host.name))),
        };
        let mut checked = None;
        if let Some(connection) = connection {
            if health && !host.health_checks.is_empty() {
                checked = Some(
                    match validate(&connection, &host.health_checks, Duration::ZERO).await {
                        Ok(_) => (true, Vec::new()),
                        Err((_, results)) => (
                            false,
                            results
                                .iter()
                                .filter(|r| !r.ok)
                                .map(|r| {
                                    format!(
                                        "{} ({})",
                                        r.check,
                                        r.output.lines().next().unwrap_or("")
                                    )
                                })
                                .collect(),
                        ),
                    },
                );
            }
            connection.close().await;
        }
        (probe, checked)
    };
    let (probe, health) = match tokio::time::timeout(bound, work).await {
        Ok(done) => done,
        Err(_) => (
            Err(format!(
                "{}: probe: no answer within {}s",
                host.name,
                bound.as_secs()
            )),
            None,
        ),
    };
    Observation {
        probe,
        health,
        at: now_ms(),
    }
}

impl Engine {
    /// Evaluate the tracked flake: every host's toplevel or its error.
    pub async fn desired_fleet(&self) -> Result<DesiredFleet, EngineError> {
        let (inventory, outcome) = self.evaluate_fleet_outcome().await?;
        Ok(DesiredFleet {
            hosts: inventory.hosts().cloned().collect(),
            failed: outcome.report.failed,
            revision: outcome.revision,
        })
    }

    /// What our finished deployments did to `host`: the systems we put
    /// there and the one we left running.
    pub async fn history_of(&self, host: &str) -> Result<History, EngineError> {
        Ok(History::from_runs(&self.store.past_runs(host, 50).await?))
    }

    /// Every host now: evaluate, probe and check each (at most
    /// `probe_limit` at once), and classify them against `previous` (the
    /// last stored state) and our history. Records nothing.
    pub async fn observe_fleet(&self, previous: &[HostWatch]) -> Result<FleetReport, EngineError> {
        let desired = self.desired_fleet().await;
        let (fleet, evaluation_error) = match desired {
            Ok(fleet) => (fleet, None),
            Err(e) => (DesiredFleet::default(), Some(e.to_string())),
        };
        let before: BTreeMap<&str, &HostWatch> =
            previous.iter().map(|h| (h.name.as_str(), h)).collect();
        let semaphore = Arc::new(Semaphore::new(self.config.probe_limit.max(1)));
        let mut tasks = JoinSet::new();
        for host in fleet.hosts.iter().cloned() {
            let semaphore = semaphore.clone();
            let ssh = self.config.ssh.clone();
            tasks.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                let observation = observe(&host, &ssh, true).await;
                (host, observation)
            });
        }
        let mut hosts = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (host, observation) =
                joined.map_err(|e| EngineError::Internal(format!("probe task failed: {e}")))?;
            let previous = before.get(host.name.as_str()).map_or_else(
                || HostWatch {
                    name: host.name.clone(),
                    ..HostWatch::default()
                },
                |h| (*h).clone(),
            );
            let history = self.history_of(&host.name).await?;
            let mut state = assess(&previous, Ok(&host.toplevel), &observation, &history);
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
            let previous = before.get(name).map_or_else(
                || HostWatch {
                    name: name.to_string(),
                    ..HostWatch::default()
                },
                |h| (*h).clone(),
            );
            hosts.push(unobserved(&previous, &error, now));
        }
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(FleetReport {
            generated_at: now_ms(),
            watching: false,
            interval_seconds: None,
            flake: self.config.flake.clone(),
            revision: fleet.revision,
            evaluated_at: Some(now_ms()),
            evaluation_error,
            branch: None,
            hosts,
        })
    }
}
