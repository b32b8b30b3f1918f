//! `plan`: what a deployment would do. Changes nothing on any host; with
//! summaries, builds the changed toplevels locally to compare closures, and
//! says which hosts are pending a reboot and whose kernel or initrd changes.

use nix_deploy_core::events::HostState;
use nix_deploy_core::fleet::Selection;
use nix_deploy_core::goal;
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::plan;
use nix_deploy_core::reports::PlanReport;

use super::Engine;
use crate::engine::EngineError;
use crate::engine::fleet::prepare::{self, Purpose};
use crate::engine::fleet::probe;
use crate::engine::host::observe::Settle;
use crate::engine::host::reboot::local_boot_files;
use crate::engine::host::summary::change_summary;

impl Engine {
    /// What a deployment would do. Changes nothing on any host; with
    /// `summaries`, builds the changed toplevels locally to compare closures.
    pub async fn plan(
        &self,
        selection: &Selection,
        options: &DeployOptions,
        summaries: bool,
    ) -> Result<PlanReport, EngineError> {
        self.check_ssh_config()?;
        let mut prepared =
            prepare::prepare(self.fleet(), selection, options, Purpose::PLAN).await?;
        // The fleet's remote builders (colmena's `meta.machinesFile`) unless
        // `--builders` chose others.
        let nix = self.config.nix.for_fleet(&prepared.index.meta);
        let early = prepared.early.take();
        let probed = probe::probe_all(
            self.fleet(),
            std::mem::take(&mut prepared.hosts),
            None,
            Settle::No,
            early,
        )
        .await?;
        let mut facts = Vec::new();
        let (mut pending_reboot, mut reboot_required) = (Vec::new(), Vec::new());
        for (assessment, connection) in probed {
            let name = assessment.host.name.clone();
            if let Some(probe) = &assessment.probe
                && goal::pending_reboot(
                    probe.current_system.as_deref(),
                    probe.profile_system.as_deref(),
                )
            {
                pending_reboot.push(name.clone());
            }
            // A host that builds its own system (`buildOnTarget`) may need
            // what only it has: nothing is built for it here.
            let build_here = summaries && !assessment.host.build_on_target;
            let summary = match (&connection, build_here, assessment.state) {
                (Some(connection), true, HostState::Changed) => {
                    let system = &assessment.host.system;
                    match nix.build(&system.drv_path, |_, _| {}).await {
                        // deploy-rs builds a wrapper holding the toplevel:
                        // the toplevel is what boots and what changes.
                        Ok(_) => {
                            let built = system.toplevel.clone();
                            let booted = assessment
                                .probe
                                .as_ref()
                                .map(|p| p.booted.clone())
                                .unwrap_or_default();
                            if goal::boot_changed(&booted, &local_boot_files(&built)) == Some(true)
                            {
                                reboot_required.push(name.clone());
                            }
                            change_summary(&nix, connection, &built).await.ok()
                        }
                        Err(_) => None,
                    }
                }
                _ => None,
            };
            if let Some(connection) = connection {
                connection.close().await;
            }
            facts.push(probe::facts(self.fleet(), &assessment, summary).await?);
        }
        let mut plan = plan::plan(
            &facts,
            &prepared.graph,
            prepared.inventory.len() + prepared.evaluation.failed.len(),
            options,
        )?;
        for host in &mut plan.hosts {
            host.eval_cached = prepared.eval_cached.contains(&host.name);
        }
        let mut report = PlanReport::new(
            &self.config.flake,
            prepared.inventory.len() + prepared.evaluation.failed.len(),
            plan,
        );
        report.evaluation = prepared.evaluation;
        report.pending_reboot = pending_reboot;
        report.reboot_required = reboot_required;
        Ok(report)
    }
}
