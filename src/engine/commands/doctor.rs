//! `doctor`'s fleet checks: the flake evaluates (which hosts, which do not),
//! and each selected host is reachable as its `targetUser`, has the
//! privileges deployments need (root, or `sudo -n`), and accepts a copy of a
//! tiny store path the way a deployment copies a closure (through its
//! nix-daemon, which must trust a non-root user). That path is the only
//! thing doctor leaves on a host (a few bytes, no references, collected by
//! the host's next garbage collection). Nothing is recorded.
//!
//! The verdicts and their fixes are the core's ([`nix_deploy_core::doctor`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use nix_deploy_core::doctor::{self, Finding};
use nix_deploy_core::fleet::{Host, Selection};
use nix_deploy_core::options::DeployOptions;

use super::Engine;
use crate::engine::EngineError;
use crate::engine::fleet::prepare::{self, Purpose};
use crate::nix::Nix;
use crate::transport::ssh::{self, Connection, SshOptions};

/// How long `true` and `sudo -n true` may take on a host.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

impl Engine {
    /// The flake's and every selected host's findings. An error only for bad
    /// input that is not the flake's fault (a selector that matches nothing);
    /// a flake that does not evaluate is a finding.
    pub async fn doctor(&self, selection: &Selection) -> Result<Vec<Finding>, EngineError> {
        let flake = self.config.flake.clone();
        let prepared = match prepare::prepare(
            self.fleet(),
            selection,
            &DeployOptions::default(),
            Purpose::DOCTOR,
        )
        .await
        {
            Ok(prepared) => prepared,
            Err(e @ (EngineError::Inventory(_) | EngineError::Options(_))) => return Err(e),
            Err(e) => {
                return Ok(vec![doctor::flake(&flake, Err(&e.to_string()), false)]);
            }
        };
        let source = prepared.index.source;
        let mut findings = vec![doctor::flake(
            &flake,
            Ok((prepared.evaluation.hosts, source)),
            false,
        )];
        for failure in &prepared.evaluation.failed {
            findings.push(doctor::evaluation(&failure.host, &failure.error, source));
        }
        for name in &prepared.local_only {
            findings.push(doctor::skipped(
                name,
                "reachable",
                "deployment.targetHost is null: it is not reached over SSH (`apply-local` on it deploys it)",
            ));
        }
        if prepared.hosts.is_empty() {
            return Ok(findings);
        }
        // One path for every host, new for this run.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let probe_path = self
            .config
            .nix
            .build_probe_path(nonce)
            .await
            .map_err(|e| e.to_string());
        let limit = Arc::new(Semaphore::new(self.config.probe_limit.max(1)));
        let mut checks = JoinSet::new();
        for host in prepared.hosts {
            let (nix, ssh, limit, probe_path) = (
                self.config.nix.clone(),
                self.config.ssh.clone(),
                limit.clone(),
                probe_path.clone(),
            );
            checks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                check_host(&nix, &ssh, &host, &probe_path).await
            });
        }
        let mut by_host = Vec::new();
        while let Some(joined) = checks.join_next().await {
            by_host.push(
                joined.map_err(|e| EngineError::Internal(format!("doctor task failed: {e}")))?,
            );
        }
        by_host.sort_by(|a: &Vec<Finding>, b| a[0].host.cmp(&b[0].host));
        findings.extend(by_host.into_iter().flatten());
        Ok(findings)
    }
}

/// One host: reachable, privileges, copy (each only when the one before
/// passed).
async fn check_host(
    nix: &Nix,
    options: &SshOptions,
    host: &Host,
    probe_path: &Result<String, String>,
) -> Vec<Finding> {
    let name = host.name.as_str();
    let target = &host.target;
    // `targetUser = null`: whoever the ssh configuration says.
    let user = target.user.as_deref().unwrap_or("(the ssh config's user)");
    let destination = target.describe();
    let cause = |e: &dyn std::fmt::Display| {
        let text = e.to_string();
        text.strip_prefix(&format!("{name}: "))
            .unwrap_or(&text)
            .to_string()
    };
    // A new connection: a kept master would prove nothing about logging in.
    let connection = match Connection::connect_new(name, target, options).await {
        Ok(connection) => connection,
        Err(e) => {
            return vec![
                doctor::reachable(name, user, destination, Err(&cause(&e))),
                doctor::skipped(name, "privileges", "the host is not reachable"),
                doctor::skipped(name, "copy", "the host is not reachable"),
            ];
        }
    };
    let mut findings = Vec::new();
    let logged_in = connection
        .run("reachable", &["true".to_string()], CHECK_TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|e| cause(&e));
    findings.push(doctor::reachable(
        name,
        user,
        destination,
        borrowed(&logged_in),
    ));
    if logged_in.is_err() {
        connection.close().await;
        return findings;
    }
    let sudo = connection
        .run_privileged("privileges", &["true".to_string()], CHECK_TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|e| cause(&e));
    findings.push(doctor::privileges(name, user, borrowed(&sudo)));
    match probe_path {
        Err(e) => findings.push(doctor::skipped(
            name,
            "copy",
            &format!("the probe path could not be built on this machine: {e}"),
        )),
        Ok(path) => {
            let copied = match (
                ssh::nix_ssh_opts(target, options, connection.control_socket()),
                target.store_uri(),
            ) {
                (Err(e), _) => Err(e.to_string()),
                (Ok(_), None) => Err("deployment.targetHost is null".to_string()),
                (Ok(opts), Some(uri)) => nix
                    .copy(&uri, path, &opts, false, |_, _| {})
                    .await
                    .map_err(|e| e.to_string()),
            };
            findings.push(doctor::copy(name, user, borrowed(&copied)));
        }
    }
    connection.close().await;
    findings
}

fn borrowed(result: &Result<(), String>) -> Result<(), &str> {
    result.as_ref().map(|_| ()).map_err(String::as_str)
}
