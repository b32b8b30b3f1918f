//! The command line: parses arguments, builds the engine, renders results.
//!
//! Exit codes: 0 all done, 1 a host failed, was rolled back or unreachable,
//! 2 bad input (nothing touched), 3 cancelled.

mod output;
mod remote;
mod serve;
pub use output::{deployment_json, report_json};

/// Formatting helpers shared with the API's reports.
pub mod output_helpers {
    pub use super::output::{duration_ms, generation, seconds, short_path, timestamp};
}
mod progress;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::engine::{DeployRequest, Engine, EngineConfig, EngineError};
use crate::events::DeploymentStatus;
use crate::inventory::Selection;
use crate::plan::{OptionsInput, PlanOptions};
use crate::ssh::SshOptions;
use crate::store::Store;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;
pub const EXIT_CANCELLED: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "nix-deploy",
    version,
    about = "Deploy a NixOS fleet: only what changed, in order, with rollback"
)]
pub struct Cli {
    /// The flake whose nixosConfigurations make the fleet [default: .].
    #[arg(long, global = true, env = "NIX_DEPLOY_FLAKE")]
    pub flake: Option<String>,
    /// Talk to a running daemon instead of working in-process.
    #[arg(long, global = true, value_name = "URL", env = "NIX_DEPLOY_SERVER")]
    pub server: Option<String>,
    /// File holding the bearer token for --server.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "NIX_DEPLOY_TOKEN_FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// An ssh config file used instead of ~/.ssh/config, for our sessions and `nix copy`.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "NIX_DEPLOY_SSH_CONFIG"
    )]
    pub ssh_config: Option<PathBuf>,
    /// Where the history database lives [default: $XDG_STATE_HOME/nix-deploy, /var/lib/nix-deploy for root].
    #[arg(long, global = true, value_name = "DIR", env = "NIX_DEPLOY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print one JSON document instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// SSH connect timeout (seconds, or e.g. 10s, 1m).
    #[arg(long, global = true, default_value = "10s", value_name = "DURATION", value_parser = crate::duration::parse_timeout)]
    pub connect_timeout: Duration,
    /// Timeout of each remote command (activation has its own).
    #[arg(long, global = true, default_value = "1m", value_name = "DURATION", value_parser = crate::duration::parse_timeout)]
    pub command_timeout: Duration,
    /// More logging on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show what a deployment would do: each host's state and generation. Changes nothing.
    Plan {
        #[command(flatten)]
        select: SelectArgs,
        #[command(flatten)]
        strategy: StrategyArgs,
        /// Do not build changed toplevels locally, so no change summaries.
        #[arg(long)]
        no_build: bool,
    },
    /// Deploy changed hosts, with live progress and a summary.
    Deploy(DeployArgs),
    /// Per host: the last known system, generation and last result (from history).
    Status,
    /// Past deployments, newest first.
    History {
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// One deployment in detail: its hosts and events.
    Show {
        /// Deployment id [default: the latest].
        id: Option<i64>,
    },
    /// Stop a running deployment: no new hosts start; hosts in the middle of
    /// activation finish or roll back.
    Cancel {
        /// Deployment id [default: the running one].
        id: Option<i64>,
    },
    /// Continue a cancelled, failed or interrupted deployment with the hosts
    /// not yet done (every host is probed again first).
    Resume {
        /// Deployment id [default: the latest that did not succeed].
        id: Option<i64>,
        /// Wait for busy hosts instead of refusing.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Switch a host back to an earlier generation (default: the one before
    /// the current), verify it, and record it in history.
    Rollback {
        host: String,
        #[arg(long, value_name = "N")]
        to_generation: Option<u32>,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Probe one host and run its health checks now.
    Health {
        host: String,
        /// Retry failing checks for up to this long.
        #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = crate::duration::parse)]
        within: Duration,
    },
    /// Run the daemon: the HTTP API, chat and GitHub hooks, metrics.
    Serve(serve::ServeArgs),
}

/// Timeouts and checks of a run that touches hosts.
#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Overall deadline of a host's health validation (seconds, or e.g. 2m).
    #[arg(long, default_value = "2m", value_name = "DURATION", value_parser = crate::duration::parse_timeout)]
    pub health_timeout: Duration,
    /// How long the watchdog on a host waits for confirmation (over a new SSH
    /// connection) before switching back to the previous generation by itself.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = crate::duration::parse_timeout)]
    pub confirm_timeout: Duration,
    /// Pre-flight: free space /nix/store must have on the host, in MiB.
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    pub min_free_space: u64,
    /// Emergency deploy: skip pre-flight and health checks (the host must
    /// still run the new system afterwards).
    #[arg(long)]
    pub skip_validation: bool,
    /// Timeout of `switch-to-configuration` (seconds, or e.g. 10m).
    #[arg(long, default_value = "10m", value_name = "DURATION", value_parser = crate::duration::parse_timeout)]
    pub activation_timeout: Duration,
}

impl RuntimeArgs {
    fn apply(&self, config: &mut EngineConfig) {
        config.health_timeout = self.health_timeout;
        config.confirm_timeout = self.confirm_timeout;
        config.min_free_kib = self.min_free_space.saturating_mul(1024);
        config.skip_validation = self.skip_validation;
        config.activation_timeout = self.activation_timeout;
    }
}

#[derive(Args, Debug, Clone, Default)]
pub struct SelectArgs {
    /// Hosts by name, or `@tag`. None means every host.
    pub hosts: Vec<String>,
    /// Every host of the fleet.
    #[arg(long)]
    pub all: bool,
    /// Hosts with this tag (`@web` or `web`); repeatable.
    #[arg(long, value_name = "@TAG")]
    pub on: Vec<String>,
}

impl SelectArgs {
    fn selection(&self) -> Selection {
        Selection {
            names: self.hosts.clone(),
            tags: self.on.clone(),
            all: self.all,
        }
    }
}

/// How the deployment is ordered and gated (DESIGN §5). Unset options take
/// the defaults (locally) or the daemon's configured defaults (with --server).
#[derive(Args, Debug, Clone)]
pub struct StrategyArgs {
    /// smart (default), parallel, rolling, sequential (rolling, batches of 1), canary or blue-green.
    #[arg(long, env = "NIX_DEPLOY_STRATEGY")]
    pub strategy: Option<String>,
    /// Shorthand for --strategy parallel.
    #[arg(long, conflicts_with_all = ["sequential"])]
    pub parallel: bool,
    /// Shorthand for --strategy sequential.
    #[arg(long)]
    pub sequential: bool,
    /// Rolling batch size: N hosts or N% of the hosts to deploy [default: 1].
    #[arg(long, value_name = "N|N%")]
    pub batch_size: Option<String>,
    /// Canary host(s) for --strategy canary [default: the first changed host by name].
    #[arg(long, value_name = "HOST")]
    pub canary: Vec<String>,
    /// How long a canary is held and re-validated before the rest follow (e.g. 30s, 5m) [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse)]
    pub canary_soak: Option<Duration>,
    /// Abort when more than N hosts (or N% of the hosts to deploy) fail [default: 0].
    #[arg(long, value_name = "N|N%")]
    pub max_failures: Option<String>,
    /// Never abort on failures; only the dependents of a failed host are skipped.
    #[arg(long)]
    pub continue_on_failure: bool,
    /// On abort, roll back every host this deployment changed [default: true].
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub rollback_all_on_abort: Option<bool>,
    /// Deploy (re-activate) unchanged hosts too.
    #[arg(long)]
    pub force: bool,
    /// Hosts deployed at once [default: 4].
    #[arg(long, value_name = "N")]
    pub parallel_limit: Option<usize>,
}

impl StrategyArgs {
    pub fn input(&self) -> OptionsInput {
        OptionsInput {
            strategy: self.strategy.clone(),
            parallel: self.parallel,
            sequential: self.sequential,
            batch_size: self.batch_size.clone(),
            canary: self.canary.clone(),
            canary_soak: self.canary_soak,
            max_failures: self.max_failures.clone(),
            continue_on_failure: self.continue_on_failure,
            rollback_all_on_abort: self.rollback_all_on_abort,
            force: self.force,
            parallel_limit: self.parallel_limit,
        }
    }

    /// The planner's options with the built-in defaults; errors here are bad input.
    pub fn options(&self) -> Result<PlanOptions, EngineError> {
        Ok(self.input().resolve(&PlanOptions::default())?)
    }

    /// The options as a JSON object for the daemon (only what was set).
    fn json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut map = serde_json::Map::new();
        let mut put = |key: &str, value: serde_json::Value| {
            if !value.is_null() && value != serde_json::Value::Bool(false) {
                map.insert(key.into(), value);
            }
        };
        put("strategy", serde_json::json!(self.strategy));
        put("parallel", serde_json::json!(self.parallel));
        put("sequential", serde_json::json!(self.sequential));
        put("batch_size", serde_json::json!(self.batch_size));
        if !self.canary.is_empty() {
            put("canary", serde_json::json!(self.canary));
        }
        put(
            "canary_soak",
            serde_json::json!(self.canary_soak.map(crate::duration::format)),
        );
        put("max_failures", serde_json::json!(self.max_failures));
        put(
            "continue_on_failure",
            serde_json::json!(self.continue_on_failure),
        );
        put("force", serde_json::json!(self.force));
        put("parallel_limit", serde_json::json!(self.parallel_limit));
        if let Some(v) = self.rollback_all_on_abort {
            map.insert("rollback_all_on_abort".into(), serde_json::json!(v));
        }
        map
    }
}

#[derive(Args, Debug, Clone)]
pub struct DeployArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    #[command(flatten)]
    pub strategy: StrategyArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Wait for hosts another deployment holds instead of refusing.
    #[arg(long)]
    pub wait: bool,
    /// Deploy the flake pinned to this commit (as CI does after a push).
    #[arg(long, value_name = "SHA")]
    pub revision: Option<String>,
    /// Let hosts fetch from their substituters instead of receiving everything from us.
    #[arg(long)]
    pub substitute_on_destination: bool,
}

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
            let code = match e.downcast_ref::<EngineError>() {
                Some(engine) if engine.is_bad_input() => EXIT_BAD_INPUT,
                _ => EXIT_FAILED,
            };
            eprintln!("error: {e:#}");
            ExitCode::from(code)
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
        .try_init();
}

/// `$XDG_STATE_HOME/nix-deploy`, or `/var/lib/nix-deploy` for root.
pub fn default_state_dir() -> PathBuf {
    if libc_geteuid_is_root() {
        return PathBuf::from("/var/lib/nix-deploy");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("nix-deploy");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/state/nix-deploy")
}

fn libc_geteuid_is_root() -> bool {
    current_uid() == 0
}

/// A short directory for ssh control sockets (their paths are limited to ~100 bytes).
pub(crate) fn control_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("nix-deploy-")
        .tempdir_in(std::env::temp_dir())
        .context("creating a directory for ssh control sockets")
}

/// Open the history; deployments whose coordinator died are marked
/// `interrupted` on the way (crash recovery).
async fn open_store(cli: &Cli) -> anyhow::Result<Store> {
    let dir = cli.state_dir.clone().unwrap_or_else(default_state_dir);
    let store = Store::open(&dir).await?;
    for id in store.mark_interrupted().await? {
        eprintln!(
            "note: deployment #{id} was interrupted (its coordinator stopped); `nix-deploy resume {id}` continues it"
        );
    }
    Ok(store)
}

fn engine_config(cli: &Cli, control_dir: &std::path::Path) -> EngineConfig {
    let mut ssh = SshOptions::new(cli.ssh_config.clone(), control_dir.to_path_buf());
    ssh.connect_timeout = cli.connect_timeout;
    ssh.command_timeout = cli.command_timeout;
    EngineConfig::new(cli.flake(), ssh)
}

/// Who runs this command, for the history: the user behind `sudo`, else the
/// login user, else the name of our uid, else the uid; `@` the machine.
fn who() -> String {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let user = var("SUDO_USER")
        .or_else(|| var("USER"))
        .or_else(|| var("LOGNAME"))
        .unwrap_or_else(|| {
            let uid = current_uid();
            std::fs::read_to_string("/etc/passwd")
                .ok()
                .and_then(|passwd| user_of_uid(&passwd, uid))
                .unwrap_or_else(|| format!("uid {uid}"))
        });
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}

/// Our effective uid: the owner of `/proc/self` (no unsafe needed).
fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

/// The name of `uid` in an `/etc/passwd` text.
fn user_of_uid(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_string())
    })
}

impl Cli {
    pub fn flake(&self) -> String {
        self.flake.clone().unwrap_or_else(|| ".".into())
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    if let Some(server) = cli.server.clone() {
        return match remote::run(&cli, &server).await {
            Ok(code) => Ok(code),
            Err(e) => {
                eprintln!("error: {e}");
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
        } => {
            let options = strategy.options()?;
            let control = control_dir()?;
            let store = open_store(&cli).await?;
            let engine = Engine::new(engine_config(&cli, control.path()), store);
            let report = engine
                .plan(&select.selection(), &options, !*no_build)
                .await?;
            if cli.json {
                output::print_json(&report)?;
            } else {
                output::print_plan(&report);
            }
            Ok(EXIT_OK)
        }
        Command::Deploy(args) => deploy(&cli, args).await,
        Command::Health { host, within } => {
            let control = control_dir()?;
            let store = open_store(&cli).await?;
            let engine = Engine::new(engine_config(&cli, control.path()), store);
            let health = engine.check_health(host, *within).await?;
            print_health(&cli, &serde_json::to_value(&health)?)
        }
        Command::Cancel { id } => {
            let store = open_store(&cli).await?;
            let id = match id {
                Some(id) => *id,
                None => match store
                    .deployments(50)
                    .await?
                    .into_iter()
                    .find(|d| d.status == DeploymentStatus::Running)
                {
                    Some(d) => d.id,
                    None => {
                        eprintln!("error: no deployment is running");
                        return Ok(EXIT_BAD_INPUT);
                    }
                },
            };
            if !store.request_cancel(id).await? {
                eprintln!("error: deployment #{id} is not running");
                return Ok(EXIT_BAD_INPUT);
            }
            if cli.json {
                output::print_json(&serde_json::json!({ "id": id, "cancel_requested": true }))?;
            } else {
                println!(
                    "Cancel requested for deployment #{id}: no new hosts will start; running hosts finish or roll back."
                );
            }
            Ok(EXIT_OK)
        }
        Command::Resume { id, wait, runtime } => {
            let control = control_dir()?;
            let store = open_store(&cli).await?;
            let mut config = engine_config(&cli, control.path());
            runtime.apply(&mut config);
            let engine = Engine::new(config, store);
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
            let control = control_dir()?;
            let store = open_store(&cli).await?;
            let mut config = engine_config(&cli, control.path());
            runtime.apply(&mut config);
            let engine = Engine::new(config, store);
            let who = who();
            watch(&cli, |sink, _cancel| {
                engine.rollback(host, *to_generation, &who, Some(sink))
            })
            .await
        }
        Command::Status => {
            let store = open_store(&cli).await?;
            let hosts = store.host_states().await?;
            if cli.json {
                output::print_json(&serde_json::json!({ "hosts": hosts }))?;
            } else {
                output::print_status(&hosts);
            }
            Ok(EXIT_OK)
        }
        Command::History { limit } => {
            let store = open_store(&cli).await?;
            let deployments = store.deployments((*limit).max(1)).await?;
            let mut rows = Vec::new();
            for d in deployments {
                let runs = store.host_runs(d.id).await?;
                rows.push((d, runs));
            }
            if cli.json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(d, runs)| output::deployment_json(d, runs))
                    .collect();
                output::print_json(&serde_json::json!({ "deployments": list }))?;
            } else {
                output::print_history(&rows);
            }
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
            let Some(deployment) = store.deployment(id).await? else {
                eprintln!("error: no deployment with id {id}");
                return Ok(EXIT_BAD_INPUT);
            };
            let runs = store.host_runs(id).await?;
            let events = store.events(id, 0).await?;
            if cli.json {
                let mut doc = output::deployment_json(&deployment, &runs);
                doc["events"] = serde_json::to_value(&events)?;
                output::print_json(&doc)?;
            } else {
                output::print_deployment(&deployment, &runs, &events);
            }
            Ok(EXIT_OK)
        }
    }
}

async fn deploy(cli: &Cli, args: &DeployArgs) -> anyhow::Result<u8> {
    let options = args.strategy.options()?;
    let control = control_dir()?;
    let store = open_store(cli).await?;
    let mut config = engine_config(cli, control.path());
    args.runtime.apply(&mut config);
    config.substitute_on_destination = args.substitute_on_destination;
    if let Some(revision) = &args.revision {
        config.flake = crate::github::flake_at_revision(&config.flake, revision)
            .map_err(|e| EngineError::BadOption(e.to_string()))?;
    }
    let engine = Engine::new(config, store);
    let request = DeployRequest {
        selection: args.select.selection(),
        wait: args.wait,
        options,
        trigger: "cli".into(),
        requested_by: who(),
    };
    watch(cli, |sink, cancel| {
        engine.deploy(request, Some(sink), cancel)
    })
    .await
}

/// Run a deployment with live progress, Ctrl-C handling and the final report.
async fn watch<F, Fut>(cli: &Cli, start: F) -> anyhow::Result<u8>
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<crate::events::Event>, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<crate::engine::DeployReport, EngineError>>,
{
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    // Bars only for a person watching; pipes, CI and --json get plain lines.
    let fancy = !cli.json && std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    let display = tokio::spawn(progress::render(receiver, fancy));
    let signals = tokio::spawn(on_signals(cancel.clone()));
    let result = start(sender, cancel).await;
    signals.abort();
    let _ = display.await;
    let report = result?;
    if cli.json {
        output::print_json(&output::report_json(&report))?;
    } else {
        output::print_report(&report);
    }
    Ok(match report.status {
        DeploymentStatus::Succeeded => EXIT_OK,
        DeploymentStatus::Cancelled if !report.any_failure() => EXIT_CANCELLED,
        _ => EXIT_FAILED,
    })
}

/// Show a host's health (a `HostHealth` as JSON); exit 1 when unhealthy.
pub(crate) fn print_health(cli: &Cli, health: &serde_json::Value) -> anyhow::Result<u8> {
    if cli.json {
        output::print_json(health)?;
    } else {
        let name = health["host"].as_str().unwrap_or("?");
        let reachable = health["reachable"].as_bool().unwrap_or(false);
        println!(
            "{name}: {} ({}), generation {}",
            if !reachable {
                "UNREACHABLE"
            } else if health["healthy"].as_bool().unwrap_or(false) {
                "HEALTHY"
            } else {
                "UNHEALTHY"
            },
            health["state"].as_str().unwrap_or("?").to_uppercase(),
            health["current"]["generation"]
                .as_u64()
                .map(|g| g.to_string())
                .unwrap_or("-".into())
        );
        for r in health["results"].as_array().into_iter().flatten() {
            println!(
                "  {} {}: {}",
                if r["ok"].as_bool().unwrap_or(false) {
                    "✅"
                } else {
                    "❌"
                },
                r["check"].as_str().unwrap_or(""),
                r["output"]
                    .as_str()
                    .unwrap_or("")
                    .lines()
                    .next()
                    .unwrap_or("")
            );
        }
        if let Some(error) = health["error"].as_str() {
            println!("  {error}");
        }
    }
    let healthy = health["reachable"].as_bool().unwrap_or(false)
        && health["healthy"].as_bool().unwrap_or(false);
    Ok(if healthy { EXIT_OK } else { EXIT_FAILED })
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
    fn finds_a_user_by_uid() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(user_of_uid(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(user_of_uid(passwd, 0).as_deref(), Some("root"));
        assert_eq!(user_of_uid(passwd, 7), None);
    }
}
