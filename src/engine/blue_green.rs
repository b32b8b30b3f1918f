//! Blue-green: every host was staged with `switch-to-configuration test` (the
//! old generation stays the boot default). When all are healthy, each is
//! committed (new profile generation, `switch-to-configuration boot`); if any
//! failed, every staged host goes back to its old system. All or nothing.

use nix_deploy_core::events::{HostStatus, Step};
use nix_deploy_core::remote::{self, Activation};

use super::activator;
use super::recovery::Back;
use super::scheduler::Execution;
use crate::now_ms;
use crate::store::StoreError;

impl Execution<'_> {
    /// Commit every staged host if all are healthy and the deployment ran to
    /// its end; else (a failure, a host not started, a cancel) revert all.
    pub(super) async fn settle_blue_green(&mut self, cancelled: bool) -> Result<(), StoreError> {
        let staged: Vec<String> = self
            .runs
            .values()
            .filter(|r| r.status == HostStatus::Running)
            .map(|r| r.host.clone())
            .collect();
        let failed: Vec<String> = self
            .runs
            .values()
            .filter(|r| {
                r.status.is_failure()
                    || r.status == HostStatus::Cancelled
                    || r.status == HostStatus::Skipped
                        && r.changed == Some(true)
                        && r.reason
                            .as_deref()
                            .is_some_and(|x| x.starts_with("not started"))
            })
            .map(|r| r.host.clone())
            .collect();
        let commit = failed.is_empty() && !cancelled;
        if cancelled {
            self.recorder
                .log(
                    None,
                    "blue-green: cancelled; every staged host goes back to its old system".into(),
                )
                .await?;
        } else if !commit {
            self.recorder
                .log(
                    None,
                    format!(
                        "blue-green: {} did not pass; every staged host goes back to its old system",
                        failed.join(", ")
                    ),
                )
                .await?;
        }
        for host in staged {
            if commit {
                self.commit(&host).await?;
            } else {
                let note = if cancelled {
                    "blue-green: reverted to its old system because the deployment was cancelled"
                        .to_string()
                } else {
                    format!(
                        "blue-green: reverted to its old system because {} failed",
                        failed.join(", ")
                    )
                };
                self.take_back(&host, Back::Test, note, "no previous system to return to")
                    .await?;
            }
        }
        Ok(())
    }

    /// Make a staged host's system its profile's new generation and boot
    /// default (`switch-to-configuration boot`, detached like every switch).
    async fn commit(&mut self, host: &str) -> Result<(), StoreError> {
        let (Some(mut run), Some((assessment, connection))) =
            (self.runs.remove(host), self.done.get_mut(host))
        else {
            return Ok(());
        };
        let path = assessment.host.toplevel.clone();
        let ssh = &self.context.ssh;
        let timeout = self.options.activation_timeout;
        let work = async {
            let link = connection
                .run_privileged(
                    "commit",
                    &remote::set_profile_argv(&path),
                    ssh.command_timeout,
                )
                .await
                .map_err(|e| e.to_string())?;
            let token = activator::token();
            let switch = activator::Switch {
                host: &assessment.host,
                step: "commit",
                system: &path,
                action: Activation::Boot,
                watchdog: None,
                token: &token,
                systemd: assessment.probe.as_ref().is_some_and(|p| p.systemd),
                timeout,
            };
            activator::run(connection, ssh, &switch).await?;
            Ok::<_, String>(remote::parse_generation_link(&link.stdout))
        };
        let result = self.recorder.step(&mut run, Step::Commit, work).await?;
        match result {
            Ok(generation) => {
                run.to.generation = generation;
                run.status = HostStatus::Deployed;
            }
            Err(e) => {
                run.status = HostStatus::Failed;
                run.error = Some(e);
            }
        }
        run.time.finished_at = Some(now_ms());
        self.recorder.finish_host(&mut run).await?;
        self.runs.insert(host.to_string(), run);
        Ok(())
    }
}
