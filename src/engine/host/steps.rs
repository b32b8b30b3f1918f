//! The pipeline's steps that change a host, up to its activation: pre-flight
//! (and colmena's `replaceUnknownProfiles`), build (here, or on the host:
//! [`super::on_target`]), copy (with the change summary and the
//! coordinator's GC roots beside it; nothing to copy to the host that is
//! this machine), keys, set-profile, activate, and `dry-activate`. Each is
//! recorded as a step of the host's run and fails as that step
//! ([`super::failure::At`]).

use std::time::Duration;

use nix_deploy_core::events::Step;
use nix_deploy_core::exec::{CommandOutput, Tail};
use nix_deploy_core::fleet::{Host, Target};
use nix_deploy_core::goal::Goal;
use nix_deploy_core::keys::{Keep, Key, UploadAt, uploaded_at};
use nix_deploy_core::remote::{self, Activation, HostSystems};
use nix_deploy_core::run::HostRun;

use super::context::{HostContext, HostJob};
use super::failure::{At, Stop};
use super::observe::Assessment;
use super::summary::{current_closure, host_closure_summary, new_closure_summary};
use super::{activator, gcroots, health, keys, keys_back, observe, on_target};
use crate::now_ms;
use crate::store::StoreError;
use crate::transport::ssh::{self, Connection, SshError};

/// colmena's `deployment.replaceUnknownProfiles = false`: a host that runs a
/// system nix-deploy never deployed to it (someone else did) is not
/// replaced. Checked even with `--skip-validation`: it is the host's own
/// setting, not a health check.
pub(crate) async fn refuse_unknown_profile(
    context: &HostContext,
    job: &HostJob,
) -> Result<(), Stop> {
    let host = &job.assessment.host;
    let Some(current) = job.assessment.current.path.as_deref() else {
        return Ok(());
    };
    if host.replace_unknown_profiles
        || context
            .recorder
            .store()
            .deployed_before(&host.name, current)
            .await?
    {
        return Ok(());
    }
    Err(Stop::at(At::Preflight)(format!(
        "{}: pre-flight: it runs {current}, which nix-deploy never deployed to it, and deployment.replaceUnknownProfiles is false: not replaced",
        host.name
    )))
}

/// Reachable (we have a connection), enough free space, and healthy before
/// we touch it. Skipped with `--skip-validation`.
pub(crate) async fn preflight(context: &HostContext, job: &mut HostJob) -> Result<(), Stop> {
    if context.options.skip_validation {
        return Ok(());
    }
    let options = &context.options;
    let (assessment, connection, run) = job.parts();
    let host = &assessment.host;
    let mut unhealthy = false;
    let work = async {
        let min_free_kib = options.min_free_space_mib.saturating_mul(1024);
        if let Some(free) = assessment.probe.as_ref().and_then(|p| p.free_kib)
            && free < min_free_kib
        {
            return Err(format!(
                "only {} MiB free in /nix/store, --min-free-space asks for {} MiB",
                free / 1024,
                options.min_free_space_mib
            ));
        }
        // A host with no system yet has nothing to be healthy; --force deploys anyway.
        if assessment.current.path.is_none() || options.force || host.health_checks.is_empty() {
            return Ok(());
        }
        // One round: is it healthy right now?
        let Err((message, results)) =
            health::validate(connection, &host.health_checks, Duration::ZERO).await
        else {
            return Ok(());
        };
        unhealthy = true;
        context
            .recorder
            .health_checked(&host.name, "pre-flight", results)
            .await
            .map_err(|e| e.to_string())?;
        Err(format!(
            "unhealthy before deployment, not caused by nix-deploy ({message}); not deployed, use --force to deploy anyway"
        ))
    };
    let verdict = context.recorder.step(run, Step::Preflight, work).await?;
    verdict.map_err(|message| {
        Stop::at(if unhealthy {
            At::Unhealthy
        } else {
            At::Preflight
        })(message)
    })
}

/// Build the toplevel (meanwhile the host's current closure is read for
/// the change summary), then copy it. Returns the built system.
pub(crate) async fn build_copy_and_summarize(
    context: &HostContext,
    job: &mut HostJob,
) -> Result<String, Stop> {
    // The host's side of the change summary is read while we build (not
    // while the closure copies: a host without nix-daemon may refuse a
    // second writer of its store database at that moment).
    let (path, old_closure) = {
        let (assessment, connection, run) = job.parts();
        let has_system = assessment.current.path.is_some();
        tokio::join!(build(context, &assessment.host, connection, run), async {
            if has_system {
                current_closure(connection).await
            } else {
                Vec::new()
            }
        })
    };
    let path = path?;
    copy_and_summarize(context, job, &path, &old_closure).await?;
    Ok(path)
}

/// Whether the host builds its own system: asked for, the host is not
/// this machine (where building here is building on it), and it is not a
/// promotion's target (which gets its source's system, never a build).
fn builds_on_target(context: &HostContext, host: &Host, connection: &Connection) -> bool {
    context.options.build_on_target
        && !connection.is_local()
        && !context.fetch_from.contains_key(&host.name)
}

/// Build the toplevel, here or on the host itself ([`on_target`]); it must
/// be the path the flake evaluated to (deploy-rs: the wrapper holding it).
/// Returns the toplevel. A promotion's target fetches its source host's
/// system instead.
async fn build(
    context: &HostContext,
    host: &Host,
    connection: &Connection,
    run: &mut HostRun,
) -> Result<String, Stop> {
    if let Some(source) = context.fetch_from.get(&host.name) {
        return fetch(context, host, source, run).await;
    }
    if builds_on_target(context, host, connection) {
        let work = on_target::build(&context.nix, &context.ssh, connection, host);
        return context
            .recorder
            .step(run, Step::Build, work)
            .await?
            .map_err(Stop::at(At::Build));
    }
    let built = context
        .recorder
        .step(
            run,
            Step::Build,
            context.nix.build(&host.system.drv_path, |_, _| {}),
        )
        .await?
        .map_err(Stop::at(At::Build))?;
    if built != host.system.build_output() {
        return Err(Stop::at(At::Build)(format!(
            "{}: build: produced {built}, but the flake evaluated to {}",
            host.name,
            host.system.build_output()
        )));
    }
    Ok(host.toplevel().to_string())
}

/// A promotion: the system the source host runs, copied from it into the
/// coordinator's store (the coordinator may never have had it), from where
/// the copy step takes it to the target. Nothing is evaluated or built.
async fn fetch(
    context: &HostContext,
    host: &Host,
    source: &Target,
    run: &mut HostRun,
) -> Result<String, Stop> {
    let fetch = async {
        let uri = source
            .store_uri()
            .ok_or_else(|| format!("{}: the source host has no SSH destination", host.name))?;
        let opts = ssh::nix_ssh_opts(source, &context.ssh, None).map_err(|e| e.to_string())?;
        context
            .nix
            .copy_from(&uri, host.toplevel(), &opts)
            .await
            .map_err(|e| e.to_string())
    };
    context
        .recorder
        .step(run, Step::Fetch, fetch)
        .await?
        .map_err(Stop::at(At::Build))?;
    Ok(host.toplevel().to_string())
}

/// Copy the closure over our master connection and, meanwhile, root it on
/// the coordinator and say what changes on the host, from its current
/// closure (`old`) and the new one. The summary is informational: one that
/// cannot be made is logged, never a failure.
async fn copy_and_summarize(
    context: &HostContext,
    job: &mut HostJob,
    path: &str,
    old: &[String],
) -> Result<(), Stop> {
    let (assessment, connection, run) = job.parts();
    let host = &assessment.host;
    if builds_on_target(context, host, connection) {
        // The host built it: nothing to copy, nothing to root here.
        if context.options.keep_result {
            context
                .recorder
                .log(
                    Some(&host.name),
                    "--keep-result: the host built its own system; this machine's store does not hold it, so nothing is kept here".to_string(),
                )
                .await?;
        }
        let summary = host_closure_summary(connection, old, path).await;
        return log_summary(context, run, &host.name, summary)
            .await
            .map_err(Stop::from);
    }
    // The coordinator's GC roots for what was built and what the host ran
    // are made meanwhile too (local, informational).
    let (summary, copied, rooted) = tokio::join!(
        new_closure_summary(&context.nix, old, path),
        copy(context, host, connection, run, path),
        protect_roots(context, assessment, path),
    );
    rooted?;
    log_summary(context, run, &host.name, summary).await?;
    copied
}

/// Say what changes (informational: a summary that cannot be made is
/// logged, never a failure).
async fn log_summary(
    context: &HostContext,
    run: &mut HostRun,
    host: &str,
    summary: Result<nix_deploy_core::summary::ChangeSummary, String>,
) -> Result<(), StoreError> {
    match summary {
        Ok(summary) => {
            context
                .recorder
                .log(Some(host), format!("changes: {}", summary.one_line()))
                .await?;
            run.summary = Some(summary);
        }
        Err(e) => {
            context
                .recorder
                .log(Some(host), format!("no change summary: {e}"))
                .await?
        }
    }
    Ok(())
}

/// Copy the closure over our master connection (to the host that is this
/// machine, nothing: its store is ours).
async fn copy(
    context: &HostContext,
    host: &Host,
    connection: &Connection,
    run: &mut HostRun,
    path: &str,
) -> Result<(), Stop> {
    if connection.is_local() {
        return Ok(());
    }
    let copy = async {
        let opts = ssh::nix_ssh_opts(&host.target, &context.ssh, connection.control_socket())
            .map_err(|e| e.to_string())?;
        let uri = host
            .target
            .store_uri()
            .ok_or_else(|| format!("{}: copy: the host has no targetHost", host.name))?;
        context
            .nix
            .copy(
                &uri,
                path,
                &opts,
                context.options.substitute_on_destination,
                |_, _| {},
            )
            .await
            .map_err(|e| e.to_string())
    };
    context
        .recorder
        .step(run, Step::Copy, copy)
        .await?
        .map_err(Stop::at(At::Copy))
}

/// Make what was built (and what the host ran before) GC roots on the
/// coordinator. Informational: a root that cannot be made is logged.
async fn protect_roots(
    context: &HostContext,
    assessment: &Assessment,
    path: &str,
) -> Result<(), StoreError> {
    let host = &assessment.host.name;
    let state_dir = context.recorder.store().state_dir().to_path_buf();
    if context.options.keep_result
        && let Err(e) = gcroots::keep_result(&context.nix, &state_dir, host, path).await
    {
        context
            .recorder
            .log(Some(host), format!("--keep-result: {e}"))
            .await?;
    }
    // What it runs and what it boots: a `--goal test` deployment leaves the
    // two apart, and both stay wanted.
    let probe = assessment.probe.as_ref();
    let kept: Vec<&str> = [
        assessment.current.path.as_deref(),
        probe.and_then(|p| p.profile_system.as_deref()),
    ]
    .into_iter()
    .flatten()
    .collect();
    match gcroots::protect(&context.nix, &state_dir, host, path, &kept).await {
        Ok(done) if !done.pruned.is_empty() => {
            context
                .recorder
                .log(
                    Some(host),
                    format!("gc roots: pruned {}", done.pruned.join(", ")),
                )
                .await
        }
        Ok(_) => Ok(()),
        Err(e) => {
            context
                .recorder
                .log(Some(host), format!("no gc root on the coordinator: {e}"))
                .await
        }
    }
}

/// The host's keys uploaded `when` (a step of its own, when it has any).
/// Before the activation their users may not exist yet; after it the new
/// system made them, unless it only becomes the boot default. What they
/// replace is kept for the way back.
pub(crate) async fn keys(
    context: &HostContext,
    job: &mut HostJob,
    when: UploadAt,
    goal: Goal,
) -> Result<(), Stop> {
    let (require_ownership, at) = match when {
        UploadAt::PreActivation => (false, At::Keys),
        UploadAt::PostActivation => (goal.runs_new_system(), At::KeysAfterActivation),
    };
    upload_keys(context, job, Some(when), require_ownership, true)
        .await?
        .map_err(Stop::at(at))
}

/// Upload the host's keys of `when` (all of them with `None`), if it has
/// any (a step of its own). With `keep_old`, what they replace is kept in
/// the deployment's undo set; not after a reboot, which emptied `/run`: what
/// is missing then was there before the reboot, not before the deployment.
/// What was uploaded is logged, also when a later key fails.
pub(crate) async fn upload_keys(
    context: &HostContext,
    job: &mut HostJob,
    when: Option<UploadAt>,
    require_ownership: bool,
    keep_old: bool,
) -> Result<Result<(), String>, StoreError> {
    if context.options.no_keys {
        return Ok(Ok(()));
    }
    let (assessment, connection, run) = job.parts();
    let host = &assessment.host;
    let selected: Vec<&Key> = match when {
        Some(when) => uploaded_at(&host.keys, when),
        None => host.keys.iter().collect(),
    };
    if selected.is_empty() {
        return Ok(Ok(()));
    }
    let keep = if keep_old {
        keys_back::keep(context, &assessment.before)
    } else {
        Keep::Nothing
    };
    let mut done = Vec::new();
    let work = keys::upload(
        connection,
        &context.keys,
        host,
        &selected,
        require_ownership,
        keep,
        &mut done,
    );
    let result = context.recorder.step(run, Step::Keys, work).await?;
    if !done.is_empty() {
        context
            .recorder
            .log(Some(&host.name), format!("keys: {}", done.join("; ")))
            .await?;
    }
    Ok(result)
}

/// Set the system profile to `path` (when `profile`), start the activator
/// on the host (detached, with the watchdog armed unless the host turned
/// magic rollback off: deploy-rs's `magicRollback = false`) and wait for
/// `switch-to-configuration` to end. The profile, the start and the first
/// wait are one remote call ([`activator::start`]); the steps are still
/// recorded apart, and told apart when they fail: a profile that could not
/// be set changed nothing (`set-profile`), a failed start or switch is
/// `activate` (the way back restores the boot default too). `set-profile`
/// ends as long after the call started as `nix-env` took on the host.
/// Returns what the host runs and boots right after the activation, when
/// the call that saw it end said so.
pub(crate) async fn activate(
    context: &HostContext,
    job: &mut HostJob,
    path: &str,
    activation: Activation,
    profile: bool,
) -> Result<Option<HostSystems>, Stop> {
    let token = activator::token();
    job.run.token = Some(token.clone());
    let (assessment, connection, run) = job.parts();
    let switch = activator::Switch {
        host: &assessment.host,
        step: "activate",
        what: activator::What::Activate {
            system: path,
            action: activation,
            watchdog: assessment
                .host
                .magic_rollback
                .then_some((&assessment.before, context.options.confirm_timeout)),
        },
        token: &token,
        systemd: assessment.probe.as_ref().is_some_and(|p| p.systemd),
        timeout: context.options.activation_timeout,
        fence: &context.fence,
    };
    let recorder = &context.recorder;
    let deadline = std::time::Instant::now() + switch.timeout;
    // Recorded before the call: a coordinator killed during it leaves a
    // host run that says the host may be touched (its token, this step).
    let first_step = if profile {
        Step::SetProfile
    } else {
        Step::Activate
    };
    recorder.begin(run, first_step, None).await?;
    let called = now_ms();
    let first = activator::start(
        connection,
        &context.ssh,
        &switch,
        profile.then_some(path),
        deadline,
    )
    .await;
    let mut answer = match first {
        Ok(answer) => answer,
        Err(activator::StartError::ProfileNotSet(message)) if profile => {
            let failed = recorder.end(run, Err::<(), _>(message), None).await?;
            return failed.map(|_| None).map_err(Stop::at(At::SetProfile));
        }
        Err(
            activator::StartError::ProfileNotSet(message) | activator::StartError::Failed(message),
        ) => {
            if profile {
                // The profile was set; the activator did not start.
                let _ = recorder.end(run, Ok::<(), String>(()), None).await?;
                recorder.begin(run, Step::Activate, None).await?;
            }
            let failed = recorder.end(run, Err::<(), _>(message), None).await?;
            return failed.map(|_| None).map_err(Stop::at(At::Activate));
        }
    };
    if let Some((generation, ms)) = answer.profile {
        run.to.generation = generation;
        let set_at = called + ms as i64;
        let _ = recorder
            .end(run, Ok::<(), String>(()), Some(set_at))
            .await?;
        recorder.begin(run, Step::Activate, Some(set_at)).await?;
    }
    let result =
        activator::finish(connection, &context.ssh, &switch, deadline, answer.status).await;
    recorder
        .end(run, result, None)
        .await?
        .map_err(Stop::at(At::Activate))?;
    let mut systems = answer.systems.take();
    if profile && run.to.generation.is_none() {
        // The call's answer was lost (a host that stopped answering for a
        // while): the activator ran, so the profile was set; read which
        // generation it made.
        if systems.is_none() {
            systems = observe::systems(connection, "activate", context.ssh.command_timeout)
                .await
                .ok();
        }
        if let Some(now) = systems.as_ref().filter(|s| s.boot.as_deref() == Some(path)) {
            run.to.generation = now.boot_generation;
        }
    }
    Ok(systems)
}

/// `dry-activate`: what the new system would start, stop and restart.
/// Nothing changes on the host; the output is kept with the host run.
pub(crate) async fn dry_activate(
    context: &HostContext,
    job: &mut HostJob,
    path: &str,
) -> Result<(), Stop> {
    let (assessment, connection, run) = job.parts();
    let host = &assessment.host.name;
    let mut output: Option<CommandOutput> = None;
    let timeout = context.options.activation_timeout;
    let work = async {
        let tails = |stdout: &str, stderr: &str, code| {
            let (mut out, mut err) = (Tail::default(), Tail::default());
            stdout.lines().for_each(|l| out.push(l));
            stderr.lines().for_each(|l| err.push(l));
            CommandOutput {
                exit_code: code,
                stdout: out.text(),
                stderr: err.text(),
                withheld: false,
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
    let result = context.recorder.step(run, Step::Activate, work).await?;
    if let Some(output) = &output {
        let text = [output.stdout.as_str(), output.stderr.as_str()]
            .iter()
            .filter(|t| !t.trim().is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        context
            .recorder
            .log(
                Some(host),
                format!("dry-activate output:\n{}", text.trim_end()),
            )
            .await?;
    }
    run.output = output;
    result.map_err(Stop::at(At::DryActivate))
}
