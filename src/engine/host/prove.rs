//! Proving a host healthy after its activation: validation (it runs the new
//! system and its health checks pass, while its watchdog is kept waiting),
//! the confirmation over a new connection, and a canary's soak.

use std::time::Duration;

use nix_deploy_core::events::Step;
use nix_deploy_core::goal::{Goal, Validation};
use nix_deploy_core::remote::{self, HostSystems};

use super::context::{HostContext, HostJob};
use super::failure::{At, Stop};
use super::{health, observe};
use crate::transport::ssh::{self, Connection};

/// Validate as the goal wants it while the confirmation's new connection
/// opens: the activation has ended, so that connection proves the new
/// system lets us in, and its handshake costs no time on the critical path.
/// A host without magic rollback has no watchdog waiting for a
/// confirmation: no connection (`None`). `runs` is what the host ran and
/// booted as its activation ended, when the activation's answer said so.
pub(crate) async fn validate_while_connecting(
    context: &HostContext,
    job: &mut HostJob,
    path: &str,
    goal: Goal,
    runs: Option<HostSystems>,
) -> Result<Option<Result<Connection, ssh::SshError>>, Stop> {
    let host = &job.assessment.host;
    let (name, target, magic) = (host.name.clone(), host.target.clone(), host.magic_rollback);
    let (validated, fresh) = tokio::join!(
        async {
            match goal.validation() {
                Validation::BootsNewSystem => validate_boot_default(context, job, path, runs).await,
                _ => match runs {
                    Some(runs) if context.checks(&job.assessment.host).is_empty() => {
                        validate_known(context, job, path, runs).await
                    }
                    _ => validate(context, job, path, "validate", magic).await,
                },
            }
        },
        async {
            if magic {
                Some(Connection::connect_new(&name, &target, &context.ssh).await)
            } else {
                None
            }
        },
    );
    if let Err(failure) = validated {
        if let Some(Ok(fresh)) = fresh {
            fresh.close().await;
        }
        return Err(failure);
    }
    Ok(fresh)
}

/// The host runs the new system and its health checks pass, recorded as
/// `phase`. With `watchdog`, the activation's watchdog deadline is pushed on
/// meanwhile, so it never switches the host back under a validation still in
/// progress (and does, one confirm window later, if we die).
pub(crate) async fn validate(
    context: &HostContext,
    job: &mut HostJob,
    path: &str,
    phase: &str,
    watchdog: bool,
) -> Result<(), Stop> {
    let (assessment, connection, run) = job.parts();
    let host = &assessment.host;
    let checks = context.checks(host);
    let token = run.token.clone().unwrap_or_default();
    let connection = &*connection;
    let work = async {
        let validation = async {
            let (results, verdict) = health::validate_host(
                connection,
                host,
                path,
                &checks,
                context.options.health_timeout,
                context.ssh.command_timeout,
            )
            .await;
            context
                .recorder
                .health_checked(&host.name, phase, results)
                .await
                .map_err(|e| e.to_string())?;
            verdict
        };
        if !watchdog {
            return validation.await;
        }
        tokio::select! {
            verdict = validation => verdict,
            never = keep_watchdog_waiting(context, connection, &token) => match never {},
        }
    };
    context
        .recorder
        .step(run, Step::Validate, work)
        .await?
        .map(|_| ())
        .map_err(Stop::at(At::Validate))
}

/// Push the watchdog's deadline one confirm window on, again and again.
async fn keep_watchdog_waiting(
    context: &HostContext,
    connection: &Connection,
    token: &str,
) -> std::convert::Infallible {
    let window = context.options.confirm_timeout;
    let period = (window / 3).clamp(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        // Best effort: a host we cannot reach cannot run its watchdog
        // either, and validation reports the host itself.
        let extended = connection
            .run_privileged(
                "validate",
                &remote::extend_argv(token, window.as_secs().max(1), context.fence.fence()),
                context.ssh.command_timeout,
            )
            .await;
        if let Err(e) = &extended
            && context.fence.refused(connection.host(), e)
        {
            // Another coordinator holds the deployment: the host is its to
            // settle, and this run's next write is refused.
            return std::future::pending().await;
        }
        tokio::time::sleep(period).await;
    }
}

/// `boot`: the profile (the boot default) is the new system; the running
/// system did not change. Health checks wait for a reboot.
async fn validate_boot_default(
    context: &HostContext,
    job: &mut HostJob,
    path: &str,
    runs: Option<HostSystems>,
) -> Result<(), Stop> {
    let host = job.assessment.host.name.clone();
    validate_systems(context, job, runs, |now| match now.boot.as_deref() {
        Some(boot) if boot == path => Ok(format!("{host} boots {path} next (pending reboot)")),
        boot => Err(format!(
            "{host}: validate: the system profile (the boot default) is {}, expected {path}",
            boot.unwrap_or("nothing")
        )),
    })
    .await
}

/// Without health checks, validation is that the host runs `path`: what
/// the activation's own answer said it ran as the switch ended (read on the
/// host after it ended, in the same call), so no other round trip. The
/// watchdog needs no push: nothing here takes long.
async fn validate_known(
    context: &HostContext,
    job: &mut HostJob,
    path: &str,
    runs: HostSystems,
) -> Result<(), Stop> {
    let host = job.assessment.host.name.clone();
    context
        .recorder
        .health_checked(&host, "validate", Vec::new())
        .await?;
    validate_systems(context, job, Some(runs), |now| {
        match now.running.as_deref() {
            Some(running) if running == path => Ok(String::new()),
            running => Err(format!(
                "{host}: validate: /run/current-system is {} after activation, expected {path}",
                running.unwrap_or("nothing")
            )),
        }
    })
    .await
}

/// Validation as `judge` says of what the host runs and boots: `runs`
/// when the activation's answer said it, else read now.
async fn validate_systems(
    context: &HostContext,
    job: &mut HostJob,
    runs: Option<HostSystems>,
    judge: impl FnOnce(&HostSystems) -> Result<String, String>,
) -> Result<(), Stop> {
    let (_, connection, run) = job.parts();
    let timeout = context.ssh.command_timeout;
    let work = async {
        let now = match runs {
            Some(runs) => runs,
            None => observe::systems(connection, "validate", timeout).await?,
        };
        judge(&now)
    };
    context
        .recorder
        .step(run, Step::Validate, work)
        .await?
        .map(|_| ())
        .map_err(Stop::at(At::Validate))
}

/// Only a new connection proves the new system still lets us in; over it
/// we decide the activation, atomically against the watchdog: if the
/// watchdog decided first, the host went back and this fails. The same call
/// then reads what the host runs and boots (returned, for the record).
pub(crate) async fn confirm(
    context: &HostContext,
    job: &mut HostJob,
    fresh: Result<Connection, ssh::SshError>,
) -> Result<Option<HostSystems>, Stop> {
    let (assessment, _, run) = job.parts();
    let host = &assessment.host;
    let token = run.token.clone().unwrap_or_default();
    let work = async {
        let fresh = fresh.map_err(|e| {
            format!(
                "{}: confirm: the new system does not accept a new SSH connection: {e}",
                host.name
            )
        })?;
        let result = fresh
            .run_privileged(
                "confirm",
                &remote::confirm_argv(&token, context.fence.fence()),
                context.ssh.command_timeout,
            )
            .await;
        fresh.close().await;
        match result {
            // Another coordinator holds the deployment: this run's next
            // write (the step's end) is refused, and nothing else happens.
            Err(e) if context.fence.refused(&host.name, &e) => Err(e.to_string()),
            // Decided; what it runs after is a reading we can do without.
            Ok(out) => Ok(remote::parse_systems(&out.stdout).ok()),
            Err(ssh::SshError::Exit { code, stderr, .. })
                if code == remote::DECIDED_BY_WATCHDOG =>
            {
                Err(format!(
                    "{}: confirm: too late, the host's watchdog had already decided to switch back ({})",
                    host.name,
                    stderr.trim()
                ))
            }
            Err(e) => Err(e.to_string()),
        }
    };
    context
        .recorder
        .step(run, Step::Confirm, work)
        .await?
        .map_err(Stop::at(At::Confirm))
}

/// Hold a canary and re-validate it until `soak` has passed.
pub(crate) async fn soak(
    context: &HostContext,
    job: &mut HostJob,
    soak: Duration,
) -> Result<(), Stop> {
    let (assessment, connection, run) = job.parts();
    let host = &assessment.host;
    let checks = context.checks(host);
    let health_timeout = context.options.health_timeout;
    let connection = &*connection;
    let work = async {
        let deadline = tokio::time::Instant::now() + soak;
        let period = Duration::from_secs(5).min(soak.max(Duration::from_millis(500)) / 2);
        loop {
            let (_, verdict) = health::validate_host(
                connection,
                host,
                host.toplevel(),
                &checks,
                health_timeout.min(soak.max(Duration::from_secs(5))),
                context.ssh.command_timeout,
            )
            .await;
            verdict.map_err(|e| format!("failed during the canary soak: {e}"))?;
            if tokio::time::Instant::now() >= deadline {
                return Ok::<(), String>(());
            }
            tokio::time::sleep(period.min(deadline - tokio::time::Instant::now())).await;
        }
    };
    context
        .recorder
        .step(run, Step::Soak, work)
        .await?
        .map_err(Stop::at(At::Soak))
}
