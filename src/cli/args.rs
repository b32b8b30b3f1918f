//! The command line as clap sees it, and its translation into the core's
//! [`Request`]: the same document the daemon's API takes, so a command means
//! the same in process and through `--server`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use nix_deploy_core::duration;
use nix_deploy_core::options::{Amount, Request};

use crate::store::DatabaseUrl;

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
    /// The history in PostgreSQL, shared with other coordinators
    /// (postgresql://USER@HOST/DB) [default: SQLite in the state directory].
    #[arg(long, global = true, value_name = "URL", env = "NIX_DEPLOY_DATABASE",
          value_parser = DatabaseUrl::parse)]
    pub database: Option<DatabaseUrl>,
    /// Print one JSON document instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// SSH connect timeout (seconds, or e.g. 10s, 1m).
    #[arg(long, global = true, default_value = "10s", value_name = "DURATION", value_parser = duration::parse_timeout)]
    pub connect_timeout: Duration,
    /// Timeout of each remote command (activation has its own).
    #[arg(long, global = true, default_value = "1m", value_name = "DURATION", value_parser = duration::parse_timeout)]
    pub command_timeout: Duration,
    /// Keep each host's SSH master connection this long after its last use,
    /// so the next command (or the daemon's next deployment) pays no
    /// handshake; 0 closes them when the command ends.
    #[arg(long, global = true, default_value = "10m", value_name = "DURATION",
          env = "NIX_DEPLOY_SSH_KEEP_ALIVE", value_parser = duration::parse)]
    pub ssh_keep_alive: Duration,
    /// `nix eval` processes evaluating the fleet at once [default: from the
    /// cores and the memory available].
    #[arg(long, global = true, value_name = "N", env = "NIX_DEPLOY_EVAL_WORKERS",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub eval_workers: Option<u16>,
    /// Evaluate every host again instead of reading the evaluation cache
    /// (fresh results are still stored).
    #[arg(long, global = true)]
    pub no_eval_cache: bool,
    /// More logging on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn flake(&self) -> String {
        self.flake.clone().unwrap_or_else(|| ".".into())
    }
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
    /// Run a command on many hosts at once, with live progress and one
    /// summary: `nix-deploy exec --on 'web-*' -- systemctl is-active nginx`.
    /// The command is an argument vector (use `sh -c '...'` for a shell).
    /// Exit 0 when it succeeded everywhere, 1 when a host failed or was
    /// unreachable.
    Exec(ExecArgs),
    /// Upload the selected hosts' `deployment.keys` again, without deploying.
    UploadKeys {
        #[command(flatten)]
        select: SelectArgs,
        /// Hosts at once [default: 16].
        #[arg(long, value_name = "N")]
        parallel_limit: Option<usize>,
    },
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
    /// not yet done, with the options it was started with (every host is
    /// probed again first).
    Resume {
        /// Deployment id [default: the latest that did not succeed].
        id: Option<i64>,
        /// Wait for busy hosts instead of refusing.
        #[arg(long)]
        wait: bool,
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
        #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration::parse)]
        within: Duration,
    },
    /// Run the daemon: the HTTP API, chat and GitHub hooks, metrics.
    Serve(super::serve::ServeArgs),
}

/// Timeouts and checks of a run that touches hosts. Unset ones take the
/// defaults (locally) or the daemon's configured defaults (with --server).
#[derive(Args, Debug, Clone, Default)]
pub struct RuntimeArgs {
    /// Overall deadline of a host's health validation [default: 2m].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse_timeout)]
    pub health_timeout: Option<Duration>,
    /// How long the watchdog on a host waits for confirmation (over a new SSH
    /// connection) before switching back to the previous generation by
    /// itself [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse_timeout)]
    pub confirm_timeout: Option<Duration>,
    /// Pre-flight: free space /nix/store must have on the host, in MiB [default: 1024].
    #[arg(long, value_name = "MIB")]
    pub min_free_space: Option<u64>,
    /// Emergency deploy: skip pre-flight and health checks (the host must
    /// still run the new system afterwards).
    #[arg(long)]
    pub skip_validation: bool,
    /// Timeout of `switch-to-configuration` [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse_timeout)]
    pub activation_timeout: Option<Duration>,
}

impl RuntimeArgs {
    fn apply(&self, request: &mut Request) {
        request.health_timeout = self.health_timeout;
        request.confirm_timeout = self.confirm_timeout;
        request.min_free_space_mib = self.min_free_space;
        request.skip_validation = self.skip_validation;
        request.activation_timeout = self.activation_timeout;
    }
}

/// Which hosts: names and globs (`web-*`), tags and tag globs (`@edge-*`),
/// several (the union), comma lists, exclusions. Every selector must match a
/// host: a typo exits 2.
#[derive(Args, Debug, Clone, Default)]
pub struct SelectArgs {
    /// Hosts by name or glob (`web-*`), or `@tag` / `@tag-glob`. None means every host.
    pub hosts: Vec<String>,
    /// Every host of the fleet.
    #[arg(long)]
    pub all: bool,
    /// Hosts by name or glob (`'web-*'`), or `@tag` / `@tag-glob`; repeatable,
    /// or comma-separated (the union).
    #[arg(long, value_name = "SEL")]
    pub on: Vec<String>,
    /// Leave out the hosts this selects (same syntax); repeatable.
    #[arg(long, value_name = "SEL")]
    pub exclude: Vec<String>,
}

impl SelectArgs {
    fn apply(&self, request: &mut Request) {
        request.hosts = self.hosts.clone();
        request.on = self.on.clone();
        request.all = self.all;
        request.exclude = self.exclude.clone();
    }

    /// The selection, checked for syntax.
    pub fn selection(&self) -> nix_deploy_core::fleet::Selection {
        nix_deploy_core::fleet::Selection {
            names: self.hosts.clone(),
            tags: self.on.clone(),
            all: self.all,
            exclude: self.exclude.clone(),
        }
    }
}

/// `exec`: which hosts, how many at once, how long, and the command.
#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// Hosts running the command at once [default: 16].
    #[arg(long, value_name = "N")]
    pub parallel_limit: Option<usize>,
    /// How long the command may run on each host (e.g. 30s, 5m) [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse_timeout)]
    pub timeout: Option<Duration>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl ExecArgs {
    /// The same document `POST /api/v1/exec` takes.
    pub fn request(&self) -> nix_deploy_core::exec::ExecRequest {
        nix_deploy_core::exec::ExecRequest {
            hosts: self.select.hosts.clone(),
            on: self.select.on.clone(),
            all: self.select.all,
            exclude: self.select.exclude.clone(),
            command: self.command.clone(),
            parallel_limit: self.parallel_limit,
            timeout: self.timeout,
        }
    }
}

/// How the deployment is ordered and gated. Unset options take
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
    #[arg(long, value_name = "N|N%", value_parser = amount)]
    pub batch_size: Option<Amount>,
    /// Canary host(s) for --strategy canary [default: the first changed host by name].
    #[arg(long, value_name = "HOST")]
    pub canary: Vec<String>,
    /// How long a canary is held and re-validated before the rest follow (e.g. 30s, 5m) [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
    pub canary_soak: Option<Duration>,
    /// Abort when more than N hosts (or N% of the hosts to deploy) fail [default: 0].
    #[arg(long, value_name = "N|N%", value_parser = amount)]
    pub max_failures: Option<Amount>,
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

fn amount(text: &str) -> Result<Amount, String> {
    Amount::parse(text).map_err(|e| e.0)
}

impl StrategyArgs {
    fn apply(&self, request: &mut Request) {
        request.strategy = self.strategy.clone();
        request.parallel = self.parallel;
        request.sequential = self.sequential;
        request.batch_size = self.batch_size;
        request.canary = self.canary.clone();
        request.canary_soak = self.canary_soak;
        request.max_failures = self.max_failures;
        request.continue_on_failure = self.continue_on_failure;
        request.rollback_all_on_abort = self.rollback_all_on_abort;
        request.force = self.force;
        request.parallel_limit = self.parallel_limit;
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
    /// switch (default: activate now and at boot), boot (the boot default
    /// only: activated at the next boot), test (activate now, not at boot),
    /// dry-activate (say what would start, stop, restart; change nothing).
    #[arg(long, value_name = "GOAL")]
    pub goal: Option<String>,
    /// Reboot after the activation and wait for the host to come back on the
    /// new system (switch and boot goals). `--reboot=auto`: only the hosts
    /// whose kernel or initrd changed.
    #[arg(long, value_name = "WHEN", num_args = 0..=1, require_equals = true, default_missing_value = "always")]
    pub reboot: Option<String>,
    /// How long a rebooting host may take to come back [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = duration::parse_timeout)]
    pub reboot_timeout: Option<Duration>,
}

impl DeployArgs {
    /// The request this command line makes.
    pub fn request(&self) -> Result<Request, nix_deploy_core::options::OptionsError> {
        let mut request = Request {
            wait: self.wait,
            revision: self.revision.clone(),
            substitute_on_destination: self.substitute_on_destination,
            goal: self.goal.clone(),
            reboot: self
                .reboot
                .as_deref()
                .map(nix_deploy_core::goal::RebootPolicy::parse)
                .transpose()?,
            reboot_timeout: self.reboot_timeout,
            ..Request::default()
        };
        self.select.apply(&mut request);
        self.strategy.apply(&mut request);
        self.runtime.apply(&mut request);
        Ok(request)
    }
}

/// The request of `plan`.
pub fn plan_request(select: &SelectArgs, strategy: &StrategyArgs, no_build: bool) -> Request {
    let mut request = Request {
        summaries: no_build.then_some(false),
        ..Request::default()
    };
    select.apply(&mut request);
    strategy.apply(&mut request);
    request
}

/// The options of `rollback`.
pub fn runtime_request(runtime: &RuntimeArgs) -> Request {
    let mut request = Request::default();
    runtime.apply(&mut request);
    request
}
