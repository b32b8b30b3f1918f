//! One changed host's pipeline, top to bottom:
//!
//! pre-flight → build → copy → set-profile → activate → validate → confirm
//!
//! Each step is a function with its own [`StepFailure`] variant; what a
//! failure means for the host ([`Recovery`]) is decided in one place, and
//! carried out by [`super::recovery`].

use std::sync::Arc;
use std::time::Duration;

use nix_deploy_core::events::{HostStatus, Step};
use nix_deploy_core::fleet::{HealthCheck, Host};
use nix_deploy_core::goal::{Goal, Validation};
use nix_deploy_core::options::DeployOptions;
use nix_deploy_core::remote::{self, Activation, Decision};
use nix_deploy_core::run::HostRun;

use super::keys::KeyTexts;
use super::probe::{Assessment, current_closure, new_closure_summary};
use super::recorder::Recorder;
use super::scheduler::Outcome;
use super::{activator, health};
use crate::nix::Nix;
use crate::now_ms;
use crate::store::StoreError;
use crate::transport::ssh::{self, Connection, SshOptions};

/// What every host task of a deployment shares.
pub(super) struct HostContext {
    pub nix: Nix,
    pub ssh: SshOptions,
    pub options: DeployOptions,
    pub recorder: Recorder,
    /// The contents of the run's `text` keys, read when first needed.
    pub keys: Arc<KeyTexts>,
}

/// One host's part, as the scheduler hands it over and gets it back.
pub(super) struct HostJob {
    pub assessment: Assessment,
    pub connection: Connection,
    pub run: HostRun,
}

/// Why a host's pipeline stopped, by step. Each message names the host and
/// the step.
#[derive(Debug)]
pub(super) enum StepFailure {
    Preflight(String),
    /// Unhealthy before we touched it: reported, not blamed on us.
    Unhealthy(String),
    Build(String),
    Copy(String),
    SetProfile(String),
    Activate(String),
    Validate(String),
    /// The new system did not let us in over a new connection.
    Confirm(String),
    Soak(String),
    /// Pre-activation keys could not be uploaded (the system is untouched).
    Keys(String),
    /// Post-activation keys could not be uploaded: the new system runs
    /// without them.
    KeysAfterActivation(String),
    /// `dry-activate` failed (nothing changed).
    DryActivate(String),
    /// The reboot did not bring the host back on the new system.
    Reboot(String),
    /// Back from the reboot, the host failed its keys or validation.
    AfterReboot(String),
    /// The history could not be written.
    Store(StoreError),
}

impl From<StoreError> for StepFailure {
    fn from(e: StoreError) -> Self {
        StepFailure::Store(e)
    }
}

/// What a failure means for the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Recovery {
    /// Nothing on the host changed: it failed, and that is all.
    Untouched,
    /// Unhealthy before we started: not deployed, not our doing.
    Unhealthy,
    /// The host runs (or may run) the new system: switch it back.
    RollBack,
    /// The new system runs but refuses new connections: its watchdog
    /// switches it back by itself; wait for that and verify.
    AwaitWatchdog,
    /// The host rebooted (or tried to): make the old generation the boot
    /// default again and reboot into it ([`super::reboot`]).
    RollBackThroughBoot,
}

impl StepFailure {
    /// Decided once for every step.
    pub fn recovery(&self) -> Recovery {
        match self {
            StepFailure::Preflight(_)
            | StepFailure::Build(_)
            | StepFailure::Copy(_)
            | StepFailure::SetProfile(_)
            | StepFailure::Keys(_)
            | StepFailure::DryActivate(_)
            | StepFailure::Store(_) => Recovery::Untouched,
            StepFailure::Unhealthy(_) => Recovery::Unhealthy,
            StepFailure::Activate(_)
            | StepFailure::Validate(_)
            | StepFailure::Soak(_)
            | StepFailure::KeysAfterActivation(_) => Recovery::RollBack,
            StepFailure::Confirm(_) => Recovery::AwaitWatchdog,
            StepFailure::Reboot(_) | StepFailure::AfterReboot(_) => Recovery::RollBackThroughBoot,
        }
    }

    pub fn message(&self) -> String {
        match self {
            StepFailure::Preflight(m)
            | StepFailure::Unhealthy(m)
            | StepFailure::Build(m)
            | StepFailure::Copy(m)
            | StepFailure::SetProfile(m)
            | StepFailure::Activate(m)
            | StepFailure::Validate(m)
            | StepFailure::Confirm(m)
            | StepFailure::Soak(m)
            | StepFailure::Keys(m)
            | StepFailure::KeysAfterActivation(m)
            | StepFailure::DryActivate(m)
            | StepFailure::Reboot(m)
            | StepFailure::AfterReboot(m) => m.clone(),
            StepFailure::Store(e) => e.to_string(),
        }
    }
}

impl HostContext {
    /// One host's whole part: the pipeline, the canary soak, and recovery
    /// when a step fails. The host comes back with how it ended.
    pub async fn host_task(
        self: Arc<Self>,
        mut job: HostJob,
        activation: Activation,
        soak: Option<Duration>,
    ) -> Result<(HostJob, Outcome), StoreError> {
        job.run.status = HostStatus::Running;
        job.run.time.started_at = Some(now_ms());
        self.recorder.save(&job.run).await?;

        let mut result = self.pipeline(&mut job, activation).await;
        if result.is_ok()
            && let Some(soak) = soak
        {
            result = self.soak(&mut job, soak).await;
        }
        job.run.time.finished_at = Some(now_ms());
        let outcome = match result {
            Ok(()) => {
                if let Some(status) = self.success_status(activation) {
                    job.run.status = status;
                }
                Outcome::Healthy
            }
            Err(StepFailure::Store(e)) if e.is_superseded() => {
                // Another coordinator holds the deployment now (a higher
                // epoch): it settles this host; this one touches it no more.
                return Err(e);
            }
            Err(StepFailure::Store(e)) => {
                // The history cannot be written: leave no host between
                // generations, then say so.
                self.undo_unrecorded(&mut job).await;
                return Err(e);
            }
            Err(failure) => {
                self.recover(&mut job, activation, failure).await?;
                Outcome::NotHealthy
            }
        };
        job.run.time.finished_at = Some(now_ms());
        if job.run.status != HostStatus::Running {
            job.run.step = None;
        }
        Ok((job, outcome))
    }

    /// The pipeline for one changed host, as its goal wants it
    /// ([`nix_deploy_core::goal`]; the goal-specific steps are in
    /// [`super::goals`] and [`super::reboot`]). `Test` activation (blue-green
    /// staging) leaves the profile alone.
    async fn pipeline(&self, job: &mut HostJob, activation: Activation) -> Result<(), StepFailure> {
        let goal = self.goal(activation);
        if activation == Activation::Switch {
            job.run.goal = Some(goal);
        }
        if !self.options.skip_validation {
            self.preflight(job).await?;
        }
        // The host's side of the change summary is read while we build (not
        // while the closure copies: a host without nix-daemon may refuse a
        // second writer of its store database at that moment).
        let (path, old_closure) = {
            let HostJob {
                assessment,
                connection,
                run,
            } = &mut *job;
            let has_system = assessment.current.path.is_some();
            tokio::join!(self.build(&assessment.host, run), async {
                if has_system {
                    current_closure(connection).await
                } else {
                    Vec::new()
                }
            })
        };
        let path = path?;
        self.copy_and_summarize(job, &path, &old_closure).await?;
        if goal == Goal::DryActivate {
            return self.dry_activate(job, &path).await;
        }
        self.keys_before(job).await?;
        if goal.sets_profile() {
            self.set_profile(job, &path).await?;
        }
        // From here on the host runs (or may run, or boots) the new system.
        self.activate(job, &path, goal.activation().unwrap_or(activation))
            .await?;
        self.keys_after(job, goal).await?;
        // The confirmation's new connection is opened while validation
        // runs: the activation has ended, so it proves the new system lets
        // us in, and its handshake costs no time on the critical path.
        let (name, target) = (
            job.assessment.host.name.clone(),
            job.assessment.host.target.clone(),
        );
        let (validated, fresh) = tokio::join!(
            async {
                match goal.validation() {
                    Validation::BootsNewSystem => self.validate_boot_default(job, &path).await,
                    _ => self.validate(job, &path).await,
                }
            },
            Connection::connect_new(&name, &target, &self.ssh),
        );
        if let Err(failure) = validated {
            if let Ok(fresh) = fresh {
                fresh.close().await;
            }
            return Err(failure);
        }
        self.confirm(job, fresh).await?;
        if self.wants_reboot(job, &path).await? {
            self.reboot_into(job, &path).await?;
        }
        Ok(())
    }

    /// The checks this run validates with (none with `--skip-validation`).
    pub fn checks(&self, host: &Host) -> Vec<HealthCheck> {
        if self.options.skip_validation {
            Vec::new()
        } else {
            host.health_checks.clone()
        }
    }

    /// Reachable (we have a connection), enough free space, and healthy before
    /// we touch it.
    async fn preflight(&self, job: &mut HostJob) -> Result<(), StepFailure> {
        let HostJob {
            assessment,
            connection,
            run,
        } = job;
        let host = &assessment.host;
        let mut unhealthy = false;
        let work = async {
            let min_free_kib = self.options.min_free_space_mib.saturating_mul(1024);
            if let Some(free) = assessment.probe.as_ref().and_then(|p| p.free_kib)
                && free < min_free_kib
            {
                return Err(format!(
                    "only {} MiB free in /nix/store, --min-free-space asks for {} MiB",
                    free / 1024,
                    self.options.min_free_space_mib
                ));
            }
            // A host with no system yet has nothing to be healthy; --force deploys anyway.
            if assessment.current.path.is_none()
                || self.options.force
                || host.health_checks.is_empty()
            {
                return Ok(());
            }
            // One round: is it healthy right now?
            let Err((message, results)) =
                health::validate(connection, &host.health_checks, Duration::ZERO).await
            else {
                return Ok(());
            };
            unhealthy = true;
            self.recorder
                .health_checked(&host.name, "pre-flight", results)
                .await
                .map_err(|e| e.to_string())?;
            Err(format!(
                "unhealthy before deployment, not caused by nix-deploy ({message}); not deployed, use --force to deploy anyway"
            ))
        };
        let verdict = self.recorder.step(run, Step::Preflight, work).await?;
        verdict.map_err(|message| {
            if unhealthy {
                StepFailure::Unhealthy(message)
            } else {
                StepFailure::Preflight(message)
            }
        })
    }

    /// Build the toplevel locally; it must be the path the flake evaluated to.
    async fn build(&self, host: &Host, run: &mut HostRun) -> Result<String, StepFailure> {
        let built = self
            .recorder
            .step(run, Step::Build, self.nix.build(&host.drv_path, |_, _| {}))
            .await?
            .map_err(StepFailure::Build)?;
        if built != host.toplevel {
            return Err(StepFailure::Build(format!(
                "{}: build: produced {built}, but the flake evaluated to {}",
                host.name, host.toplevel
            )));
        }
        Ok(built)
    }

    /// Copy the closure over our master connection and, meanwhile, root it
    /// on the coordinator and say what changes on the host, from its current closure (`old`) and the new
    /// one. The summary is informational: one that cannot be made is
    /// logged, never a failure.
    async fn copy_and_summarize(
        &self,
        job: &mut HostJob,
        path: &str,
        old: &[String],
    ) -> Result<(), StepFailure> {
        let HostJob {
            assessment,
            connection,
            run,
        } = job;
        let host = &assessment.host;
        // The coordinator's GC roots for what was built and what the host
        // ran are made meanwhile too (local, informational).
        let (summary, copied, rooted) = tokio::join!(
            new_closure_summary(&self.nix, old, path),
            self.copy(host, connection, run, path),
            self.protect_roots(assessment, path),
        );
        rooted?;
        match summary {
            Ok(summary) => {
                self.recorder
                    .log(Some(&host.name), format!("changes: {}", summary.one_line()))
                    .await?;
                run.summary = Some(summary);
            }
            Err(e) => {
                self.recorder
                    .log(Some(&host.name), format!("no change summary: {e}"))
                    .await?
            }
        }
        copied
    }

    /// Copy the closure over our master connection.
    async fn copy(
        &self,
        host: &Host,
        connection: &Connection,
        run: &mut HostRun,
        path: &str,
    ) -> Result<(), StepFailure> {
        let copy = async {
            let opts =
                ssh::nix_ssh_opts(&host.target, &self.ssh, Some(connection.control_socket()))
                    .map_err(|e| e.to_string())?;
            self.nix
                .copy(
                    &host.target.store_uri(),
                    path,
                    &opts,
                    self.options.substitute_on_destination,
                    |_, _| {},
                )
                .await
                .map_err(|e| e.to_string())
        };
        self.recorder
            .step(run, Step::Copy, copy)
            .await?
            .map_err(StepFailure::Copy)
    }

    /// Make the new system the profile's next generation (the boot default).
    async fn set_profile(&self, job: &mut HostJob, path: &str) -> Result<(), StepFailure> {
        let HostJob {
            connection, run, ..
        } = job;
        let timeout = self.ssh.command_timeout;
        let work = async {
            let link = connection
                .run_privileged("set-profile", &remote::set_profile_argv(path), timeout)
                .await?;
            Ok::<_, ssh::SshError>(remote::parse_generation_link(&link.stdout))
        };
        let generation = self
            .recorder
            .step(run, Step::SetProfile, work)
            .await?
            .map_err(StepFailure::SetProfile)?;
        run.to.generation = generation;
        Ok(())
    }

    /// Start the activator on the host (detached, with the watchdog armed)
    /// and wait for `switch-to-configuration` to end.
    async fn activate(
        &self,
        job: &mut HostJob,
        path: &str,
        activation: Activation,
    ) -> Result<(), StepFailure> {
        let token = activator::token();
        job.run.token = Some(token.clone());
        let HostJob {
            assessment,
            connection,
            run,
        } = job;
        let switch = activator::Switch {
            host: &assessment.host,
            step: "activate",
            system: path,
            action: activation,
            watchdog: Some((assessment.current.generation, self.options.confirm_timeout)),
            token: &token,
            systemd: assessment.probe.as_ref().is_some_and(|p| p.systemd),
            timeout: self.options.activation_timeout,
        };
        let work = activator::run(connection, &self.ssh, &switch);
        self.recorder
            .step(run, Step::Activate, work)
            .await?
            .map_err(StepFailure::Activate)
    }

    /// The host runs the new system and its health checks pass. Meanwhile
    /// the watchdog's deadline is pushed on, so it never switches the host
    /// back under a validation still in progress (and does, one confirm
    /// window later, if we die).
    async fn validate(&self, job: &mut HostJob, path: &str) -> Result<(), StepFailure> {
        self.validate_as(job, path, "validate", true).await
    }

    /// The validate step, its health checks recorded as `phase`; with
    /// `watchdog`, the activation's watchdog is kept waiting meanwhile.
    pub(super) async fn validate_as(
        &self,
        job: &mut HostJob,
        path: &str,
        phase: &str,
        watchdog: bool,
    ) -> Result<(), StepFailure> {
        let HostJob {
            assessment,
            connection,
            run,
        } = job;
        let host = &assessment.host;
        let checks = self.checks(host);
        let token = run.token.clone().unwrap_or_default();
        let connection = &*connection;
        let work = async {
            let validation = async {
                let (results, verdict) = health::validate_host(
                    connection,
                    host,
                    path,
                    &checks,
                    self.options.health_timeout,
                )
                .await;
                self.recorder
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
                never = self.keep_watchdog_waiting(connection, &token) => match never {},
            }
        };
        self.recorder
            .step(run, Step::Validate, work)
            .await?
            .map(|_| ())
            .map_err(StepFailure::Validate)
    }

    /// Push the watchdog's deadline one confirm window on, again and again.
    async fn keep_watchdog_waiting(
        &self,
        connection: &Connection,
        token: &str,
    ) -> std::convert::Infallible {
        let window = self.options.confirm_timeout;
        let period = (window / 3).clamp(Duration::from_millis(500), Duration::from_secs(10));
        loop {
            // Best effort: a host we cannot reach cannot run its watchdog
            // either, and validation reports the host itself.
            let _ = connection
                .run_privileged(
                    "validate",
                    &remote::extend_argv(token, window.as_secs().max(1)),
                    self.ssh.command_timeout,
                )
                .await;
            tokio::time::sleep(period).await;
        }
    }

    /// Only a new connection proves the new system still lets us in; over it
    /// we decide the activation, atomically against the watchdog: if the
    /// watchdog decided first, the host went back and this fails.
    async fn confirm(
        &self,
        job: &mut HostJob,
        fresh: Result<Connection, ssh::SshError>,
    ) -> Result<(), StepFailure> {
        let HostJob {
            assessment, run, ..
        } = job;
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
                    &remote::decide_argv(&token, Decision::Confirmed),
                    self.ssh.command_timeout,
                )
                .await;
            fresh.close().await;
            match result {
                Ok(_) => Ok(()),
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
        self.recorder
            .step(run, Step::Confirm, work)
            .await?
            .map_err(StepFailure::Confirm)
    }

    /// Hold a canary and re-validate it until `soak` has passed.
    async fn soak(&self, job: &mut HostJob, soak: Duration) -> Result<(), StepFailure> {
        let HostJob {
            assessment,
            connection,
            run,
        } = job;
        let host = &assessment.host;
        let checks = self.checks(host);
        let health_timeout = self.options.health_timeout;
        let work = async {
            let deadline = tokio::time::Instant::now() + soak;
            let period = Duration::from_secs(5).min(soak.max(Duration::from_millis(500)) / 2);
            loop {
                let (_, verdict) = health::validate_host(
                    connection,
                    host,
                    &host.toplevel,
                    &checks,
                    health_timeout.min(soak.max(Duration::from_secs(5))),
                )
                .await;
                verdict.map_err(|e| format!("failed during the canary soak: {e}"))?;
                if tokio::time::Instant::now() >= deadline {
                    return Ok::<(), String>(());
                }
                tokio::time::sleep(period.min(deadline - tokio::time::Instant::now())).await;
            }
        };
        self.recorder
            .step(run, Step::Soak, work)
            .await?
            .map_err(StepFailure::Soak)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_is_recovered_as_its_step_requires() {
        let m = || "h: step: boom".to_string();
        for (failure, expected) in [
            (StepFailure::Preflight(m()), Recovery::Untouched),
            (StepFailure::Unhealthy(m()), Recovery::Unhealthy),
            (StepFailure::Build(m()), Recovery::Untouched),
            (StepFailure::Copy(m()), Recovery::Untouched),
            (StepFailure::SetProfile(m()), Recovery::Untouched),
            (StepFailure::Activate(m()), Recovery::RollBack),
            (StepFailure::Validate(m()), Recovery::RollBack),
            (StepFailure::Soak(m()), Recovery::RollBack),
            (StepFailure::Confirm(m()), Recovery::AwaitWatchdog),
            (StepFailure::Keys(m()), Recovery::Untouched),
            (StepFailure::DryActivate(m()), Recovery::Untouched),
            (StepFailure::KeysAfterActivation(m()), Recovery::RollBack),
            (StepFailure::Reboot(m()), Recovery::RollBackThroughBoot),
            (StepFailure::AfterReboot(m()), Recovery::RollBackThroughBoot),
        ] {
            assert_eq!(failure.recovery(), expected, "{failure:?}");
            assert_eq!(failure.message(), m());
        }
    }
}
