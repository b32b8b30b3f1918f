//! The command line as clap sees it, and its translation into the core's
//! [`Request`]: the same document the daemon's API takes, so a command means
//! the same in process and through `--server`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use nix_deploy_core::duration;
pub use nix_deploy_core::grammar::{
    ClosureArgs, DeployArgs, PromoteArgs, ResultArgs, RuntimeArgs, SelectArgs, StrategyArgs,
    runtime_request,
};
use nix_deploy_core::nix::NixFlags;
use nix_deploy_core::options::{OptionsError, Request};

/// The strategy from `NIX_DEPLOY_STRATEGY` when the command line names
/// none (the shared grammar reads no environment: the chat must not).
pub(crate) fn strategy_from_env(mut request: Request) -> Request {
    if request.strategy.is_none() && !request.parallel && !request.sequential {
        request.strategy = std::env::var("NIX_DEPLOY_STRATEGY")
            .ok()
            .filter(|s| !s.trim().is_empty());
    }
    request
}

/// The request of `deploy`.
pub fn deploy_request(args: &DeployArgs) -> Result<Request, OptionsError> {
    args.request().map(strategy_from_env)
}

/// The request of `plan`.
pub fn plan_request(
    select: &SelectArgs,
    strategy: &StrategyArgs,
    no_build: bool,
    revision: Option<&str>,
) -> Request {
    strategy_from_env(nix_deploy_core::grammar::plan_request(
        select, strategy, no_build, revision,
    ))
}

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
    /// Where the flake keeps its fleet: nixos (`nixosConfigurations`),
    /// colmena (`colmenaHive`) or deploy-rs (`deploy.nodes`) [default:
    /// detected from the flake's outputs].
    #[arg(
        long,
        global = true,
        value_name = "SOURCE",
        env = "NIX_DEPLOY_SOURCE",
        value_enum
    )]
    pub source: Option<nix_deploy_core::source::FleetSource>,
    /// Remote builders for our builds, as Nix's `builders` setting (a
    /// machines specification, or `@FILE`) [default: Nix's own, or the
    /// hive's meta.machinesFile].
    #[arg(long, global = true, value_name = "SPEC", env = "NIX_DEPLOY_BUILDERS")]
    pub builders: Option<String>,
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
    /// Deploy this machine (the one nix-deploy runs on) through the same
    /// steps as `deploy`, without SSH; its host must set
    /// `deployment.allowLocalDeployment`.
    ApplyLocal(super::apply::ApplyLocalArgs),
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
    /// Per host: drift (in sync, behind, manually switched, ...), health,
    /// what it runs and when it was last seen, as the daemon's watch saw it
    /// (or last stored it); and the last result of each host's deployments.
    Status {
        /// Probe and check every host now (in process; through the daemon,
        /// also compare each with the flake as `plan` does).
        #[arg(long)]
        live: bool,
    },
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
    /// Forget which machine a host is (its `/etc/machine-id`, learned at
    /// first contact and checked on every connection), after the host was
    /// reinstalled or really moved: the next connection learns it again.
    ForgetIdentity { host: String },
    /// Probe one host and run its health checks now.
    Health {
        host: String,
        /// Retry failing checks for up to this long.
        #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration::parse)]
        within: Duration,
    },
    /// Run the daemon: the HTTP API, chat and GitHub hooks, metrics.
    Serve(super::serve::ServeArgs),
    /// Approve a deployment waiting for approval, or promote a paused one.
    Approve(super::ops::ApproveArgs),
    /// Deploy to the target hosts exactly the systems their source hosts run
    /// (`--from @staging --to @prod`), paired by `deployment.promotionKey`:
    /// read from the source hosts and copied from them, never evaluated or
    /// built. Refused (exit 2, nothing changed) when the pairing is
    /// incomplete or ambiguous, or a source host is unreachable, unhealthy
    /// or not in sync with its last successful deployment.
    Promote(PromoteArgs),
    /// Reject a deployment waiting for approval: it is cancelled, saying why.
    Reject(super::ops::RejectArgs),
    /// The audit trail: who did what, when, from where (`--json`: JSON
    /// lines); `--verify` checks that no entry was changed or removed.
    Audit(super::ops::AuditArgs),
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
