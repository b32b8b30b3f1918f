//! The command line: parses arguments into the core's request, runs the
//! engine in process (or the same commands through the daemon with
//! `--server`, in [`remote`]), and renders results. The only module that
//! prints.
//!
//! - `args`: what clap parses, and its translation into a `Request`;
//! - `apply`: colmena's `apply [GOAL]` and `build`; `eval`: an expression
//!   against the fleet; `doctor`: checks with their fixes; `completions`;
//! - `errors`: an error's causes said once, and hints (`--flake`, a goal or
//!   a number where a host was expected);
//! - `output`: tables and JSON documents (`fleet`: the watched fleet's);
//!   `progress`: live progress;
//! - `client`, `remote`: the daemon's HTTP client and the commands through it;
//! - `serve`: `nix-deploy serve`; `who`: who runs a command, for the
//!   history.
//!
//! Exit codes: 0 all done, 1 a host failed, was rolled back or unreachable,
//! 2 bad input (nothing touched), 3 cancelled.

mod apply;
mod args;
pub mod client;
mod doctor;
mod errors;
mod eval;
mod fleet;
mod ops;
mod output;
mod progress;
mod remote;
mod serve;
mod who;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use nix_deploy_core::events::{DeploymentStatus, Event};
use nix_deploy_core::keys::KeysRequest;
use nix_deploy_core::options::{DeployOptions, OptionsError, Request};
use nix_deploy_core::reports::{CancelAnswer, DeploymentList, PlanReport, StatusReport};
use nix_deploy_core::run::Deployment;

pub use args::{Cli, Command};

use crate::engine::{
    DeployRequest, Engine, EngineConfig, EngineError, ExecJob, RollbackRequest, UploadKeysRequest,
};
use crate::nix::Nix;
use crate::paths;
use crate::store::{Backend, Database, Heartbeat, Role, Store, StoreOptions};
use crate::transport::ssh::{Identities, KeepAlive, SshOptions};
use who::who;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;
pub const EXIT_CANCELLED: u8 = 3;

/// Parse arguments and run; the whole of `main`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                EXIT_BAD_INPUT
            } else {
                EXIT_OK
            });
        }
    };
    if let Command::Completions { shell } = cli.command {
        completions(shell, &mut std::io::stdout());
        return ExitCode::from(EXIT_OK);
    }
    init_tracing(cli.verbose);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let bad_input = e
                .downcast_ref::<EngineError>()
                .is_some_and(EngineError::is_bad_input)
                || e.downcast_ref::<OptionsError>().is_some()
                || e.downcast_ref::<crate::daemon::config::ConfigError>()
                    .is_some()
                || e.downcast_ref::<errors::BadInput>().is_some();
            eprintln!("error: {}", output::escape(&errors::render(&e)));
            ExitCode::from(if bad_input {
                EXIT_BAD_INPUT
            } else {
                EXIT_FAILED
            })
        }
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info,nix_deploy=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIX_DEPLOY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours())
        .try_init();
}

/// ANSI colours only for a person at a terminal: never into the journal, a
/// pipe or a file, and never when `NO_COLOR` is set (to anything but "").
fn colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// `nix-deploy completions SHELL`: the script.
fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "nix-deploy", out);
}

/// Open the history; deployments whose coordinator died are marked
/// `interrupted` on the way (crash recovery). On PostgreSQL this process
/// keeps its leases alive with a heartbeat while the command runs.
async fn open_store(cli: &Cli) -> anyhow::Result<Store> {
    let dir = state_dir(cli);
    let mut options = StoreOptions::sqlite(&dir);
    if let Some(url) = &cli.database {
        options.database = Database::Postgres(url.clone());
    }
    let store = Store::connect(&options).await?;
    if store.backend() == Backend::Postgres {
        let heartbeat = store.start_heartbeat(Role::Cli).await?;
        let mut slot = HEARTBEAT.lock().await;
        if let Some(old) = slot.replace(heartbeat) {
            old.stop().await;
        }
    }
    say_tightened(&store);
    paths::clean_control_dirs(store.dead_holders()).await;
    for id in store.mark_interrupted().await? {
        eprintln!(
            "note: deployment #{id} was interrupted (its coordinator stopped); `nix-deploy resume {id}` continues it"
        );
    }
    Ok(store)
}

/// This command's heartbeat (PostgreSQL), stopped when the command ends:
/// the one process-wide value of the CLI, so that `run` can end it whatever
/// command opened the history.
static HEARTBEAT: tokio::sync::Mutex<Option<Heartbeat>> = tokio::sync::Mutex::const_new(None);

/// Say what opening the history had to make owner-only.
pub(crate) fn say_tightened(store: &Store) {
    for line in store.tightened() {
        eprintln!(
            "note: {} (the state directory is for its owner only)",
            output::escape(line)
        );
    }
}

fn engine_config(
    cli: &Cli,
    nix: Nix,
    control_dir: &std::path::Path,
) -> anyhow::Result<EngineConfig> {
    let ssh = ssh_options(cli, &state_dir(cli), control_dir);
    let mut config = EngineConfig::new(cli.flake(), ssh);
    config.nix = nix;
    config.policy = std::sync::Arc::new(ops::policy()?);
    config.eval_workers = cli.eval_workers.map(usize::from);
    config.source = cli.source;
    // An impure evaluation may read anything: its results are never cached.
    config.eval_cache = !cli.no_eval_cache && !cli.impure;
    Ok(config)
}

/// How this command line calls Nix (`--show-trace`, `--impure`,
/// `--nix-option`, checked against this Nix), for a flake that exists: the
/// default `--flake .` needs a flake.nix here or above.
async fn nix(cli: &Cli) -> anyhow::Result<Nix> {
    if cli.flake.is_none() {
        let here = std::env::current_dir().unwrap_or_default();
        if !errors::flake_above(&here) {
            return Err(errors::BadInput(errors::no_flake_here(&here)).into());
        }
    }
    nix_calls(cli).await
}

/// The Nix flags of this command line, checked against this Nix.
pub(crate) async fn nix_calls(cli: &Cli) -> anyhow::Result<Nix> {
    let nix = Nix {
        flags: cli.nix_flags(),
        builders: cli.builders.clone(),
        ..Nix::default()
    };
    nix.check_options().await.map_err(EngineError::Eval)?;
    Ok(nix)
}

fn state_dir(cli: &Cli) -> std::path::PathBuf {
    cli.state_dir
        .clone()
        .unwrap_or_else(paths::default_state_dir)
}

/// The SSH settings of this command line (shared with `serve`).
pub(crate) fn ssh_options(
    cli: &Cli,
    state_dir: &std::path::Path,
    control_dir: &std::path::Path,
) -> SshOptions {
    let mut ssh = SshOptions::new(cli.ssh_config.clone(), control_dir.to_path_buf());
    ssh.connect_timeout = cli.connect_timeout;
    ssh.command_timeout = cli.command_timeout;
    ssh.identity_file = cli.ssh_identity.clone();
    ssh.keep = match KeepAlive::new(state_dir.join("ssh"), cli.ssh_keep_alive) {
        Ok(keep) => keep,
        Err(e) => {
            // Slower, not wrong: every run connects anew.
            tracing::warn!("not keeping SSH connections between runs: {e}");
            None
        }
    };
    ssh.identities = match Identities::new(state_dir.join("identities")) {
        Ok(identities) => Some(identities),
        Err(e) => {
            tracing::warn!("cannot check which machine each host is: {e}");
            None
        }
    };
    ssh
}

/// The engine for this command line, and the directory of its ssh control
/// sockets (removed when dropped).
async fn engine(cli: &Cli) -> anyhow::Result<(Engine, tempfile::TempDir)> {
    engine_here(cli, None).await
}

/// [`engine`], where `here` is the host that is this machine
/// (`apply-local`): its commands run here, not over SSH.
async fn engine_here(cli: &Cli, here: Option<&str>) -> anyhow::Result<(Engine, tempfile::TempDir)> {
    let nix = nix(cli).await?;
    let store = open_store(cli).await?;
    let control = paths::control_dir(store.holder())?;
    let mut config = engine_config(cli, nix, control.path())?;
    config.ssh.local = here.map(str::to_string);
    Ok((Engine::new(config, store), control))
}

/// A request's options over the built-in defaults.
fn resolve(request: &Request) -> Result<DeployOptions, OptionsError> {
    request.resolve(&DeployOptions::default())
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let result = run_command(cli).await;
    if let Some(heartbeat) = HEARTBEAT.lock().await.take() {
        heartbeat.stop().await;
    }
    result
}

async fn run_command(cli: Cli) -> anyhow::Result<u8> {
    if let Some(server) = cli.server.clone() {
        return match remote::run(&cli, &server).await {
            Ok(code) => Ok(code),
            Err(e) => {
                eprintln!("error: {}", output::escape(&e.to_string()));
                Ok(remote::exit_code(&e))
            }
        };
    }
    match &cli.command {
        Command::Serve(args) => serve::serve(&cli, args).await,
        Command::Plan {
            select,
            strategy,
            no_build,
            revision,
        } => {
            let request = args::plan_request(select, strategy, *no_build, revision.as_deref());
            request.check_for_plan()?;
            let options = resolve(&request)?;
            let (mut engine, _control) = engine(&cli).await?;
            if let Some(revision) = &request.revision {
                engine = engine.with_flake(pin(&cli.flake(), revision)?);
            }
            let report = engine
                .plan(&request.selection(), &options, !*no_build)
                .await?;
            output::show(&cli, &report, output::print_plan)?;
            Ok(plan_exit_code(&report))
        }
        Command::Deploy(args) => {
            deploy(&cli, args::deploy_request(args)?).await.map_err(
                |e| match errors::misplaced_word(&e, args.strategy.parallel) {
                    Some(hint) => errors::BadInput(hint).into(),
                    None => e,
                },
            )
        }
        Command::Approve(args) => ops::approve(&cli, args).await,
        Command::Promote(args) => ops::promote(&cli, args).await,
        Command::Reject(args) => ops::reject(&cli, args).await,
        Command::Audit(args) => ops::audit(&cli, args).await,
        Command::Apply(args) => match args.applied()? {
            apply::Applied::Deploy(request) => deploy(&cli, *request).await,
            apply::Applied::Build(request) => apply::build(&cli, request).await,
            apply::Applied::Keys(body) => upload_keys(&cli, body).await,
        },
        Command::ApplyLocal(args) => {
            let here = args.node()?;
            deploy_here(&cli, args.request(&here), Some(&here)).await
        }
        Command::Build(args) => apply::build(&cli, args.request()?).await,
        Command::Eval(args) => eval::run(&cli, args).await,
        Command::Doctor(args) => doctor::run(&cli, args).await,
        Command::Completions { .. } => Ok(EXIT_OK),
        Command::Exec(args) => {
            let request = args.request();
            let spec = request.resolve()?;
            let (engine, _control) = engine(&cli).await?;
            ops::record(
                engine.store(),
                "exec",
                "hosts",
                serde_json::json!({ "request": &request }),
            )
            .await?;
            let job = ExecJob {
                selection: request.selection(),
                spec,
                trigger: "cli".into(),
                requested_by: who(),
            };
            watch(&cli, |sink, cancel| engine.exec(job, Some(sink), cancel)).await
        }
        Command::UploadKeys {
            select,
            parallel_limit,
        } => upload_keys(&cli, keys_request(select, *parallel_limit)).await,
        Command::ForgetIdentity { host } => {
            if !nix_deploy_core::shell::is_valid_host_name(host) {
                return Err(EngineError::BadOption(format!("`{host}` is not a host name")).into());
            }
            let identities = Identities::new(state_dir(&cli).join("identities"))?;
            if identities.forget(host)? {
                println!("{host}: identity forgotten; the next connection learns it again");
            } else {
                println!("{host}: no identity was known");
            }
            Ok(EXIT_OK)
        }
        Command::Health { host, within } => {
            let (engine, _control) = engine(&cli).await?;
            let health = engine.check_health(host, *within).await?;
            output::show(&cli, &health, output::print_health)?;
            Ok(if health.reachable && health.healthy {
                EXIT_OK
            } else {
                EXIT_FAILED
            })
        }
        Command::Cancel { id } => {
            let store = open_store(&cli).await?;
            let id = match id {
                Some(id) => *id,
                None => match store.running_deployments().await?.last() {
                    Some(id) => *id,
                    None => {
                        eprintln!("error: no deployment is running");
                        return Ok(EXIT_BAD_INPUT);
                    }
                },
            };
            ops::record(
                &store,
                "cancel",
                &format!("deployment #{id}"),
                serde_json::Value::Null,
            )
            .await?;
            if !store.request_cancel(id, &who()).await? {
                eprintln!("error: deployment #{id} is not running");
                return Ok(EXIT_BAD_INPUT);
            }
            let answer = CancelAnswer {
                id,
                cancel_requested: true,
            };
            output::show(&cli, &answer, output::print_cancel)?;
            Ok(EXIT_OK)
        }
        Command::Resume { id, wait } => {
            let (engine, _control) = engine(&cli).await?;
            ops::record(
                engine.store(),
                "resume",
                &id.map_or_else(
                    || "the latest unfinished deployment".to_string(),
                    |id| format!("deployment #{id}"),
                ),
                serde_json::json!({ "wait": wait }),
            )
            .await?;
            watch(&cli, |sink, cancel| {
                engine.resume(*id, *wait, Some(sink), cancel)
            })
            .await
        }
        Command::Rollback {
            host,
            to_generation,
            runtime,
        } => {
            let options = resolve(&args::runtime_request(runtime))?;
            let (engine, _control) = engine(&cli).await?;
            ops::record(
                engine.store(),
                "rollback",
                &format!("host {host}"),
                serde_json::json!({ "to_generation": to_generation }),
            )
            .await?;
            let request = RollbackRequest {
                host: host.clone(),
                to_generation: *to_generation,
                options,
                trigger: "cli".into(),
                requested_by: who(),
            };
            watch(&cli, |sink, _cancel| engine.rollback(request, Some(sink))).await
        }
        Command::Status { live } => {
            let (engine, _control) = engine(&cli).await?;
            let store = engine.store();
            let stored = store.stored_fleet().await?;
            let fleet = if *live {
                Some(engine.observe_fleet(&stored.hosts).await?)
            } else if stored.hosts.is_empty() {
                None
            } else {
                // What a daemon's watch last stored, said to be that.
                Some(stored)
            };
            let status = StatusReport {
                hosts: store.host_states().await?,
                running_deployments: store.running_deployments().await?,
                live: None,
                fleet,
            };
            output::show(&cli, &status, output::print_status)?;
            Ok(EXIT_OK)
        }
        Command::History { limit } => {
            let store = open_store(&cli).await?;
            let list = DeploymentList {
                deployments: store.deployments((*limit).max(1)).await?,
            };
            output::show(&cli, &list, output::print_history)?;
            Ok(EXIT_OK)
        }
        Command::Show { id } => {
            let store = open_store(&cli).await?;
            let id = match id {
                Some(id) => *id,
                None => match store.deployments(1).await?.first() {
                    Some(d) => d.id,
                    None => anyhow::bail!("no deployments recorded yet"),
                },
            };
            let Some(mut deployment) = store.deployment(id).await? else {
                eprintln!("error: no deployment with id {id}");
                return Ok(EXIT_BAD_INPUT);
            };
            deployment.events = Some(store.events(id, 0).await?);
            output::show(&cli, &deployment, output::print_deployment)?;
            Ok(EXIT_OK)
        }
    }
}

/// `upload-keys`' request, as the API takes it.
fn keys_request(select: &args::SelectArgs, parallel_limit: Option<usize>) -> KeysRequest {
    KeysRequest {
        hosts: select.hosts.clone(),
        on: select.on.clone(),
        all: select.all,
        exclude: select.exclude.clone(),
        parallel_limit,
    }
}

/// `upload-keys` (and `apply keys`).
async fn upload_keys(cli: &Cli, body: KeysRequest) -> anyhow::Result<u8> {
    let request = UploadKeysRequest {
        parallel_limit: body.resolve()?,
        selection: body.selection(),
        trigger: "cli".into(),
        requested_by: who(),
    };
    let (engine, _control) = engine(cli).await?;
    ops::record(
        engine.store(),
        "upload-keys",
        "hosts",
        serde_json::json!({ "request": &body }),
    )
    .await?;
    watch(cli, |sink, cancel| {
        engine.upload_keys(request, Some(sink), cancel)
    })
    .await
}

/// The flake pinned to `revision` (`--revision`).
fn pin(flake: &str, revision: &str) -> Result<String, EngineError> {
    crate::daemon::github::flake_at_revision(flake, revision)
        .map_err(|e| EngineError::BadOption(format!("--revision: {e}")))
}

/// `deploy` (and `apply` with a deployment goal).
async fn deploy(cli: &Cli, request: Request) -> anyhow::Result<u8> {
    deploy_here(cli, request, None).await
}

/// [`deploy`]; `here`: the host that is this machine (`apply-local`).
async fn deploy_here(cli: &Cli, request: Request, here: Option<&str>) -> anyhow::Result<u8> {
    request.check_for_deploy()?;
    let options = resolve(&request)?;
    let (mut engine, _control) = engine_here(cli, here).await?;
    if let Some(revision) = &request.revision {
        engine = engine.with_flake(pin(&cli.flake(), revision)?);
    }
    ops::record(
        engine.store(),
        if request.override_window.is_some() {
            "deploy-override-window"
        } else {
            "deploy"
        },
        "hosts",
        serde_json::json!({ "request": &request }),
    )
    .await?;
    let deploy = DeployRequest {
        selection: request.selection(),
        wait: request.wait,
        options,
        trigger: if here.is_some() { "apply-local" } else { "cli" }.into(),
        requested_by: who(),
        source: None,
    };
    watch(cli, |sink, cancel| {
        engine.deploy(deploy, Some(sink), cancel)
    })
    .await
}

/// Run a deployment with live progress, Ctrl-C handling and the final report.
async fn watch<F, Fut>(cli: &Cli, start: F) -> anyhow::Result<u8>
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<Event>, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<Deployment, EngineError>>,
{
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let display = tokio::spawn(progress::render(receiver, fancy(cli)));
    let signals = tokio::spawn(on_signals(cancel.clone()));
    let result = start(sender, cancel).await;
    signals.abort();
    let _ = display.await;
    let deployment = result?;
    output::show(cli, &deployment, output::print_report)?;
    Ok(exit_code(&deployment))
}

/// A plan succeeds when every selected host was evaluated and answered: a
/// host we could not evaluate or reach is not known to be fine.
fn plan_exit_code(report: &PlanReport) -> u8 {
    if report.evaluation.failed.is_empty() && report.unreachable.is_empty() {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// Bars only for a person watching; pipes, CI and `--json` get plain lines.
fn fancy(cli: &Cli) -> bool {
    !cli.json && std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// How a finished deployment ends the command.
fn exit_code(deployment: &Deployment) -> u8 {
    match deployment.status {
        DeploymentStatus::Succeeded => EXIT_OK,
        DeploymentStatus::Cancelled if !deployment.any_failure() => EXIT_CANCELLED,
        // Never started: a newer push of its branch came first.
        DeploymentStatus::Superseded => EXIT_CANCELLED,
        _ => EXIT_FAILED,
    }
}

/// Ctrl-C asks for confirmation (a second Ctrl-C within 10 s) before it
/// cancels; SIGTERM cancels at once. Either way no new host starts and hosts
/// in the middle of activation finish or roll back.
async fn on_signals(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let mut asked: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = interrupt.recv() => {
                if asked.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
                    eprintln!("\ncancelling: no new hosts will start; running hosts finish or roll back");
                    cancel.cancel();
                } else {
                    eprintln!("\npress Ctrl-C again within 10 s to cancel the deployment");
                    asked = Some(std::time::Instant::now());
                }
            }
            _ = terminate.recv() => {
                eprintln!("\nterminated: no new hosts will start; running hosts finish or roll back");
                cancel.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_know_every_command_and_flag() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            completions(shell, &mut script);
            let script = String::from_utf8(script).unwrap();
            for word in [
                "apply",
                "doctor",
                "eval",
                "nix-option",
                "keep-result",
                "dry-activate",
                "apply-local",
                "build-on-target",
                "no-substitute",
                "deploy-rs",
            ] {
                assert!(script.contains(word), "{shell}: {word}");
            }
        }
    }
}
