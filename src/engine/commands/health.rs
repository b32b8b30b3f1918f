//! `health HOST`: probe one host and run its health checks now.

use std::time::Duration;

use nix_deploy_core::reports::HostHealth;

use super::Engine;
use crate::engine::EngineError;
use crate::engine::fleet::evaluate;
use crate::engine::host::health;
use crate::engine::host::observe::{Settle, probe_host};

impl Engine {
    /// Probe one host and run its health checks once (retrying within `within`).
    pub async fn check_health(
        &self,
        host_name: &str,
        within: Duration,
    ) -> Result<HostHealth, EngineError> {
        let host = evaluate::evaluated_host(self.fleet(), host_name).await?;
        let (assessment, connection) = probe_host(host.clone(), &self.config.ssh, Settle::No).await;
        let Some(connection) = connection else {
            return Ok(HostHealth {
                host: host.name.clone(),
                reachable: false,
                current: assessment.current,
                state: assessment.state,
                healthy: false,
                results: Vec::new(),
                error: assessment.error,
            });
        };
        let outcome = health::validate(&connection, &host.health_checks, within).await;
        connection.close().await;
        let (healthy, results, error) = match outcome {
            Ok(results) => (true, results, None),
            Err((message, results)) => (false, results, Some(message)),
        };
        Ok(HostHealth {
            host: host.name.clone(),
            reachable: true,
            current: assessment.current,
            state: assessment.state,
            healthy,
            results,
            error,
        })
    }
}
