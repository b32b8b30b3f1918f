//! Reboots (`deploy --reboot`, `--reboot=auto`), after the `switch` or
//! `boot` goal, and the way back through the boot generation.
//!
//! A reboot is proven by the host's **boot id**
//! (`/proc/sys/kernel/random/boot_id`, new with every boot): we read it,
//! run the system's own `systemctl reboot`, then connect again and again
//! until the host answers with another boot id (or the reboot timeout runs
//! out), and check that `/run/current-system` is the system we expect.
//! Then the keys go up again (`/run` is a tmpfs) and the host is validated:
//! it runs the new system and its health checks pass. If that fails, the
//! host goes back through its boot generation: the old generation becomes
//! the boot default again, the host reboots into it, and it must run the
//! old system and be healthy.
//!
//! A host whose boot id is the coordinator's own is this very machine: it is
//! never rebooted.
//!
//! `--reboot=auto` reboots only hosts whose new system has another kernel,
//! initrd or kernel modules than the system they booted (NixOS's own test):
//! the new toplevel's `kernel`, `initrd` and `kernel-modules` links, read on
//! the coordinator, against `/run/booted-system`'s, read by the probe.

use std::path::Path;
use std::time::{Duration, Instant};

use nix_deploy_core::events::{HostStatus, Step};
use nix_deploy_core::fleet::Host;
use nix_deploy_core::goal::{self, BootFiles};
use nix_deploy_core::remote::{self, Activation};
use nix_deploy_core::render;
use nix_deploy_core::run::RebootRecord;

use super::health;
use super::pipeline::{HostContext, HostJob, StepFailure};
use super::recovery::{Previous, conclude};
use crate::store::StoreError;
use crate::transport::ssh::{Connection, SshError};

/// How long a host may take to answer the reboot command before we assume
/// it is going down.
const REBOOT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Between attempts to reach a rebooting host.
const POLL: Duration = Duration::from_millis(500);
/// Deadline of one switch of the boot default.
const BOOT_SWITCH_TIMEOUT: Duration = Duration::from_secs(600);

/// The coordinator's own boot id.
fn own_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_string())
}

/// `kernel`, `initrd` and `kernel-modules` of a system in this machine's store.
pub(super) fn local_boot_files(system: &str) -> BootFiles {
    let link = |name: &str| {
        std::fs::read_link(Path::new(system).join(name))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    };
    BootFiles {
        kernel: link("kernel"),
        initrd: link("initrd"),
        kernel_modules: link("kernel-modules"),
    }
}

/// Reboot the host behind `connection`, wait for it to come back with a new
/// boot id, and put the new connection in `connection`. The record says what
/// happened, also when the host came back running something else than
/// `expected` (an error).
async fn reboot_and_wait(
    context: &HostContext,
    connection: &mut Connection,
    host: &Host,
    expected: &str,
    record: &mut RebootRecord,
) -> Result<(), String> {
    let name = &host.name;
    let timeout = context.ssh.command_timeout;
    let state = connection
        .run("reboot", &remote::boot_state_argv(), timeout)
        .await
        .map_err(|e| e.to_string())?;
    let (before, _) = remote::parse_boot_state(&state.stdout)
        .map_err(|e| format!("{name}: reboot: cannot read the boot id: {e}"))?;
    if own_boot_id().as_deref() == Some(before.as_str()) {
        return Err(format!(
            "{name}: reboot: the host has the coordinator's own boot id: it is this machine, which nix-deploy never reboots"
        ));
    }
    record.boot_id_before = Some(before.clone());
    match connection
        .run_privileged("reboot", &remote::reboot_argv(), REBOOT_COMMAND_TIMEOUT)
        .await
    {
        // Going down may well take our connection with it.
        Ok(_) | Err(SshError::Connect { .. }) | Err(SshError::Timeout { .. }) => {}
        Err(e) => return Err(e.to_string()),
    }
    let reboot_timeout = context.options.reboot_timeout;
    let deadline = Instant::now() + reboot_timeout;
    loop {
        tokio::time::sleep(POLL).await;
        if Instant::now() > deadline {
            return Err(format!(
                "{name}: reboot: the host did not come back with a new boot id within {}",
                nix_deploy_core::duration::format(reboot_timeout)
            ));
        }
        let Ok(fresh) = Connection::connect(name, &host.target, &context.ssh).await else {
            continue;
        };
        let Ok(out) = fresh
            .run("reboot", &remote::boot_state_argv(), timeout)
            .await
        else {
            fresh.close().await;
            continue;
        };
        match remote::parse_boot_state(&out.stdout) {
            Ok((after, system)) if after != before => {
                record.boot_id_after = Some(after);
                record.system = system.clone();
                let old = std::mem::replace(connection, fresh);
                old.close().await;
                return match system {
                    Some(system) if system == expected => Ok(()),
                    other => Err(format!(
                        "{name}: reboot: the host came back running {}, expected {expected}",
                        other.as_deref().unwrap_or("no system")
                    )),
                };
            }
            // Not gone down yet, or an answer we cannot read: try again.
            _ => fresh.close().await,
        }
    }
}

impl HostContext {
    /// Whether this host reboots after its activation, as `--reboot` says;
    /// with `auto`, whether its kernel or initrd changed (logged).
    pub(super) async fn wants_reboot(&self, job: &HostJob, path: &str) -> Result<bool, StoreError> {
        let policy = self.options.reboot;
        if policy == goal::RebootPolicy::Never {
            return Ok(false);
        }
        let booted = job
            .assessment
            .probe
            .as_ref()
            .map(|p| p.booted.clone())
            .unwrap_or_default();
        let changed = goal::boot_changed(&booted, &local_boot_files(path));
        let reboot = policy.reboots(changed);
        if policy == goal::RebootPolicy::Auto {
            let why = match changed {
                Some(true) => "its kernel or initrd changed: reboot required",
                Some(false) => "same kernel and initrd: no reboot needed",
                None => "cannot tell whether its kernel or initrd changed: rebooting to be sure",
            };
            self.recorder
                .log(
                    Some(&job.assessment.host.name),
                    format!("--reboot=auto: {why}"),
                )
                .await?;
        }
        Ok(reboot)
    }

    /// Reboot into the new system, upload the keys again, validate.
    pub(super) async fn reboot_into(
        &self,
        job: &mut HostJob,
        path: &str,
    ) -> Result<(), StepFailure> {
        let HostJob {
            assessment,
            connection,
            run,
        } = job;
        let host = &assessment.host;
        let mut record = RebootRecord::default();
        let work = reboot_and_wait(self, connection, host, path, &mut record);
        let result = self.recorder.step(run, Step::Reboot, work).await?;
        if let (Some(before), Some(after)) = (&record.boot_id_before, &record.boot_id_after) {
            self.recorder
                .log(
                    Some(&host.name),
                    format!(
                        "rebooted: boot id {before} → {after}, running {}",
                        record.system.as_deref().unwrap_or("no system")
                    ),
                )
                .await?;
        }
        run.reboot = Some(record);
        self.recorder.save(run).await?;
        result.map_err(StepFailure::Reboot)?;
        // `/run` (and so `/run/keys`) is empty after a boot.
        self.upload_keys(job, None, true)
            .await?
            .map_err(StepFailure::AfterReboot)?;
        self.validate_as(job, path, "after reboot", false)
            .await
            .map_err(|failure| match failure {
                StepFailure::Validate(m) => StepFailure::AfterReboot(m),
                other => other,
            })
    }

    /// After a failed reboot or validation after it: the old generation
    /// becomes the boot default again and the host reboots into it; it must
    /// then run the old system and be healthy.
    pub(super) async fn roll_back_through_boot(
        &self,
        job: &mut HostJob,
        error: String,
    ) -> Result<(), StoreError> {
        let HostJob {
            assessment,
            connection,
            run,
        } = job;
        let host = assessment.host.clone();
        if !host.rollback_on_failure {
            run.status = HostStatus::Failed;
            run.error = Some(format!(
                "{error}\n(rollbackOnFailure is off: left as it is)"
            ));
            return Ok(());
        }
        let Some(previous) = Previous::of(&assessment.current) else {
            run.status = HostStatus::Failed;
            run.error = Some(format!(
                "{error}\nno previous generation to roll back to (first deployment)"
            ));
            return Ok(());
        };
        let checks = self.checks(&host);
        let health_timeout = self.options.health_timeout;
        let mut record = RebootRecord::default();
        let mut rebooted = false;
        let work = async {
            // The connection we had may be to a host that has rebooted since.
            if connection
                .run(
                    "rollback",
                    &remote::current_system_argv(),
                    Duration::from_secs(30),
                )
                .await
                .is_err()
            {
                let fresh = Connection::connect(&host.name, &host.target, &self.ssh)
                    .await
                    .map_err(|e| render::host_error(&host.name, "rollback", &e.to_string()))?;
                let old = std::mem::replace(connection, fresh);
                old.close().await;
            }
            connection
                .run_privileged(
                    "rollback",
                    &remote::switch_generation_argv(previous.generation),
                    BOOT_SWITCH_TIMEOUT,
                )
                .await
                .map_err(|e| e.to_string())?;
            connection
                .run_privileged(
                    "rollback",
                    &remote::switch_argv(
                        &remote::generation_link(previous.generation),
                        Activation::Boot,
                    ),
                    BOOT_SWITCH_TIMEOUT,
                )
                .await
                .map_err(|e| e.to_string())?;
            let current = connection
                .run(
                    "rollback",
                    &remote::current_system_argv(),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|e| e.to_string())?;
            if current.stdout.trim() != previous.path {
                rebooted = true;
                reboot_and_wait(self, connection, &host, &previous.path, &mut record).await?;
                // Best effort: the old system's services find their keys
                // (as the flake describes them now) in the emptied /run.
                let all: Vec<_> = host.keys.iter().collect();
                let _ = super::keys::upload(connection, &self.keys, &host, &all, false).await;
            }
            health::validate(connection, &checks, health_timeout)
                .await
                .map(|_| ())
                .map_err(|(message, _)| {
                    format!(
                        "{}: rollback: the old system is not healthy: {message}",
                        host.name
                    )
                })
        };
        let result = self.recorder.step(run, Step::Rollback, work).await?;
        if rebooted {
            run.reboot = Some(record);
        }
        let note = format!(
            "{error}\nrolled back through the boot generation to generation {} ({}){}",
            previous.generation,
            previous.path,
            if rebooted { ", rebooted into it" } else { "" }
        );
        conclude(
            run,
            result,
            HostStatus::RolledBack,
            Some(note),
            Some(&error),
        );
        Ok(())
    }
}
