//! `build` (colmena's `build` and `apply build`): evaluate the selected
//! hosts and build their systems on the coordinator, a bounded number at
//! once. No host is connected to, nothing is recorded in the history (no
//! host changes); with `keep_result`, each built system stays a GC root
//! under `STATE/results/HOST` (`host::gcroots::keep_result`).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use nix_deploy_core::fleet::{Host, Selection};
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::reports::{BuildReport, HostBuild};

use super::Engine;
use crate::engine::EngineError;
use crate::engine::fleet::prepare::{self, Purpose};
use crate::engine::host::gcroots;
use crate::nix::Nix;

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildRequest {
    pub selection: Selection,
    /// Builds at once (`nix build` processes; each uses Nix's own
    /// parallelism for its derivations).
    pub parallel_limit: usize,
    pub keep_result: bool,
}

impl Engine {
    /// Build the selected hosts' systems; `done` hears of each host as it
    /// ends. Bad input (selection, evaluation) is an error; a failed build
    /// is a host result.
    pub async fn build(
        &self,
        request: BuildRequest,
        done: Option<mpsc::UnboundedSender<HostBuild>>,
    ) -> Result<BuildReport, EngineError> {
        let prepared = prepare::prepare(
            self.fleet(),
            &request.selection,
            &DeployOptions::default(),
            Purpose::BUILD,
        )
        .await?;
        // The fleet's remote builders (colmena's `meta.machinesFile`) unless
        // `--builders` chose others.
        let nix = self.config.nix.for_fleet(&prepared.index.meta);
        let limit = Arc::new(Semaphore::new(request.parallel_limit.max(1)));
        let state_dir = self.store.state_dir().to_path_buf();
        let mut builds = JoinSet::new();
        for host in prepared.hosts {
            let (nix, limit, state_dir, done) =
                (nix.clone(), limit.clone(), state_dir.clone(), done.clone());
            let keep = request.keep_result;
            builds.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let result = build_host(&nix, &host, keep.then_some(&state_dir)).await;
                if let Some(done) = done {
                    let _ = done.send(result.clone());
                }
                result
            });
        }
        let mut hosts = Vec::new();
        while let Some(joined) = builds.join_next().await {
            hosts.push(
                joined.map_err(|e| EngineError::Internal(format!("build task failed: {e}")))?,
            );
        }
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(BuildReport {
            flake: self.config.flake.clone(),
            evaluation: prepared.evaluation,
            hosts,
        })
    }
}

/// Build one host's system; it must be the path the flake evaluated to
/// (deploy-rs: the wrapper holding it).
async fn build_host(nix: &Nix, host: &Host, keep_in: Option<&std::path::PathBuf>) -> HostBuild {
    let started = Instant::now();
    let mut result = HostBuild {
        name: host.name.clone(),
        toplevel: host.toplevel().to_string(),
        drv_path: host.system.drv_path.clone(),
        ..HostBuild::default()
    };
    match nix.build(&host.system.drv_path, |_, _| {}).await {
        Ok(built) if built != host.system.build_output() => {
            result.error = Some(format!(
                "built {built}, but the flake evaluated to {}",
                host.system.build_output()
            ));
        }
        Ok(built) => {
            if let Some(state_dir) = keep_in {
                match gcroots::keep_result(nix, state_dir, &host.name, &built).await {
                    Ok(link) => result.result = Some(link.display().to_string()),
                    Err(e) => result.error = Some(format!("--keep-result: {e}")),
                }
            }
        }
        Err(e) => result.error = Some(e.to_string()),
    }
    result.duration_ms = started.elapsed().as_millis() as i64;
    result
}
