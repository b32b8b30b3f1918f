//! The pipeline's steps that depend on the deployment's goal
//! ([`nix_deploy_core::goal`]): which goal a host run has, what `boot`
//! validation checks, `dry-activate`, the keys around the activation, and
//! the GC roots of what was built. The pipeline itself only calls them.

use nix_deploy_core::events::{HostStatus, Step};
use nix_deploy_core::exec::{CommandOutput, Tail};
use nix_deploy_core::goal::Goal;
use nix_deploy_core::keys::{Key, UploadAt, uploaded_at};
use nix_deploy_core::remote::{self, Activation};

use super::gcroots;
use super::keys;
use super::pipeline::{HostContext, HostJob, StepFailure};
use super::probe::Assessment;
use super::recovery::Back;
use crate::store::StoreError;
use crate::transport::ssh::SshError;

impl HostContext {
    /// The goal of a host run: the deployment's, except while blue-green
    /// stages hosts (`test`; it commits them itself).
    pub fn goal(&self, activation: Activation) -> Goal {
        match activation {
            Activation::Test => Goal::Test,
            _ => self.options.goal,
        }
    }

    /// How a host whose activation or validation failed goes back.
    pub fn back(&self, activation: Activation) -> Back {
        Back::after(self.goal(activation).activation().unwrap_or(activation))
    }

    /// How a host run that went through its pipeline ends: `None` while
    /// blue-green has only staged it.
    pub fn success_status(&self, activation: Activation) -> Option<HostStatus> {
        match (activation, self.goal(activation)) {
            (Activation::Test, _) => None,
            (_, Goal::DryActivate | Goal::Push) => Some(HostStatus::Succeeded),
            _ => Some(HostStatus::Deployed),
        }
    }

    /// Make what was built (and what the host ran before) GC roots on the
    /// coordinator. Informational: a root that cannot be made is logged.
    pub(super) async fn protect_roots(
        &self,
        assessment: &Assessment,
        path: &str,
    ) -> Result<(), StoreError> {
        let host = &assessment.host.name;
        let state_dir = self.recorder.store().state_dir().to_path_buf();
        let previous = assessment.current.path.as_deref();
        if self.options.keep_result
            && let Err(e) = gcroots::keep_result(&self.nix, &state_dir, host, path).await
        {
            self.recorder
                .log(Some(host), format!("--keep-result: {e}"))
                .await?;
        }
        match gcroots::protect(&self.nix, &state_dir, host, path, previous).await {
            Ok(done) if !done.pruned.is_empty() => {
                self.recorder
                    .log(
                        Some(host),
                        format!("gc roots: pruned {}", done.pruned.join(", ")),
                    )
                    .await
            }
            Ok(_) => Ok(()),
            Err(e) => {
                self.recorder
                    .log(Some(host), format!("no gc root on the coordinator: {e}"))
                    .await
            }
        }
    }

    /// Upload the host's keys of `when`, if it has any (a step of its own).
    pub(super) async fn upload_keys(
        &self,
        job: &mut HostJob,
        when: Option<UploadAt>,
        require_ownership: bool,
    ) -> Result<Result<(), String>, StoreError> {
        let HostJob {
            assessment,
            connection,
            run,
        } = job;
        let host = &assessment.host;
        if self.options.no_keys {
            return Ok(Ok(()));
        }
        let selected: Vec<&Key> = match when {
            Some(when) => uploaded_at(&host.keys, when),
            None => host.keys.iter().collect(),
        };
        if selected.is_empty() {
            return Ok(Ok(()));
        }
        let work = keys::upload(connection, &self.keys, host, &selected, require_ownership);
        match self.recorder.step(run, Step::Keys, work).await? {
            Ok(lines) => {
                self.recorder
                    .log(Some(&host.name), format!("keys: {}", lines.join("; ")))
                    .await?;
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    /// Keys before the activation (their users may not exist yet).
    pub(super) async fn keys_before(&self, job: &mut HostJob) -> Result<(), StepFailure> {
        self.upload_keys(job, Some(UploadAt::PreActivation), false)
            .await?
            .map_err(StepFailure::Keys)
    }

    /// Keys after the activation (the new system made their users, unless
    /// it only becomes the boot default).
    pub(super) async fn keys_after(
        &self,
        job: &mut HostJob,
        goal: Goal,
    ) -> Result<(), StepFailure> {
        self.upload_keys(job, Some(UploadAt::PostActivation), goal.runs_new_system())
            .await?
            .map_err(StepFailure::KeysAfterActivation)
    }

    /// `boot`: the profile (the boot default) is the new system; the running
    /// system did not change. Health checks wait for a reboot.
    pub(super) async fn validate_boot_default(
        &self,
        job: &mut HostJob,
        path: &str,
    ) -> Result<(), StepFailure> {
        let HostJob {
            assessment,
            connection,
            run,
        } = job;
        let host = &assessment.host.name;
        let timeout = self.ssh.command_timeout;
        let work = async {
            let boot = connection
                .run("validate", &remote::boot_default_argv(), timeout)
                .await
                .map_err(|e| e.to_string())?;
            let boot = boot.stdout.trim();
            if boot != path {
                return Err(format!(
                    "{host}: validate: the system profile (the boot default) is {boot}, expected {path}"
                ));
            }
            Ok(format!("{host} boots {path} next (pending reboot)"))
        };
        self.recorder
            .step(run, Step::Validate, work)
            .await?
            .map(|_| ())
            .map_err(StepFailure::Validate)
    }

    /// `dry-activate`: what the new system would start, stop and restart.
    /// Nothing changes on the host; the output is kept with the host run.
    pub(super) async fn dry_activate(
        &self,
        job: &mut HostJob,
        path: &str,
    ) -> Result<(), StepFailure> {
        let HostJob {
            assessment,
            connection,
            run,
        } = job;
        let host = &assessment.host.name;
        let mut output: Option<CommandOutput> = None;
        let timeout = self.options.activation_timeout;
        let work = async {
            let tails = |stdout: &str, stderr: &str, code| {
                let (mut out, mut err) = (Tail::default(), Tail::default());
                stdout.lines().for_each(|l| out.push(l));
                stderr.lines().for_each(|l| err.push(l));
                CommandOutput {
                    exit_code: code,
                    stdout: out.text(),
                    stderr: err.text(),
                }
            };
            match connection
                .run_privileged("dry-activate", &remote::dry_activate_argv(path), timeout)
                .await
            {
                Ok(out) => {
                    output = Some(tails(&out.stdout, &out.stderr, Some(0)));
                    Ok(())
                }
                Err(SshError::Exit { code, stderr, .. }) => {
                    output = Some(tails("", &stderr, code.parse().ok()));
                    Err(format!(
                        "{host}: dry-activate: `{path}/bin/switch-to-configuration dry-activate` failed (exit code {code}){}",
                        crate::process::format_tail(&stderr)
                    ))
                }
                Err(e) => Err(e.to_string()),
            }
        };
        let result = self.recorder.step(run, Step::Activate, work).await?;
        if let Some(output) = &output {
            let text = [output.stdout.as_str(), output.stderr.as_str()]
                .iter()
                .filter(|t| !t.trim().is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join("\n");
            self.recorder
                .log(
                    Some(host),
                    format!("dry-activate output:\n{}", text.trim_end()),
                )
                .await?;
        }
        run.output = output;
        result.map_err(StepFailure::DryActivate)
    }
}
