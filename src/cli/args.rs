//! The command line as clap sees it, and its translation into the core's
//! [`Request`]: the same document the daemon's API takes, so a command means
//! the same in process and through `--server`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use nix_deploy_core::duration;
use nix_deploy_core::nix::NixFlags;
use nix_deploy_core::options::{Amount, Request};

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
    /// A private key for SSH (ssh's `-i`), for our sessions and `nix copy`.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "NIX_DEPLOY_SSH_IDENTITY"
    )]
    pub ssh_identity: Option<PathBuf>,
    /// Where the history database lives [default: $XDG_STATE_HOME/nix-deploy, /var/lib/nix-deploy for root].
    #[arg(long, global = true, value_name = "DIR", env = "NIX_DEPLOY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
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
    /// Nix's `--show-trace` on every local Nix command: evaluation errors
    /// with their whole trace.
    #[arg(long, global = true)]
    pub show_trace: bool,
    /// Nix's `--impure` on evaluations and builds (they may read the
    /// environment and files outside the flake); the evaluation cache is not
    /// read.
    #[arg(long, global = true)]
    pub impure: bool,
    /// A Nix setting for every local Nix command (`--option NAME VALUE`),
    /// e.g. `--nix-option eval-cache false`; repeatable. Unknown settings are
    /// refused.
    #[arg(long, global = true, num_args = 2, value_names = ["NAME", "VALUE"],
          action = clap::ArgAction::Append)]
    pub nix_option: Vec<String>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn flake(&self) -> String {
        self.flake.clone().unwrap_or_else(|| ".".into())
    }

    /// `--show-trace`, `--impure`, `--nix-option`, for every Nix command.
    pub fn nix_flags(&self) -> NixFlags {
        NixFlags {
            show_trace: self.show_trace,
            impure: self.impure,
            options: self
                .nix_option
                .chunks(2)
                .map(|pair| (pair[0].clone(), pair.get(1).cloned().unwrap_or_default()))
                .collect(),
        }
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
        /// Plan the flake pinned to this commit (as CI does before deploying
        /// the same commit with `deploy --revision`).
        #[arg(long, value_name = "SHA")]
        revision: Option<String>,
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
    /// colmena's `apply [GOAL]`: deploy with a goal (switch, boot, test,
    /// dry-activate, push), or build, or upload keys; `--on` selects,
    /// `-p N` is the parallel limit.
    Apply(super::apply::ApplyArgs),
    /// Build the selected hosts' systems on this machine, touching no host.
    Build(super::apply::BuildArgs),
    /// Evaluate a Nix expression against the fleet and print it as JSON:
    /// `nix-deploy eval -E '{ nodes, pkgs, lib, ... }: builtins.attrNames nodes'`.
    Eval(super::eval::EvalArgs),
    /// Check this machine (Nix, SSH keys), the flake and every selected
    /// host (reachable, privileges, copies), each problem with its fix.
    /// Exit 1 when a check fails.
    Doctor(super::doctor::DoctorArgs),
    /// Print shell completions: `nix-deploy completions bash > /etc/bash_completion.d/nix-deploy`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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
    /// Whether any of these flags was given.
    pub fn is_set(&self) -> bool {
        self.health_timeout.is_some()
            || self.confirm_timeout.is_some()
            || self.min_free_space.is_some()
            || self.skip_validation
            || self.activation_timeout.is_some()
    }

    pub fn apply(&self, request: &mut Request) {
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
    pub fn apply(&self, request: &mut Request) {
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
    #[arg(long, short = 'p', value_name = "N")]
    pub parallel_limit: Option<usize>,
}

fn amount(text: &str) -> Result<Amount, String> {
    Amount::parse(text).map_err(|e| e.0)
}

impl StrategyArgs {
    pub fn apply(&self, request: &mut Request) {
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
    #[command(flatten)]
    pub results: ResultArgs,
}

/// What happens to keys and built systems, as colmena's flags say it.
#[derive(Args, Debug, Clone, Default)]
pub struct ResultArgs {
    /// Do not upload `deployment.keys` (`upload-keys` does it alone).
    #[arg(long)]
    pub no_keys: bool,
    /// Keep each built system as a GC root, `STATE/results/HOST`, until the
    /// next kept result of that host (deployments also root what they deploy
    /// under `STATE/gcroots`, three per host).
    #[arg(long)]
    pub keep_result: bool,
}

impl ResultArgs {
    pub fn apply(&self, request: &mut Request) {
        request.no_keys = self.no_keys;
        request.keep_result = self.keep_result;
    }
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
        self.results.apply(&mut request);
        Ok(request)
    }
}

/// The request of `plan`.
pub fn plan_request(
    select: &SelectArgs,
    strategy: &StrategyArgs,
    no_build: bool,
    revision: Option<&str>,
) -> Request {
    let mut request = Request {
        summaries: no_build.then_some(false),
        revision: revision.map(str::to_string),
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
