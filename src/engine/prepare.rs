//! Before anything is recorded or touched: the request is checked (options,
//! evaluation, selection, dependency graph, canaries), then the selected
//! hosts are leased, all or none, and kept leased by one heartbeat.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::fleet::{Host, Inventory, InventoryError, Selection};
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::plan::{DependencyGraph, GraphHost};

use super::recorder::Recorder;
use super::{Engine, EngineError, LEASE_TTL};
use crate::store::Store;

/// The request, validated: what every later stage works from.
pub(super) struct Prepared {
    pub inventory: Inventory,
    pub graph: DependencyGraph,
    pub hosts: Vec<Host>,
}

impl Prepared {
    pub fn host_names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }
}

impl Engine {
    fn check_options(&self, options: &DeployOptions) -> Result<(), EngineError> {
        options.check()?;
        if let Some(config) = &self.config.ssh.config_file
            && !config.is_file()
        {
            return Err(EngineError::BadOption(format!(
                "--ssh-config {} does not exist",
                config.display()
            )));
        }
        Ok(())
    }

    /// Everything that can be wrong with a request, found before anything is
    /// recorded or touched: the options, the flake, the selection, the
    /// dependency graph and the canaries.
    pub(super) async fn prepare(
        &self,
        selection: &Selection,
        options: &DeployOptions,
    ) -> Result<Prepared, EngineError> {
        self.check_options(options)?;
        let inventory = self.inventory().await?;
        let graph = DependencyGraph::build(
            &inventory
                .hosts()
                .map(|h| GraphHost {
                    name: h.name.clone(),
                    tags: h.tags.clone(),
                    dependencies: h.dependencies.clone(),
                })
                .collect::<Vec<_>>(),
        )?;
        let names = inventory.select(selection)?;
        for canary in &options.canaries {
            if !names.contains(canary) {
                return Err(EngineError::BadOption(format!(
                    "--canary {canary} is not one of the selected hosts ({})",
                    names.join(", ")
                )));
            }
        }
        let hosts = names
            .iter()
            .filter_map(|n| inventory.get(n).cloned())
            .collect();
        Ok(Prepared {
            inventory,
            graph,
            hosts,
        })
    }
}

/// One host of the fleet by name, or an error listing the fleet.
pub(super) fn find_host(inventory: &Inventory, name: &str) -> Result<Host, EngineError> {
    inventory.get(name).cloned().ok_or_else(|| {
        InventoryError::UnknownHost {
            name: name.to_string(),
            known: inventory
                .hosts()
                .map(|h| h.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        }
        .into()
    })
}

/// The leases one run holds on its hosts, renewed by one heartbeat for as
/// long as it holds them (whatever the run is doing: deploying, settling,
/// rolling back).
pub(super) struct Leases {
    store: Store,
    owner: String,
    renewal: Background,
}

impl Leases {
    /// Take the leases of `hosts`, all or none. With `wait`, wait for busy
    /// hosts to be released (until `cancel`, or a cancel request for the
    /// queued deployment `queued` records, which is told what it waits for).
    pub async fn acquire(
        store: &Store,
        hosts: &[String],
        wait: bool,
        cancel: &CancellationToken,
        queued: Option<&Recorder>,
    ) -> Result<Leases, EngineError> {
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let mut told = false;
        loop {
            let mut refused = None;
            for host in hosts {
                if let Err(holder) = store.try_lease(host, &owner, None, LEASE_TTL).await? {
                    refused = Some((host.clone(), holder));
                    break;
                }
            }
            let Some((host, holder)) = refused else {
                let renewal = {
                    let store = store.clone();
                    let owner = owner.clone();
                    Background(tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(LEASE_TTL / 6).await;
                            let _ = store.renew_leases(&owner, None, LEASE_TTL).await;
                        }
                    }))
                };
                return Ok(Leases {
                    store: store.clone(),
                    owner,
                    renewal,
                });
            };
            store.release_leases(&owner).await?;
            if let Some(recorder) = queued {
                if store.cancel_requested(recorder.deployment_id()).await? {
                    cancel.cancel();
                }
                if wait && !told {
                    told = true;
                    recorder
                        .log(None, format!("queued: {host} is busy ({holder})"))
                        .await?;
                }
            }
            if !wait || cancel.is_cancelled() {
                return Err(EngineError::Busy {
                    host,
                    holder: holder.to_string(),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = cancel.cancelled() => {}
            }
        }
    }

    /// Name deployment `id` on the leases, and listen for `nix-deploy
    /// cancel` while it runs: stopped when the returned guard drops.
    pub async fn watch_cancel(&self, id: i64, cancel: &CancellationToken) -> Background {
        let _ = self
            .store
            .renew_leases(&self.owner, Some(id), LEASE_TTL)
            .await;
        let store = self.store.clone();
        let cancel = cancel.clone();
        Background(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if !cancel.is_cancelled() && store.cancel_requested(id).await.unwrap_or(false) {
                    cancel.cancel();
                }
            }
        }))
    }

    pub async fn release(self) {
        self.renewal.0.abort();
        let _ = self.store.release_leases(&self.owner).await;
    }
}

/// A background task of a run; stops when dropped.
pub(super) struct Background(JoinHandle<()>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}
