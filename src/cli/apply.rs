//! The commands a colmena user types: `apply [GOAL]`, `apply-local [GOAL]`
//! and `build`.
//!
//! `apply` is `deploy` spelt as colmena spells it: the goal is a positional
//! word (`switch`, `boot`, `test`, `dry-activate`, `push`, and `build` and
//! `keys`, which are `build` and `upload-keys`), `--on` selects, `-p N` (or
//! `--parallel N`) is how many hosts run at once (`0`: no limit). What each
//! host goes through is a deployment's: only changed hosts, in dependency
//! order, validated and confirmed, rolled back on failure, recorded.
//!
//! `apply-local` deploys the machine nix-deploy runs on (its host must set
//! `deployment.allowLocalDeployment`) through the same steps, its commands
//! run here instead of over SSH.

use clap::Args;
use clap::builder::PossibleValuesParser;

use nix_deploy_core::goal::APPLY_GOALS;
use nix_deploy_core::keys::KeysRequest;
use nix_deploy_core::options::{MAX_PARALLEL, OptionsError, Request};
use nix_deploy_core::reports::BuildReport;

use super::args::{ClosureArgs, ResultArgs, RuntimeArgs, SelectArgs};
use super::{Cli, EXIT_FAILED, EXIT_OK, output};
use crate::engine::BuildRequest;

/// `apply`'s arguments.
#[derive(Args, Debug, Clone)]
pub struct ApplyArgs {
    /// switch (activate now and at boot), boot (at the next boot), test
    /// (now, not at boot), dry-activate (say what would change), push (build
    /// and copy the closure, nothing else), build (build on this machine,
    /// touch no host), keys (upload `deployment.keys` only).
    #[arg(value_name = "GOAL", default_value = "switch",
          value_parser = PossibleValuesParser::new(APPLY_GOALS))]
    pub goal: String,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Hosts at once [default: 4]; 0: every selected host at once (at most 1024).
    #[arg(short = 'p', long = "parallel", value_name = "N")]
    pub parallel: Option<usize>,
    /// How hosts are ordered and gated: smart (default), parallel, rolling,
    /// sequential, canary or blue-green (as `deploy --strategy`).
    #[arg(long, env = "NIX_DEPLOY_STRATEGY")]
    pub strategy: Option<String>,
    /// Deploy (re-activate) unchanged hosts too, as colmena does.
    #[arg(long)]
    pub force: bool,
    /// Wait for hosts another deployment holds instead of refusing.
    #[arg(long)]
    pub wait: bool,
    /// Reboot after the activation (switch and boot); `--reboot=auto`: only
    /// the hosts whose kernel or initrd changed.
    #[arg(long, value_name = "WHEN", num_args = 0..=1, require_equals = true, default_missing_value = "always")]
    pub reboot: Option<String>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub results: ResultArgs,
    #[command(flatten)]
    pub closure: ClosureArgs,
}

/// What `apply GOAL` runs.
pub enum Applied {
    /// A deployment with this request (its `goal` set).
    Deploy(Box<Request>),
    /// `apply build`.
    Build(BuildRequest),
    /// `apply keys`.
    Keys(KeysRequest),
}

impl ApplyArgs {
    /// `-p 0` is colmena's "no limit".
    fn parallel_limit(&self) -> Option<usize> {
        self.parallel.map(|n| if n == 0 { MAX_PARALLEL } else { n })
    }

    /// Flags that only make sense for a deployment, refused with `build` and
    /// `keys` (nothing given is silently ignored).
    fn refuse_deploy_flags(&self) -> Result<(), OptionsError> {
        let given: Vec<&str> = [
            (self.strategy.is_some(), "--strategy"),
            (self.force, "--force"),
            (self.wait, "--wait"),
            (self.reboot.is_some(), "--reboot"),
            (self.results.no_keys, "--no-keys"),
            (
                self.goal == "keys" && self.results.keep_result,
                "--keep-result",
            ),
            (self.runtime.is_set(), "the health and timeout flags"),
            (self.closure.no_substitute, "--no-substitute"),
            (self.closure.build_on_target, "--build-on-target"),
        ]
        .into_iter()
        .filter_map(|(set, flag)| set.then_some(flag))
        .collect();
        match given.as_slice() {
            [] => Ok(()),
            flags => Err(OptionsError(format!(
                "`apply {}` deploys nothing: {} would do nothing",
                self.goal,
                flags.join(", ")
            ))),
        }
    }

    /// What this command line asks for.
    pub fn applied(&self) -> Result<Applied, OptionsError> {
        match self.goal.as_str() {
            "build" => {
                self.refuse_deploy_flags()?;
                Ok(Applied::Build(BuildRequest {
                    selection: self.select.selection(),
                    parallel_limit: self.parallel_limit().unwrap_or(DEFAULT_BUILDS),
                    keep_result: self.results.keep_result,
                }))
            }
            "keys" => {
                self.refuse_deploy_flags()?;
                Ok(Applied::Keys(KeysRequest {
                    hosts: self.select.hosts.clone(),
                    on: self.select.on.clone(),
                    all: self.select.all,
                    exclude: self.select.exclude.clone(),
                    parallel_limit: self.parallel_limit(),
                }))
            }
            goal => {
                let mut request = Request {
                    goal: Some(goal.to_string()),
                    strategy: self.strategy.clone(),
                    force: self.force,
                    wait: self.wait,
                    parallel_limit: self.parallel_limit(),
                    reboot: self
                        .reboot
                        .as_deref()
                        .map(nix_deploy_core::goal::RebootPolicy::parse)
                        .transpose()?,
                    ..Request::default()
                };
                self.select.apply(&mut request);
                self.runtime.apply(&mut request);
                self.results.apply(&mut request);
                self.closure.apply(&mut request, false);
                Ok(Applied::Deploy(Box::new(request)))
            }
        }
    }
}

/// `apply-local`'s arguments: which host this machine is, and how to
/// deploy it.
#[derive(Args, Debug, Clone)]
pub struct ApplyLocalArgs {
    /// switch (activate now and at boot), boot (at the next boot), test
    /// (now, not at boot), dry-activate (say what would change).
    #[arg(value_name = "GOAL", default_value = "switch",
          value_parser = PossibleValuesParser::new(LOCAL_GOALS))]
    pub goal: String,
    /// The host this machine is [default: this machine's host name].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub results: ResultArgs,
}

/// What `apply-local` may do to this machine (a push or a reboot is no goal
/// of a machine deploying itself).
const LOCAL_GOALS: [&str; 4] = ["switch", "boot", "test", "dry-activate"];

impl ApplyLocalArgs {
    /// The host this machine is: `--node`, else its host name.
    pub fn node(&self) -> Result<String, OptionsError> {
        match &self.node {
            Some(name) => Ok(name.clone()),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .map_err(|e| OptionsError(format!("this machine's host name: {e} (use --node)"))),
        }
    }

    /// The request: the one host `name`.
    pub fn request(&self, name: &str) -> Request {
        let mut request = Request {
            hosts: vec![name.to_string()],
            goal: Some(self.goal.clone()),
            ..Request::default()
        };
        self.runtime.apply(&mut request);
        self.results.apply(&mut request);
        request
    }
}

/// `nix build` processes at once when nothing says otherwise.
const DEFAULT_BUILDS: usize = 4;

/// `build`'s arguments.
#[derive(Args, Debug, Clone)]
pub struct BuildArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// Builds at once (each `nix build` also uses Nix's own parallelism) [default: 4].
    #[arg(short = 'p', long, value_name = "N")]
    pub parallel_limit: Option<usize>,
    /// Keep each built system as a GC root, `STATE/results/HOST`, until the
    /// next kept result of that host.
    #[arg(long)]
    pub keep_result: bool,
}

impl BuildArgs {
    pub fn request(&self) -> Result<BuildRequest, OptionsError> {
        let limit = self.parallel_limit.unwrap_or(DEFAULT_BUILDS);
        if !(1..=MAX_PARALLEL).contains(&limit) {
            return Err(OptionsError(format!(
                "--parallel-limit must be from 1 to {MAX_PARALLEL}, not {limit}"
            )));
        }
        let selection = self.select.selection();
        nix_deploy_core::select::check(
            &[
                selection.names.clone(),
                selection.tags.clone(),
                selection.exclude.clone(),
            ]
            .concat(),
        )
        .map_err(|e| OptionsError(e.to_string()))?;
        Ok(BuildRequest {
            selection,
            parallel_limit: limit,
            keep_result: self.keep_result,
        })
    }
}

/// Build, saying each host's end on stderr as it comes, then the report.
pub async fn build(cli: &Cli, request: BuildRequest) -> anyhow::Result<u8> {
    let (engine, _control) = super::engine(cli).await?;
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let lines = tokio::spawn(async move {
        while let Some(host) = receiver.recv().await {
            output::print_host_build(&host);
        }
    });
    let report = engine.build(request, Some(sender)).await;
    let _ = lines.await;
    let report = report?;
    output::show(cli, &report, output::print_build)?;
    Ok(build_exit_code(&report))
}

fn build_exit_code(report: &BuildReport) -> u8 {
    if report.all_built() {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn applied(words: &[&str]) -> Result<Applied, String> {
        let cli = Cli::try_parse_from(["nix-deploy", "apply"].iter().chain(words))
            .map_err(|e| e.to_string())?;
        let Command::Apply(args) = cli.command else {
            unreachable!()
        };
        args.applied().map_err(|e| e.to_string())
    }

    #[test]
    fn goals_and_limits_as_colmena_spells_them() {
        let Ok(Applied::Deploy(request)) = applied(&["boot", "--on", "@web", "-p", "20"]) else {
            panic!("a deployment")
        };
        assert_eq!(request.goal.as_deref(), Some("boot"));
        assert_eq!(request.parallel_limit, Some(20));
        assert_eq!(request.on, ["@web"]);
        assert_eq!(request.strategy, None, "-p is a limit, not a strategy");
        let Ok(Applied::Deploy(request)) = applied(&[]) else {
            panic!("a deployment")
        };
        assert_eq!(request.goal.as_deref(), Some("switch"));
        let Ok(Applied::Deploy(request)) = applied(&["--parallel", "0", "--no-keys"]) else {
            panic!("a deployment")
        };
        assert_eq!(request.parallel_limit, Some(MAX_PARALLEL));
        assert!(request.no_keys);
        let Ok(Applied::Deploy(request)) = applied(&["push", "web1", "web2"]) else {
            panic!("a deployment")
        };
        assert_eq!(request.hosts, ["web1", "web2"]);
        assert!(
            matches!(applied(&["build", "-p", "2"]), Ok(Applied::Build(b)) if b.parallel_limit == 2)
        );
        assert!(matches!(applied(&["keys"]), Ok(Applied::Keys(_))));
        let Ok(Applied::Deploy(request)) = applied(&["--no-substitute", "--build-on-target"])
        else {
            panic!("a deployment")
        };
        assert_eq!(request.substitute_on_destination, Some(false));
        assert!(request.build_on_target);
    }

    #[test]
    fn apply_local_deploys_one_named_host() {
        let cli =
            Cli::try_parse_from(["nix-deploy", "apply-local", "boot", "--node", "here"]).unwrap();
        let Command::ApplyLocal(args) = cli.command else {
            unreachable!()
        };
        let request = args.request(&args.node().unwrap());
        assert_eq!(request.hosts, ["here"]);
        assert_eq!(request.goal.as_deref(), Some("boot"));
        assert!(Cli::try_parse_from(["nix-deploy", "apply-local", "push"]).is_err());
    }

    #[test]
    fn nothing_given_is_ignored() {
        let e = applied(&["web1"]).err().unwrap();
        assert!(e.contains("invalid value 'web1'"), "{e}");
        let e = applied(&["swtich"]).err().unwrap();
        assert!(e.contains("switch"), "{e}");
        let e = applied(&["keys", "--no-keys"]).err().unwrap();
        assert!(e.contains("--no-keys would do nothing"), "{e}");
        let e = applied(&["build", "--reboot"]).err().unwrap();
        assert!(e.contains("--reboot"), "{e}");
        let e = applied(&["build", "--build-on-target"]).err().unwrap();
        assert!(e.contains("--build-on-target"), "{e}");
    }
}
