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

use nix_deploy_core::events::Step;
use nix_deploy_core::fleet::Host;
use nix_deploy_core::goal::{self, BootFiles};
use nix_deploy_core::remote;
use nix_deploy_core::run::RebootRecord;

use super::context::{HostContext, HostJob};
use super::failure::{At, Stop};
use super::{prove, steps};
use crate::store::StoreError;
use crate::transport::ssh::{Connection, SshError};

/// How long a host may take to answer the reboot command before we assume
/// it is going down.
const REBOOT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Between attempts to reach a rebooting host.
const POLL: Duration = Duration::from_millis(500);

/// The coordinator's own boot id.
fn own_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_string())
}

/// With a reboot asked for, a host that is this very machine (the probe
/// read our own boot id) is refused before anything on it is touched: it
/// would otherwise be left activated, or staged, and never rebooted.
pub(crate) fn refuse_self(context: &HostContext, job: &HostJob) -> Result<(), Stop> {
    if context.options.reboot == goal::RebootPolicy::Never {
        return Ok(());
    }
    let theirs = job
        .assessment
        .probe
        .as_ref()
        .and_then(|p| p.boot_id.clone());
    if theirs.is_some() && theirs == own_boot_id() {
        return Err(Stop::at(At::Preflight)(format!(
            "{}: pre-flight: the host has the coordinator's own boot id: it is this machine, which nix-deploy never reboots; nothing was changed (deploy it without --reboot, then reboot it yourself)",
            job.assessment.host.name
        )));
    }
    Ok(())
}

/// `kernel`, `initrd` and `kernel-modules` of a system in this machine's store.
pub(crate) fn local_boot_files(system: &str) -> BootFiles {
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
pub(crate) async fn reboot_and_wait(
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
        .run_privileged(
            "reboot",
            &remote::reboot_argv(context.fence.fence()),
            REBOOT_COMMAND_TIMEOUT,
        )
        .await
    {
        // Going down may well take our connection with it.
        Ok(_) | Err(SshError::Connect { .. }) | Err(SshError::Timeout { .. }) => {}
        // Refused by the host's fence: lost to another coordinator (see
        // `HostFence::refused`).
        Err(e) => {
            context.fence.refused(name, &e);
            return Err(e.to_string());
        }
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

/// Whether this host reboots after its activation, as `--reboot` says;
/// with `auto`, whether its kernel or initrd changed (logged).
pub(crate) async fn wanted(
    context: &HostContext,
    job: &HostJob,
    path: &str,
) -> Result<bool, StoreError> {
    let policy = context.options.reboot;
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
        context
            .recorder
            .log(
                Some(&job.assessment.host.name),
                format!("--reboot=auto: {why}"),
            )
            .await?;
    }
    Ok(reboot)
}

/// Reboot into the new system, upload the keys again, validate.
pub(crate) async fn reboot_into(
    context: &HostContext,
    job: &mut HostJob,
    path: &str,
) -> Result<(), Stop> {
    let (assessment, connection, run) = job.parts();
    let host = &assessment.host;
    let mut record = RebootRecord::default();
    let work = reboot_and_wait(context, connection, host, path, &mut record);
    let result = context.recorder.step(run, Step::Reboot, work).await?;
    if let (Some(before), Some(after)) = (&record.boot_id_before, &record.boot_id_after) {
        context
            .recorder
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
    context.recorder.save(run).await?;
    result.map_err(Stop::at(At::Reboot))?;
    // `/run` (and so `/run/keys`) is empty after a boot; what was kept of
    // it for the way back is gone too, and is not replaced by the emptiness.
    steps::upload_keys(context, job, None, true, false)
        .await?
        .map_err(Stop::at(At::AfterReboot))?;
    prove::validate(context, job, path, "after reboot", false)
        .await
        .map_err(|stop| match stop {
            Stop::Failed {
                at: At::Validate,
                message,
            } => Stop::Failed {
                at: At::AfterReboot,
                message,
            },
            other => other,
        })
}
